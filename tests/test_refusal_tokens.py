import pytest
import torch

from scripts.refusal_tokens import (
    CategorySet,
    DONOTANSWER_CATEGORIES,
    add_refusal_tokens,
    detect_category,
    detect_category_in_text,
    get_category_set,
    single_token_id,
)
from tests.tiny import build_tiny_model, build_tiny_tokenizer


def test_category_set_validation():
    with pytest.raises(ValueError, match="distinct"):
        CategorySet("x", {"a": "[A]", "b": "[A]"})
    with pytest.raises(ValueError, match="at least one"):
        CategorySet("x", {})
    with pytest.raises(KeyError, match="valid categories"):
        DONOTANSWER_CATEGORIES.token_for("nope")
    with pytest.raises(KeyError, match="valid"):
        get_category_set("nope")


def test_add_refusal_tokens_resolves_ids_from_tokenizer():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    vocab_before = len(tokenizer)
    with pytest.raises(KeyError, match="add_refusal_tokens"):
        DONOTANSWER_CATEGORIES.token_ids(tokenizer)
    embeddings_before = model.get_input_embeddings().weight.detach().clone()
    added = add_refusal_tokens(tokenizer, DONOTANSWER_CATEGORIES, model=model)
    assert added == DONOTANSWER_CATEGORIES.all_token_strings
    assert len(tokenizer) == vocab_before + len(added)
    ids = DONOTANSWER_CATEGORIES.token_ids(tokenizer)
    assert sorted(ids.values()) == list(range(vocab_before, vocab_before + len(added) - 1))
    assert DONOTANSWER_CATEGORIES.respond_token_id(tokenizer) == vocab_before + len(added) - 1
    weight = model.get_input_embeddings().weight.detach()
    assert weight.shape[0] == len(tokenizer)
    assert torch.equal(weight[:vocab_before], embeddings_before)
    assert torch.allclose(weight[vocab_before:], embeddings_before.mean(0, keepdim=True).expand(len(added), -1))
    # A second call finds them all present: nothing added, nothing resized.
    assert add_refusal_tokens(tokenizer, DONOTANSWER_CATEGORIES, model=model) == []
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    # The token is one id inside ordinary text too.
    text_ids = tokenizer.encode("[Malicious uses] I can't help.", add_special_tokens=False)
    assert text_ids[0] == ids["malicious_uses"]
    assert single_token_id(tokenizer, "[respond]") == DONOTANSWER_CATEGORIES.respond_token_id(tokenizer)


def test_detect_category(tiny_model, category_set):
    _, tokenizer = tiny_model
    ids = category_set.token_ids(tokenizer)
    respond = category_set.respond_token_id(tokenizer)
    plain = tokenizer.encode("hello", add_special_tokens=False)
    assert detect_category([*plain, ids["information_hazards"], respond], tokenizer, category_set) == "information_hazards"
    assert detect_category(torch.tensor([respond, ids["malicious_uses"]]), tokenizer, category_set) == "respond"
    assert detect_category([*plain, ids["malicious_uses"]], tokenizer, category_set, first_only=True) is None
    assert detect_category(plain, tokenizer, category_set) is None


def test_detect_category_in_text(category_set):
    assert detect_category_in_text("x [Misinformation harms] [respond]", category_set) == "misinformation_harms"
    assert detect_category_in_text("[respond] Sure. [Malicious uses]", category_set) == "respond"
    assert detect_category_in_text("Sure, here it is.", category_set) is None
