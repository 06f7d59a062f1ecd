"""A tiny randomly initialised Llama and a byte-level BPE tokenizer with a ChatML template, built in-process.

Every unit test runs on this model: no download, deterministic weights, and the offline category
set's refusal tokens already added.
"""

from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
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
