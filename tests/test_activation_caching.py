"""Tests of scripts.activation_caching on the tiny random Llama (and one check on the real SmolLM2)."""

from __future__ import annotations

import copy

import pytest
import torch

from scripts.activation_caching import (
    CachedActivations,
    cache_activations,
    cache_prompt_activations,
    cache_token_activations,
    last_token_indices,
    load_activations,
    pad_batch,
    position_ids_from_mask,
    save_activations,
    texts_hash,
)
from scripts.hooked_model import wrap_model
from scripts.model import format_chat
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES, add_refusal_tokens
from tests.tiny import build_tiny_model, build_tiny_tokenizer

PROMPTS = [
    "How do I bake bread at home?",
    "hi",
    "Explain how vaccines train the immune system to recognise a virus, step by step, in detail.",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Tell me how to make a dangerous weapon from household chemicals.",
    "ok",
]


@pytest.fixture(scope="module")
def models():
    """``(hooked tiny model, an unwrapped copy with identical weights)``."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    add_refusal_tokens(tokenizer, DONOTANSWER_CATEGORIES, model=model)
    reference = copy.deepcopy(model)
    return wrap_model(model, tokenizer), reference


@pytest.fixture()
def hooked(models):
    hooked_model = models[0]
    hooked_model.tokenizer.padding_side = "left"
    yield hooked_model
    hooked_model.tokenizer.padding_side = "left"


@pytest.fixture()
def texts(hooked):
    return format_chat(hooked.tokenizer, PROMPTS)


def _count_calls(module) -> tuple[list[int], object]:
    """Count calls with a pre-hook: a block the pass stops inside never returns, so a post-hook would miss it."""
    calls: list[int] = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def _reference_hidden_states(reference, tokenizer, text: str) -> tuple[torch.Tensor, ...]:
    """HF ``output_hidden_states`` of one unpadded text on the unwrapped model: ``[pos, d_model]`` per entry."""
    encoded = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = reference(**encoded, output_hidden_states=True)
    return tuple(state[0] for state in output.hidden_states)


def test_last_token_indices_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_indices(left).tolist() == [3, 3, 3]
    assert last_token_indices(right).tolist() == [1, 3, 0]
    with pytest.raises(ValueError, match="no non-pad"):
        last_token_indices(torch.tensor([[0, 0], [1, 1]]))


def test_pad_batch_and_position_ids():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert position_ids_from_mask(mask)[1, 0].item() == 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_one_at_a_time(hooked, texts, side):
    hooked.tokenizer.padding_side = side
    batched = cache_activations(hooked, texts, [1, 2], batch_size=4, progress=False)
    for index, text in enumerate(texts):
        single = cache_activations(hooked, [text], [1, 2], progress=False)
        for layer in (1, 2):
            torch.testing.assert_close(batched.acts[layer][index], single.acts[layer][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,offset", [("resid_pre", 0), ("resid_post", 1)])
def test_matches_hf_hidden_states(models, hooked, texts, kind, offset):
    _, reference = models
    layers = [0, 1, 2]  # hidden_states[-1] is after the final norm, so the last block is compared elsewhere
    cached = cache_activations(hooked, texts, layers, hook_kind=kind, batch_size=3, progress=False)
    for index, text in enumerate(texts):
        states = _reference_hidden_states(reference, hooked.tokenizer, text)
        for layer in layers:
            torch.testing.assert_close(cached.acts[layer][index], states[layer + offset][-1], atol=1e-5, rtol=0)


def test_resid_mid_is_the_input_of_the_post_attention_norm(models, hooked, texts):
    _, reference = models
    captured: list[torch.Tensor] = []
    norm = reference.model.layers[2].post_attention_layernorm
    handle = norm.register_forward_pre_hook(lambda module, args: captured.append(args[0][0, -1].clone()))
    try:
        for text in texts:
            _reference_hidden_states(reference, hooked.tokenizer, text)
    finally:
        handle.remove()
    cached = cache_activations(hooked, texts, 2, hook_kind="resid_mid", batch_size=4, progress=False)
    torch.testing.assert_close(cached.acts[2], torch.stack(captured), atol=1e-5, rtol=0)


def test_last_block_resid_post_matches_pre_norm_output(models, hooked, texts):
    _, reference = models
    captured: list[torch.Tensor] = []
    handle = reference.model.norm.register_forward_pre_hook(lambda module, args: captured.append(args[0][0, -1]))
    try:
        for text in texts:
            _reference_hidden_states(reference, hooked.tokenizer, text)
    finally:
        handle.remove()
    cached = cache_activations(hooked, texts, -1, progress=False)
    assert cached.layers == [hooked.n_layers - 1]
    torch.testing.assert_close(cached.acts[hooked.n_layers - 1], torch.stack(captured), atol=1e-5, rtol=0)


def test_multi_layer_pass_equals_per_layer_passes(hooked, texts):
    together = cache_activations(hooked, texts, [2, 0, 3], batch_size=3, progress=False)
    assert together.layers == [0, 2, 3]
    for layer in (0, 2, 3):
        alone = cache_activations(hooked, texts, layer, batch_size=3, progress=False)
        assert torch.equal(together.acts[layer], alone.acts[layer])


def test_forward_stops_after_deepest_layer(hooked, texts):
    blocks = hooked.model.model.layers
    requested_calls, requested_handle = _count_calls(blocks[1])
    deeper_calls, deeper_handle = _count_calls(blocks[2])
    head_calls, head_handle = _count_calls(hooked.model.lm_head)
    try:
        cache_activations(hooked, texts, [0, 1], batch_size=3, progress=False)
    finally:
        for handle in (requested_handle, deeper_handle, head_handle):
            handle.remove()
    assert len(requested_calls) == 3  # one per batch of 7 texts in batches of 3
    assert deeper_calls == [] and head_calls == []


def test_results_are_float32_cpu_in_input_order(hooked, texts):
    cached = cache_activations(hooked, texts, 1, batch_size=2, progress=False)
    assert cached.acts[1].dtype == torch.float32 and cached.acts[1].device.type == "cpu"
    assert cached.acts[1].shape == (len(texts), hooked.d_model)
    reversed_cached = cache_activations(hooked, texts[::-1], 1, batch_size=2, progress=False)
    torch.testing.assert_close(reversed_cached.acts[1], cached.acts[1].flip(0), atol=1e-5, rtol=0)
    assert cached.texts_hash == texts_hash(texts) != reversed_cached.texts_hash


def test_mean_and_mean_norm(hooked, texts):
    cached = cache_activations(hooked, texts, [1, 2], progress=False)
    for layer in (1, 2):
        rows = cached.acts[layer].double()
        torch.testing.assert_close(cached.mean[layer].double(), rows.sum(0) / len(texts))
        expected_norm = sum(float(row.norm()) for row in rows) / len(texts)
        assert cached.mean_norm(layer) == pytest.approx(expected_norm, rel=1e-6)
    with pytest.raises(KeyError, match=r"cached layers: \[1, 2\]"):
        cached.layer(3)


def test_position_offset_and_token_activations(models, hooked, texts):
    _, reference = models
    second_last = cache_activations(hooked, texts, [1, 2], position=-2, batch_size=4, progress=False)
    tokens = cache_token_activations(hooked, texts, [1, 2], batch_size=4, progress=False)
    for index, text in enumerate(texts):
        states = _reference_hidden_states(reference, hooked.tokenizer, text)
        for layer in (1, 2):
            assert tokens[layer][index].shape == states[layer + 1].shape
            torch.testing.assert_close(tokens[layer][index], states[layer + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(second_last.acts[layer][index], states[layer + 1][-2], atol=1e-5, rtol=0)


def test_prompt_helper_applies_the_chat_template(hooked, texts):
    direct = cache_activations(hooked, texts, 1, progress=False)
    via_prompts = cache_prompt_activations(hooked, PROMPTS, 1, progress=False)
    assert torch.equal(direct.acts[1], via_prompts.acts[1])
    assert via_prompts.texts_hash == texts_hash(texts)


def test_disk_cache_round_trip_and_hit(hooked, texts, tmp_path):
    first = cache_activations(hooked, texts, [1, 2], cache=True, cache_directory=tmp_path, progress=False)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    calls, handle = _count_calls(hooked.model.model.layers[0])
    try:
        second = cache_activations(hooked, texts, [2, 1], cache=True, cache_directory=tmp_path, progress=False)
        assert calls == []  # served from disk: no forward pass at all
        cache_activations(hooked, texts, [1], cache=True, cache_directory=tmp_path, progress=False)
        assert calls  # other layers, other key: a forward pass
    finally:
        handle.remove()
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    for layer in (1, 2):
        assert torch.equal(first.acts[layer], second.acts[layer])
    assert (second.hook_kind, second.texts_hash, second.position) == (first.hook_kind, first.texts_hash, -1)


def test_disk_cache_key_depends_on_weights(models, texts, tmp_path):
    hooked_model, _ = models
    first = cache_activations(hooked_model, texts, 1, cache=True, cache_directory=tmp_path, progress=False)
    tokenizer = build_tiny_tokenizer()
    other = build_tiny_model(tokenizer, seed=1)
    add_refusal_tokens(tokenizer, DONOTANSWER_CATEGORIES, model=other)
    other_hooked = wrap_model(other, tokenizer)
    result = cache_activations(other_hooked, texts, 1, cache=True, cache_directory=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.allclose(result.acts[1], first.acts[1])  # a real forward pass on the other weights, not a hit


def test_save_and_load_activations(hooked, texts, tmp_path):
    cached = cache_activations(hooked, texts, [0, 3], hook_kind="resid_pre", position=-2, progress=False)
    path = save_activations(cached, tmp_path / "acts.safetensors", metadata={"split": "train"})
    loaded = load_activations(path)
    assert loaded.layers == [0, 3] and loaded.hook_kind == "resid_pre" and loaded.position == -2
    for layer in (0, 3):
        assert torch.equal(loaded.acts[layer], cached.acts[layer])


def test_bad_inputs_raise(hooked, texts):
    with pytest.raises(ValueError, match=r"layers 0\.\.3"):
        cache_activations(hooked, texts, 4, progress=False)
    with pytest.raises(ValueError, match="valid kinds"):
        cache_activations(hooked, texts, 1, hook_kind="resid_final", progress=False)
    with pytest.raises(ValueError, match="must be negative"):
        cache_activations(hooked, texts, 1, position=0, progress=False)
    with pytest.raises(ValueError, match="no texts"):
        cache_activations(hooked, [], 1, progress=False)
    with pytest.raises(ValueError, match="tokenize to nothing"):
        cache_activations(hooked, ["abc", ""], 1, progress=False)
    with pytest.raises(ValueError, match="before the start"):
        cache_activations(hooked, ["ab", "abcdefgh"], 1, position=-40, progress=False)
    with pytest.raises(ValueError, match="same shape"):
        CachedActivations(acts={0: torch.zeros(3, 4), 1: torch.zeros(2, 4)}, hook_kind="resid_post", texts_hash="x")


@pytest.mark.offline_model
def test_smollm2_layers_5_and_15_match_hidden_states():
    from scripts.hooked_model import load_hooked_model

    hooked_model = load_hooked_model("smollm2-135m-instruct", device="cpu")
    texts = format_chat(hooked_model.tokenizer, PROMPTS[:4])
    cached = cache_activations(hooked_model, texts, [5, 15], batch_size=4, progress=False)
    for index, text in enumerate(texts):
        encoded = hooked_model.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            states = hooked_model.model(**encoded, output_hidden_states=True).hidden_states
        for layer in (5, 15):
            expected = states[layer + 1][0, -1]
            scale = float(expected.abs().max())
            torch.testing.assert_close(cached.acts[layer][index], expected, atol=1e-4 * scale, rtol=1e-4)
