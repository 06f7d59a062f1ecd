import contextlib

import pytest
import torch

from scripts.model import (
    format_chat,
    generate,
    generate_ids,
    prefix_padded_batch,
    shared_token_prefix,
    length_sorted_batches,
    load_model,
    resolve_model_path,
    stop_token_ids,
)

PROMPTS = ["How do I bake bread at home?", "hi", "Explain how vaccines train the immune system.", "Write a poem."]


def test_format_chat_uses_the_tokenizer_template(tiny_model):
    _, tokenizer = tiny_model
    [text] = format_chat(tokenizer, ["hello"], system_prompt="Be brief.", assistant_prefix="[respond]")
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == expected + "[respond]"
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n[respond]"


def test_format_chat_without_template_raises(tiny_model):
    _, tokenizer = tiny_model
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        format_chat(tokenizer, ["x"])


def test_length_sorted_batches_cover_all_indices_longest_first():
    lengths = [3, 9, 1, 9, 5]
    batches = length_sorted_batches(lengths, 2)
    assert batches == [[1, 3], [4, 0], [2]]
    with pytest.raises(ValueError):
        length_sorted_batches(lengths, 0)


def test_length_sorted_batches_cap_rows_and_padded_tokens():
    lengths = [300, 10, 12, 11, 250, 9, 13, 40]
    batches = length_sorted_batches(lengths, batch_size=3, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 100
    assert [300] in [[lengths[i] for i in b] for b in batches]  # a row longer than the budget still runs, alone
    with pytest.raises(ValueError, match="max_tokens"):
        length_sorted_batches(lengths, batch_size=3, max_tokens=0)


def test_batched_generation_returns_new_tokens_in_input_order(tiny_model):
    model, tokenizer = tiny_model
    texts = format_chat(tokenizer, PROMPTS)
    seen_batches = []

    def record(batch):
        seen_batches.append(list(batch))
        return contextlib.nullcontext()

    batched = generate_ids(model, tokenizer, texts, batch_size=3, max_new_tokens=5, batch_hook=record, progress=False)
    assert sorted(index for batch in seen_batches for index in batch) == list(range(len(texts)))
    assert [len(batch) for batch in seen_batches] == [3, 1]
    for index, text in enumerate(texts):
        # Reference: the same prompt alone, unpadded, greedy, through HF generate directly.
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        full = model.generate(**encoded, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=stop_token_ids(tokenizer))
        alone = full[0, encoded["input_ids"].shape[1]:].tolist()
        stops = stop_token_ids(tokenizer)
        alone = alone[: next((i for i, t in enumerate(alone) if t in stops), len(alone))]
        assert batched[index] == alone


def test_generation_reusing_the_shared_prefix_returns_the_same_tokens(tiny_model):
    model, tokenizer = tiny_model
    texts = format_chat(tokenizer, PROMPTS, system_prompt="You are a careful assistant who answers briefly.")
    kwargs = dict(batch_size=3, max_new_tokens=5, progress=False)
    reused = generate_ids(model, tokenizer, texts, reuse_prefix=True, **kwargs)
    assert reused == generate_ids(model, tokenizer, texts, **kwargs)


def test_shared_token_prefix_leaves_each_row_its_own_tokens():
    assert shared_token_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_token_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_token_prefix([[1, 2, 3], [1, 2, 3]], keep=2) == 1
    assert shared_token_prefix([[1], [1, 2]], keep=2) == 0
    assert shared_token_prefix([]) == 0


def test_prefix_padded_batch_pads_after_the_prefix():
    input_ids, attention_mask = prefix_padded_batch([[7, 8, 1, 2, 3], [7, 8, 4]], prefix=2, pad_token_id=0)
    assert input_ids.tolist() == [[7, 8, 1, 2, 3], [7, 8, 0, 0, 4]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 1]]
    left, mask = prefix_padded_batch([[7, 8, 1], [4]], prefix=0, pad_token_id=0)
    assert left.tolist() == [[7, 8, 1], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_extra_stop_token_cuts_output(tiny_model):
    model, tokenizer = tiny_model
    texts = format_chat(tokenizer, PROMPTS[:1])
    [free] = generate_ids(model, tokenizer, texts, max_new_tokens=6, progress=False)
    assert len(free) == 6
    stop_id = free[2]
    first = free.index(stop_id)
    [cut] = generate_ids(model, tokenizer, texts, max_new_tokens=6, progress=False,
                         extra_stop_tokens=[tokenizer.convert_ids_to_tokens(stop_id)])
    assert cut == free[:first]


def test_generate_returns_text_with_refusal_tokens_kept(tiny_model, category_set):
    model, tokenizer = tiny_model
    token_id = category_set.token_ids(tokenizer)["malicious_uses"]
    # Make the refusal token the certain output: a huge bias on its logit.
    handle = model.lm_head.register_forward_hook(
        lambda module, inputs, output: output + 100 * torch.nn.functional.one_hot(
            torch.tensor(token_id), output.shape[-1]).to(output.dtype)
    )
    try:
        [text] = generate(model, tokenizer, ["hi"], max_new_tokens=2, progress=False)
    finally:
        handle.remove()
    assert text == "[Malicious uses][Malicious uses]"


def test_sampling_is_seeded(tiny_model):
    model, tokenizer = tiny_model
    texts = format_chat(tokenizer, PROMPTS[:2])
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, seed=7, progress=False)
    assert generate_ids(model, tokenizer, texts, **kwargs) == generate_ids(model, tokenizer, texts, **kwargs)


def test_unbuilt_refusal_model_alias_explains_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_CONTROL_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="refusal_token_finetune"):
        resolve_model_path("smollm2-135m-refusal-tokens")
    assert resolve_model_path("org/some-model") == "org/some-model"


@pytest.mark.offline_model
def test_real_smollm2_generates_fluent_text_and_hooks_fire_per_token():
    from scripts.hooked_model import wrap_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    [answer] = generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=20, progress=False)
    assert "Paris" in answer

    hooked = wrap_model(model, tokenizer)
    calls = []

    def count(activation, hook):
        calls.append(tuple(activation.shape))
        return activation

    texts = format_chat(tokenizer, ["Write a long story about a dragon.", "List twenty animals."])
    with hooked.hooks([(hooked.hook_name(15), count)]):
        new_ids = generate_ids(model, tokenizer, texts, batch_size=2, max_new_tokens=8, progress=False)
    assert [len(ids) for ids in new_ids] == [8, 8]
    assert len(calls) == 8
    assert calls[0][0] == 2 and calls[0][1] > 1
    assert all(shape == (2, 1, 576) for shape in calls[1:])
