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
