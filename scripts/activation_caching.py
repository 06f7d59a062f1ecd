"""Residual-stream activations at the last prompt token (or a fixed offset before it), at several layers in one pass.

The forward pass stops right after the deepest requested hook point: a hook there stores the batch's
activations and raises a private exception that :func:`cache_activations` catches, so no upper block
and no unembedding ever runs. Batches are grouped by length (:func:`scripts.model.length_sorted_batches`)
and results come back in input order. Position ids are derived from the attention mask, so a row's
activations do not depend on how much padding it received or on which side.

An optional on-disk cache (safetensors) is keyed by a hash of everything the activations depend on:
the model's configuration and a fingerprint of its weights, the tokenizer's vocabulary and chat
template, the texts, the layers, the hook kind and the position; a rerun with the same key loads the
file and runs no forward pass.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from scripts.hooked_model import HOOK_KINDS, HookedModel, validate_layer
from scripts.model import MAX_BATCH_TOKENS, format_chat, length_sorted_batches, pad_batch
from scripts.paths import cache_dir

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bumped whenever the cache file layout or the key's contents change, so stale files are never read."""

_WEIGHT_SAMPLES_PER_TENSOR = 64


class _StopForward(Exception):
    """Raised by the deepest hook to end the forward pass once every requested activation is stored."""


@dataclass(frozen=True)
class CachedActivations:
    """Activations of N texts at one hook kind and several layers.

    Attributes:
        acts: Layer → activations ``[N, d_model]`` (float32, CPU), rows in input order.
        hook_kind: ``resid_pre``, ``resid_mid`` or ``resid_post``.
        texts_hash: :func:`texts_hash` of the model inputs the rows belong to.
        position: Token position relative to the end of each text: ``-1`` is the last token.
    """

    acts: Mapping[int, torch.Tensor]
    hook_kind: str
    texts_hash: str
    position: int = -1

    def __post_init__(self) -> None:
        if self.hook_kind not in HOOK_KINDS:
            raise ValueError(f"unknown hook kind {self.hook_kind!r}; valid kinds: {list(HOOK_KINDS)}")
        if not self.acts:
            raise ValueError("CachedActivations needs at least one layer")
        shapes = {layer: tuple(tensor.shape) for layer, tensor in self.acts.items()}
        if any(len(shape) != 2 for shape in shapes.values()) or len(set(shapes.values())) != 1:
            raise ValueError(f"every layer must hold a [N, d_model] tensor of the same shape, got {shapes}")
        object.__setattr__(self, "acts", dict(sorted(self.acts.items())))

    @property
    def layers(self) -> list[int]:
        """Cached layers, ascending."""
        return list(self.acts)

    @property
    def n(self) -> int:
        """Number of texts (rows)."""
        return int(next(iter(self.acts.values())).shape[0])

    @property
    def d_model(self) -> int:
        """Residual-stream width."""
        return int(next(iter(self.acts.values())).shape[1])

    def layer(self, layer: int) -> torch.Tensor:
        """Activations ``[N, d_model]`` of one layer; an uncached layer raises naming the cached ones."""
        if layer not in self.acts:
            raise KeyError(f"layer {layer} was not cached; cached layers: {self.layers}")
        return self.acts[layer]

    @functools.cached_property
    def mean(self) -> dict[int, torch.Tensor]:
        """Layer → mean activation ``[d_model]`` over the N rows."""
        return {layer: tensor.mean(dim=0) for layer, tensor in self.acts.items()}

    def mean_norm(self, layer: int) -> float:
        """Mean L2 norm of the rows of ``layer``: the scale steering strengths are reported against."""
        return float(self.layer(layer).norm(dim=-1).mean())


def texts_hash(texts: Sequence[str]) -> str:
    """SHA-256 of a list of texts (length-prefixed, so no two different lists collide by concatenation)."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def chat_template_hash(tokenizer) -> str:
    """Short SHA-256 of the tokenizer's chat template (``"none"`` without one)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "none"
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


def model_fingerprint(model) -> str:
    """SHA-256 of a model's configuration, dtype and a strided sample of every parameter.

    A sample of each tensor (not its full bytes) keeps this cheap on large models while still
    telling a fine-tuned checkpoint from its base (fine-tuning moves nearly every weight).
    """
    digest = hashlib.sha256()
    digest.update(model.config.to_json_string(use_diff=False).encode("utf-8"))
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
            flat = parameter.detach().reshape(-1)
            stride = max(1, flat.numel() // _WEIGHT_SAMPLES_PER_TENSOR)
            sample = flat[::stride][:_WEIGHT_SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.float64)
            digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode("utf-8"))
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what tokenization depends on here: class, vocabulary size, added tokens, chat template."""
    identity = {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "added": sorted(tokenizer.get_added_vocab().items()),
        "template": chat_template_hash(tokenizer),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def activation_cache_key(
    hooked: HookedModel, texts: Sequence[str], layers: Sequence[int], hook_kind: str, position: int
) -> str:
    """Key of the on-disk cache entry of these activations (a hex digest)."""
    identity = {
        "format": CACHE_FORMAT,
        "model_name": hooked.name,
        "model": model_fingerprint(hooked.model),
        "tokenizer": tokenizer_fingerprint(hooked.tokenizer),
        "texts": texts_hash(texts),
        "layers": sorted(layers),
        "hook_kind": hook_kind,
        "position": position,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def default_activation_cache_dir() -> Path:
    """``cache_dir()/activations``: where :func:`cache_activations` keeps its files by default."""
    path = cache_dir() / "activations"
    path.mkdir(parents=True, exist_ok=True)
    return path


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position of each row, for left or right padding.

    Args:
        attention_mask: ``[batch, pos]`` of 0/1.

    Returns:
        ``[batch]`` long tensor.

    Raises:
        ValueError: a row has no non-pad position.
    """
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("a row of the attention mask has no non-pad position (empty text?)")
    width = mask.shape[1]
    return width - 1 - mask.flip(dims=[1]).long().argmax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[batch, pos]`` counting only non-pad tokens, so padding never shifts a row's positions."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _resolve_layers(layers: int | Sequence[int], n_layers: int) -> list[int]:
    requested = [layers] if isinstance(layers, int) else list(layers)
    if not requested:
        raise ValueError("at least one layer is needed")
    return sorted({validate_layer(layer, n_layers) for layer in requested})


def _tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        raise ValueError("no texts given")
    # Texts are already formatted by the chat template, which writes any BOS token itself.
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    empty = [index for index, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(f"texts at indices {empty[:10]} tokenize to nothing")
    return ids


def _pad_id(tokenizer) -> int:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    return int(pad_id)


def _run_batches(
    hooked: HookedModel,
    token_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    hook_kind: str,
    batch_size: int,
    select: Callable[[torch.Tensor, torch.Tensor], Any],
    desc: str,
    progress: bool,
) -> dict[int, list[Any]]:
    """Run length-sorted batches up to the deepest layer; ``select(act [batch, pos, d_model], mask [batch, pos])``
    returns what each row keeps (indexable by row).

    Returns:
        Layer → one entry per input (in input order), as produced by ``select`` row by row.
    """
    from tqdm.auto import tqdm

    tokenizer = hooked.tokenizer
    pad_id = _pad_id(tokenizer)
    side = getattr(tokenizer, "padding_side", "left")
    deepest = max(layers)
    results: dict[int, list[Any]] = {layer: [None] * len(token_ids) for layer in layers}
    batch_store: dict[int, list[Any]] = {}
    batch_mask: dict[str, torch.Tensor] = {}

    def store(activation: torch.Tensor, hook, layer: int) -> None:
        batch_store[layer] = select(activation.detach(), batch_mask["mask"])
        if layer == deepest:
            raise _StopForward

    hooks = [(hooked.hook_name(layer, hook_kind), functools.partial(store, layer=layer)) for layer in layers]
    device = hooked.device
    batches = length_sorted_batches([len(ids) for ids in token_ids], batch_size, MAX_BATCH_TOKENS)
    with torch.no_grad(), hooked.hooks(hooks):
        for batch in tqdm(batches, desc=desc, disable=not progress):
            input_ids, attention_mask = pad_batch([token_ids[index] for index in batch], pad_id, side)
            batch_mask["mask"] = attention_mask.to(device)
            batch_store.clear()
            try:
                hooked.model(
                    input_ids=input_ids.to(device),
                    attention_mask=batch_mask["mask"],
                    position_ids=position_ids_from_mask(attention_mask).to(device),
                    use_cache=False,
                )
            except _StopForward:
                pass
            else:
                raise RuntimeError(f"hook {hooked.hook_name(deepest, hook_kind)} did not fire during the forward pass")
            for layer in layers:
                for row, index in enumerate(batch):
                    results[layer][index] = batch_store[layer][row]
    return results


def _select_position(position: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A selector of the activation ``[batch, d_model]`` at ``position`` counted from each row's last token."""

    def select(activation: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = last_token_indices(mask)
        index = last + 1 + position
        first = mask.long().argmax(dim=1)
        if (index < first).any():
            raise ValueError(f"position {position} is before the start of a text in this batch")
        rows = torch.arange(activation.shape[0], device=activation.device)
        return activation[rows, index].to(device="cpu", dtype=torch.float32)

    return select


def cache_activations(
    hooked: HookedModel,
    texts: Sequence[str],
    layers: int | Sequence[int],
    hook_kind: str = "resid_post",
    position: int = -1,
    batch_size: int = 16,
    cache: bool = False,
    cache_directory: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> CachedActivations:
    """Activations of formatted texts at one token position, at several layers, in one truncated pass.

    Args:
        hooked: The wrapped model (:func:`scripts.hooked_model.wrap_model`).
        texts: Full model inputs (chat template already applied; see :func:`cache_prompt_activations`).
            They are tokenized without adding special tokens.
        layers: One layer or several (negative counts from the end); duplicates are merged.
        hook_kind: ``resid_pre``, ``resid_mid`` or ``resid_post``.
        position: Token position relative to each text's end: ``-1`` is the last non-pad token,
            ``-2`` the one before it, and so on.
        batch_size: Rows per forward pass (batches are grouped by length).
        cache: Read and write the on-disk cache.
        cache_directory: Where cache files live; default :func:`default_activation_cache_dir`.
        progress: Show a progress bar.

    Returns:
        :class:`CachedActivations` with ``acts[layer]`` of shape ``[N, d_model]`` (float32, CPU).

    Raises:
        ValueError: no texts, an empty text, an invalid layer or hook kind (naming the valid ones),
            or a ``position`` that is not negative or falls before a text's first token.
    """
    if hook_kind not in HOOK_KINDS:
        raise ValueError(f"unknown hook kind {hook_kind!r}; valid kinds: {list(HOOK_KINDS)}")
    if position >= 0:
        raise ValueError(f"position counts from the end of each text and must be negative, got {position}")
    texts = list(texts)
    resolved = _resolve_layers(layers, hooked.n_layers)
    token_ids = _tokenize(hooked.tokenizer, texts)
    digest = texts_hash(texts)

    path: Path | None = None
    if cache:
        directory = Path(cache_directory) if cache_directory is not None else default_activation_cache_dir()
        key = activation_cache_key(hooked, texts, resolved, hook_kind, position)
        path = directory / f"{key}.safetensors"
        if path.exists():
            logger.info("activation cache hit: %s", path)
            return load_activations(path)

    rows = _run_batches(
        hooked, token_ids, resolved, hook_kind, batch_size, _select_position(position), "cache activations", progress
    )
    result = CachedActivations(
        acts={layer: torch.stack(rows[layer]) for layer in resolved},
        hook_kind=hook_kind,
        texts_hash=digest,
        position=position,
    )
    if path is not None:
        save_activations(result, path, metadata={"model": hooked.name})
        logger.info("activations cached at %s", path)
    return result


def cache_prompt_activations(
    hooked: HookedModel,
    prompts: Sequence[str],
    layers: int | Sequence[int],
    system_prompt: str | None = None,
    assistant_prefix: str | None = None,
    **kwargs: Any,
) -> CachedActivations:
    """:func:`cache_activations` on user prompts wrapped with the tokenizer's chat template (:func:`format_chat`).

    ``**kwargs`` are those of :func:`cache_activations` (``hook_kind``, ``position``, ``batch_size``,
    ``cache``, ``cache_directory``, ``progress``).
    """
    texts = format_chat(hooked.tokenizer, prompts, system_prompt=system_prompt, assistant_prefix=assistant_prefix)
    return cache_activations(hooked, texts, layers, **kwargs)


def cache_token_activations(
    hooked: HookedModel,
    texts: Sequence[str],
    layers: int | Sequence[int],
    hook_kind: str = "resid_post",
    batch_size: int = 16,
    progress: bool = True,
) -> dict[int, list[torch.Tensor]]:
    """Activations at every token of each text (no disk cache), truncated after the deepest layer.

    Returns:
        Layer → one tensor ``[len_i, d_model]`` (float32, CPU) per text, in input order, without padding.
    """
    if hook_kind not in HOOK_KINDS:
        raise ValueError(f"unknown hook kind {hook_kind!r}; valid kinds: {list(HOOK_KINDS)}")
    resolved = _resolve_layers(layers, hooked.n_layers)
    token_ids = _tokenize(hooked.tokenizer, list(texts))

    def select(activation: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        keep = mask.bool()
        return [activation[row][keep[row]].to(device="cpu", dtype=torch.float32) for row in range(activation.shape[0])]

    return _run_batches(hooked, token_ids, resolved, hook_kind, batch_size, select, "cache token activations", progress)


def save_activations(
    cached: CachedActivations, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write activations to a safetensors file (atomically), with their identity as JSON metadata.

    Args:
        cached: The activations.
        path: Target file (e.g. ``RunConfig.artifact_path("activations", name)``).
        metadata: Extra JSON-serialisable fields stored alongside.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": CACHE_FORMAT,
        "hook_kind": cached.hook_kind,
        "texts_hash": cached.texts_hash,
        "position": cached.position,
        "layers": cached.layers,
        "extra": dict(metadata or {}),
    }
    tensors = {f"layer_{layer}": tensor.contiguous() for layer, tensor in cached.acts.items()}
    staging = path.with_name(path.name + ".part")
    save_file(tensors, str(staging), metadata={"activations": json.dumps(header, sort_keys=True)})
    os.replace(staging, path)
    return path


def load_activations(path: str | os.PathLike[str]) -> CachedActivations:
    """Read a file written by :func:`save_activations`.

    Raises:
        ValueError: the file lacks the metadata or its layers do not match its tensors.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("activations")
        if raw is None:
            raise ValueError(f"{path} has no activation metadata; was it written by save_activations?")
        header = json.loads(raw)
        if header.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path} has cache format {header.get('format')}, expected {CACHE_FORMAT}")
        expected = {f"layer_{layer}" for layer in header["layers"]}
        if set(handle.keys()) != expected:
            raise ValueError(f"{path}: tensors {sorted(handle.keys())} do not match layers {header['layers']}")
        acts = {int(layer): handle.get_tensor(f"layer_{layer}") for layer in header["layers"]}
    return CachedActivations(
        acts=acts, hook_kind=header["hook_kind"], texts_hash=header["texts_hash"], position=int(header["position"])
    )
