"""Tiny randomly initialised chat models and byte-level BPE tokenizers, built in-process.

Most unit tests run on the tiny Llama (:func:`build_tiny_model`, :func:`build_tiny_tokenizer`, ChatML).
:func:`build_tiny_family` builds one tiny model per family of :data:`FAMILIES` with the traits that set
the family apart, so the method's core steps are checked on each (``tests/test_model_families.py``):

* ``llama``: the tiny Llama above (tied embeddings, grouped-query attention, ChatML);
* ``qwen2``: q/k/v biases, untied input and output embeddings, ChatML with Qwen's default system turn;
* ``gemma3``: text-only Gemma 3 (embeddings scaled by sqrt(d_model), ``(1 + w)`` RMSNorms, norms
  before and after both the attention and the MLP, query/key norms, sliding-window layers interleaved
  with global ones, tied embeddings), a BOS token and Gemma 3's chat template, which has no system role
  and folds a system message into the first user turn.

No download, deterministic weights; refusal tokens are not added here.
"""

from __future__ import annotations

import torch

FAMILIES: tuple[str, ...] = ("llama", "qwen2", "gemma3")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN_SYSTEM_PROMPT = "You are a helpful assistant."

QWEN_CHAT_TEMPLATE = (
    # Qwen2's template: ChatML that opens with its default system turn when the messages bring none.
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + QWEN_SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
) + CHATML_TEMPLATE

GEMMA_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
"""Gemma's own special tokens, in its order (pad 0, eos 1, bos 2, unk 3)."""

GEMMA3_CHAT_TEMPLATE = (
    # Gemma 3's template (google/gemma-3-1b-it) without its image and tool parts: no system role; a system
    # message becomes a prefix of the first user turn, followed by a blank line.
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_TRAINING_TEXT = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, then knead and bake.",
    "Explain how vaccines train the immune system to recognise a virus.",
    "Write a short poem about the sea and the moon.",
    "How can I hack into my neighbour's wifi network without a password?",
    "Tell me how to make a dangerous weapon from household chemicals.",
    "What is the capital of France? The capital of France is Paris.",
    "I cannot help with that request. I'm sorry, but I won't assist with this.",
    "Sure, here is a recipe. First, preheat the oven to 200 degrees.",
]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (vocabulary ~400) with ChatML special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    backend = _train_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_model(tokenizer, num_layers: int = 4, hidden_size: int = 64, seed: int = 0):
    """A randomly initialised Llama sized to ``tokenizer``'s vocabulary, in eval mode (float32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    model.config.name_or_path = "tiny-random-llama"
    return model


def _train_bpe(special_tokens: list[str]):
    """A byte-level BPE backend (vocabulary ~400) trained on a few sentences, with ``special_tokens`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    return backend


def build_tiny_gemma_tokenizer():
    """A byte-level BPE tokenizer with Gemma's special tokens, BOS and Gemma 3's chat template (no system role).

    As in Gemma's own tokenizer, ``<eos>`` is the EOS token and ``<end_of_turn>`` (which ends the model's
    turn) is a separate token, and BOS is added by default (the chat template writes it, so the library,
    which tokenizes formatted texts without special tokens, gets it once).
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(list(GEMMA_SPECIAL_TOKENS)),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        # What a tokenizer loaded from disk records; the bridge reads it (and, with add_bos_token set, keeps
        # this tokenizer rather than re-loading one from that name).
        name_or_path="tiny-random-gemma3",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def _family_config_kwargs(tokenizer, num_layers: int, hidden_size: int) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


GEMMA3_SLIDING_WINDOW = 8
"""Shorter than every chat-formatted test prompt, so the sliding-window layers do mask part of each one."""


def build_tiny_family(family: str, seed: int = 0, num_layers: int = 4, hidden_size: int = 64):
    """A tiny random chat model of ``family`` and its tokenizer, in eval mode (float32, CPU).

    Args:
        family: One of :data:`FAMILIES`.
        seed: Seeds the weights; the tokenizer does not depend on it.

    Returns:
        ``(model, tokenizer)``; the tokenizer pads on the left.

    Raises:
        ValueError: an unknown family (naming the valid ones).
    """
    if family == "llama":
        tokenizer = build_tiny_tokenizer()
        return build_tiny_model(tokenizer, num_layers=num_layers, hidden_size=hidden_size, seed=seed), tokenizer
    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tokenizer = build_tiny_tokenizer()
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
        config = Qwen2Config(**_family_config_kwargs(tokenizer, num_layers, hidden_size), tie_word_embeddings=False)
        model_class = Qwen2ForCausalLM
    elif family == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        tokenizer = build_tiny_gemma_tokenizer()
        # Gemma 3 interleaves five local layers with one global layer; here every other layer is global.
        layer_types = ["sliding_attention" if layer % 2 == 0 else "full_attention" for layer in range(num_layers)]
        config = Gemma3TextConfig(
            **_family_config_kwargs(tokenizer, num_layers, hidden_size),
            head_dim=hidden_size // 4,
            bos_token_id=tokenizer.bos_token_id,
            sliding_window=GEMMA3_SLIDING_WINDOW,
            layer_types=layer_types,
            tie_word_embeddings=True,
        )
        model_class = Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown model family {family!r}; valid families: {list(FAMILIES)}")
    torch.manual_seed(seed)
    model = model_class(config)
    _perturb_norms(model, seed)
    model.eval()
    model.config.name_or_path = f"tiny-random-{family}"
    return model, tokenizer


def _perturb_norms(model, seed: int) -> None:
    """Give every RMSNorm weight a random spread: freshly initialised they are all ones (Gemma: all zeros,
    meaning ``1 + 0``), which would hide a norm applied with the wrong weights or the wrong offset."""
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
