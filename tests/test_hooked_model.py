import pytest
import torch

from scripts.hooked_model import HOOK_KINDS, hook_name, parse_hook_name, validate_layer, wrap_model
from scripts.model import format_chat


def test_hook_names_and_validation():
    assert hook_name(3) == "blocks.3.hook_resid_post"
    assert hook_name(0, "resid_pre") == "blocks.0.hook_resid_pre"
    assert hook_name(-1, "resid_mid", n_layers=4) == "blocks.3.hook_resid_mid"
    assert parse_hook_name("blocks.12.hook_resid_mid") == (12, "resid_mid")
    with pytest.raises(ValueError, match=r"layers 0\.\.3"):
        hook_name(4, n_layers=4)
    with pytest.raises(ValueError, match="valid kinds"):
        hook_name(1, "resid_sideways")
    with pytest.raises(TypeError):
        validate_layer(1.5, 4)
    with pytest.raises(ValueError):
        parse_hook_name("blocks.1.attn.hook_q")


@pytest.fixture()
def hooked(tiny_model):
    model, tokenizer = tiny_model
    return wrap_model(model, tokenizer)


def test_wrap_keeps_model_and_left_padding(hooked, tiny_model):
    model, tokenizer = tiny_model
    assert hooked.bridge.original_model is model
    assert hooked.n_layers == 4 and hooked.d_model == 64
    assert tokenizer.padding_side == "left"
    with pytest.raises(ValueError, match="out of range"):
        hooked.hook_name(9)


def test_resid_hooks_read_the_hidden_states(hooked):
    tokenizer = hooked.tokenizer
    encoded = tokenizer(format_chat(tokenizer, ["hello there", "how do I bake bread"]), return_tensors="pt", padding=True)
    stored = {}

    def store(kind):
        def fn(activation, hook):
            stored[kind] = activation.detach().clone()
            return activation
        return fn

    layer = 2
    with torch.no_grad(), hooked.hooks([(hooked.hook_name(layer, kind), store(kind)) for kind in HOOK_KINDS]):
        output = hooked.model(**encoded, output_hidden_states=True)
    torch.testing.assert_close(stored["resid_pre"], output.hidden_states[layer], rtol=0, atol=0)
    torch.testing.assert_close(stored["resid_post"], output.hidden_states[layer + 1], rtol=0, atol=0)
    # resid_mid is the residual after attention: resid_pre plus the attention block's output.
    attention_output = {}
    block = hooked.model.model.layers[layer]
    handle = block.self_attn.register_forward_hook(lambda m, i, o: attention_output.setdefault("out", o[0].detach()))
    try:
        with torch.no_grad():
            hooked.model(**encoded)
    finally:
        handle.remove()
    torch.testing.assert_close(stored["resid_mid"], stored["resid_pre"] + attention_output["out"])


def test_hooks_modify_output_and_are_removed_even_on_error(hooked):
    tokenizer = hooked.tokenizer
    encoded = tokenizer(format_chat(tokenizer, ["hello"]), return_tensors="pt")
    with torch.no_grad():
        clean = hooked.model(**encoded).logits
    shift = lambda activation, hook: activation + 5.0  # noqa: E731
    with torch.no_grad(), hooked.hooks([(hooked.hook_name(1), shift)]):
        shifted = hooked.model(**encoded).logits
    assert (shifted - clean).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="boom"):
        with hooked.hooks([(hooked.hook_name(1), shift)]):
            raise RuntimeError("boom")
    with torch.no_grad():
        after = hooked.model(**encoded).logits
    torch.testing.assert_close(after, clean, rtol=0, atol=0)


def test_unknown_hook_point_raises(hooked):
    with pytest.raises(KeyError, match="unknown hook point"):
        with hooked.hooks([("blocks.1.hook_nothing", lambda a, hook: a)]):
            pass


def test_wrapped_cached_generation_equals_plain_generation(tiny_model):
    from scripts.model import generate_ids
    from scripts.refusal_tokens import DONOTANSWER_CATEGORIES, add_refusal_tokens
    from tests.tiny import build_tiny_model, build_tiny_tokenizer

    model, tokenizer = tiny_model
    texts = format_chat(tokenizer, ["hello there", "how do I bake bread at home", "x"])
    plain_tokenizer = build_tiny_tokenizer()
    plain = build_tiny_model(plain_tokenizer)
    add_refusal_tokens(plain_tokenizer, DONOTANSWER_CATEGORIES, model=plain)
    expected = generate_ids(plain, plain_tokenizer, texts, batch_size=2, max_new_tokens=8, progress=False)
    wrap_model(model, tokenizer)
    # Every cached decoding step must score like an uncached forward pass over the whole sequence.
    assert generate_ids(model, tokenizer, texts, batch_size=2, max_new_tokens=8, progress=False) == expected
    encoded = tokenizer(texts[:1], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**encoded, max_new_tokens=6, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        full = model(generated.sequences).logits
    prompt_length = encoded["input_ids"].shape[1]
    for step, scores in enumerate(generated.scores):
        torch.testing.assert_close(scores[0], full[0, prompt_length - 1 + step], atol=1e-4, rtol=1e-4)


def test_cache_argument_guard_names_the_fix(monkeypatch, tiny_model):
    from scripts.hooked_model import check_cache_argument

    model, _ = tiny_model
    attention = type(model.model.layers[0].self_attn)

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        raise AssertionError("not called")

    monkeypatch.setattr(attention, "forward", forward)
    with pytest.raises(RuntimeError, match="transformers<5.24"):
        check_cache_argument(model)


def test_wrapped_model_saves_and_reloads_the_plain_weights_and_keeps_its_hooks(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    from scripts.hooked_model import unwrapped_model

    model, tokenizer = tiny_model
    plain = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    hooked = wrap_model(model, tokenizer)
    assert set(model.state_dict()) != set(plain)  # the bridge did replace the modules in place
    with unwrapped_model(model):
        assert list(model.state_dict()) == list(plain)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert list(reloaded) == list(plain)
    for name, tensor in plain.items():
        assert torch.equal(reloaded[name], tensor), name  # stored and loaded: bit-exact
    assert reloaded["lm_head.weight"].data_ptr() == reloaded["model.embed_tokens.weight"].data_ptr()  # still tied

    # Saving restored the bridge's components: its hooks still fire inside ``model(...)``.
    encoded = tokenizer(format_chat(tokenizer, ["hello"]), return_tensors="pt")
    stored = []
    with torch.no_grad(), hooked.hooks([(hooked.hook_name(1), lambda activation, hook: stored.append(activation))]):
        output = model(**encoded, output_hidden_states=True)
    assert len(stored) == 1
    torch.testing.assert_close(stored[0], output.hidden_states[2], rtol=0, atol=0)
