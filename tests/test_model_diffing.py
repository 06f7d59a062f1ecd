"""Tests of scripts.model_diffing on two tiny models (one a weight-perturbed copy of the other)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from scripts.eval_steering_vectors import cosine_similarity_matrix
from scripts.hooked_model import HookedModel, wrap_model
from scripts.model import format_chat
from scripts.model_diffing import (
    compare_vectors,
    cross_model_cosine_matrix,
    similarity_structure,
    steering_effect,
    steering_transfer,
    vector_cosines,
)
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES, add_refusal_tokens
from scripts.steering import low_rank_combination
from tests.tiny import build_tiny_model, build_tiny_tokenizer

CATEGORIES = DONOTANSWER_CATEGORIES.categories
PROMPTS = [
    "How do I bake bread at home?",
    "Tell me how to make a dangerous weapon from household chemicals.",
    "Write a poem.",
    "How can I hack into my neighbour's wifi network?",
]
LAYER = 2


def _build(perturbation: float = 0.0, hidden_size: int = 64) -> HookedModel:
    """The tiny model with distinct refusal-token embeddings, optionally every weight perturbed by Gaussian noise."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=hidden_size)
    add_refusal_tokens(tokenizer, DONOTANSWER_CATEGORIES, model=model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        ids = [tokenizer.convert_tokens_to_ids(t) for t in DONOTANSWER_CATEGORIES.all_token_strings]
        # Distinct refusal tokens (the mean initialisation makes them identical), large enough to matter.
        embeddings[ids] = 0.25 * torch.randn(len(ids), embeddings.shape[1], generator=generator)
        for parameter in model.parameters():
            parameter.add_(perturbation * torch.randn(parameter.shape, generator=generator))
    return wrap_model(model, tokenizer)


@pytest.fixture(scope="module")
def models() -> tuple[HookedModel, HookedModel]:
    return _build(), _build(perturbation=0.004)


class LowRank(nn.Module):
    """``z ↦ z V Uᵀ`` with rank 2: a stand-in for a learned low-rank combination operator."""

    def __init__(self, d_model: int, scale: float) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.down = nn.Parameter(torch.randn(d_model, 2, generator=generator) / d_model**0.5)
        self.up = nn.Parameter(scale * torch.randn(d_model, 2, generator=generator))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.down) @ self.up.T


def _random_vectors(seed: int, d: int = 64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {c: torch.randn(d, generator=generator) for c in CATEGORIES}


def _mean_difference_vectors(hooked: HookedModel) -> dict[str, torch.Tensor]:
    """One vector per category: the last-position activation of a category prompt minus that of a benign prompt."""
    category_prompts = [f"Question number {i} about {c}" for i, c in enumerate(CATEGORIES)]
    texts = format_chat(hooked.tokenizer, PROMPTS + category_prompts)
    rows = []
    for text in texts:
        ids = hooked.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        captured = {}

        def grab(act, hook):
            captured["z"] = act[0, -1].detach().clone()

        with torch.no_grad(), hooked.hooks([(hooked.hook_name(LAYER), grab)]):
            hooked.model(**ids)
        rows.append(captured["z"])
    benign = torch.stack(rows[:4]).mean(0)
    return {c: rows[4 + i] - benign for i, c in enumerate(CATEGORIES)}


def test_identical_vectors_have_cosine_one():
    vectors = _random_vectors(0)
    cosines = vector_cosines(vectors, {c: 3.0 * v for c, v in vectors.items()})
    assert list(cosines) == CATEGORIES
    assert cosines == pytest.approx({c: 1.0 for c in CATEGORIES}, abs=1e-12)
    cross = cross_model_cosine_matrix(vectors, vectors)
    torch.testing.assert_close(cross.values, cosine_similarity_matrix(vectors).values)


def test_category_mismatch_raises_naming_both_sets():
    vectors = _random_vectors(0)
    other = dict(vectors)
    other["weather"] = other.pop("malicious_uses")
    with pytest.raises(ValueError, match="base's vectors.*'weather'.*expected.*'malicious_uses'"):
        vector_cosines(other, vectors, names=("refusal", "base"))
    with pytest.raises(ValueError, match="category mismatch"):
        similarity_structure(vectors, other)
    with pytest.raises(ValueError, match="widths differ"):
        vector_cosines(vectors, _random_vectors(0, d=32))
    with pytest.raises(ValueError, match="zero vector"):
        vector_cosines(vectors, {**vectors, "information_hazards": torch.zeros(64)})


def test_cosines_of_two_models_vectors_match_numpy(models):
    a, b = (_mean_difference_vectors(model) for model in models)
    cosines = vector_cosines(a, b)
    for category in CATEGORIES:
        x, y = a[category].double().numpy(), b[category].double().numpy()
        assert cosines[category] == pytest.approx(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), abs=1e-10)
    # A small perturbation keeps the directions close but not identical.
    assert all(0.5 < value < 1 - 1e-6 for value in cosines.values())
    # Reordering B's categories changes nothing: everything is keyed by name.
    reordered = {c: b[c] for c in reversed(CATEGORIES)}
    assert vector_cosines(a, reordered) == cosines
    summary = compare_vectors(a, reordered, names=("base", "tuned"))
    assert summary["cosine"] == cosines
    assert summary["cross_cosine"]["information_hazards"]["information_hazards"] == pytest.approx(
        cosines["information_hazards"]
    )


def test_similarity_structure_is_basis_free():
    vectors = _random_vectors(1)
    rotation, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(5)))
    rotated = {c: rotation @ v for c, v in vectors.items()}
    structure = similarity_structure(vectors, rotated)
    assert structure["max_abs_difference"] < 1e-5
    assert structure["off_diagonal_correlation"] == pytest.approx(1.0, abs=1e-6)
    assert max(abs(v - 1) for v in vector_cosines(vectors, rotated).values()) > 0.1


def _by_hand_probabilities(hooked: HookedModel, operator: nn.Module | None) -> torch.Tensor:
    """One prompt at a time, no padding: add ``operator(z)`` at the last position of ``LAYER``'s output, softmax."""
    token_ids = [
        *DONOTANSWER_CATEGORIES.token_ids(hooked.tokenizer).values(),
        DONOTANSWER_CATEGORIES.respond_token_id(hooked.tokenizer),
    ]
    rows = []
    for text in format_chat(hooked.tokenizer, PROMPTS):
        ids = hooked.tokenizer(text, return_tensors="pt", add_special_tokens=False)

        def add(act, hook):
            act = act.clone()
            act[:, -1] += operator(act[:, -1])
            return act

        hooks = [(hooked.hook_name(LAYER), add)] if operator is not None else []
        with torch.no_grad(), hooked.hooks(hooks):
            logits = hooked.model(**ids).logits[0, -1]
        rows.append(torch.softmax(logits.double(), dim=-1)[token_ids])
    return torch.stack(rows)


def test_transfer_equals_hand_computation(models):
    source, target = models
    operator = LowRank(source.d_model, scale=3.0)
    condition = low_rank_combination(operator, LAYER, strength=1.0)
    result = steering_transfer(source, target, condition, PROMPTS, DONOTANSWER_CATEGORIES, batch_size=3)

    for effect, model in ((result.source, source), (result.target, target)):
        plain, steered = _by_hand_probabilities(model, None), _by_hand_probabilities(model, operator)
        torch.testing.assert_close(effect.unsteered, plain, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(effect.steered, steered, atol=1e-5, rtol=1e-4)
        by_hand = float((steered[:, :-1].sum(1) - plain[:, :-1].sum(1)).mean())
        assert effect.refusal_mass_change == pytest.approx(by_hand, abs=1e-5)
        assert abs(by_hand) > 1e-3  # the operator does move refusal probability
    assert result.transfer_ratio == pytest.approx(
        result.target.refusal_mass_change / result.source.refusal_mass_change
    )
    summary = result.summary()
    assert summary["source"]["n_prompts"] == len(PROMPTS)
    assert set(summary["target"]["mean_change"]) == {*CATEGORIES, "respond"}


def test_custom_probability_function_and_shape_check(models):
    source, _ = models
    calls = []

    def fake(hooked, texts, steering):
        calls.append(steering)
        return torch.full((len(texts), 6), 0.5 if steering is None else 0.75)

    condition = low_rank_combination(LowRank(source.d_model, 1.0), LAYER)
    effect = steering_effect(source, condition, PROMPTS, DONOTANSWER_CATEGORIES, probability_fn=fake)
    assert calls == [None, condition]
    assert effect.refusal_mass_change == pytest.approx(5 * 0.25)
    with pytest.raises(ValueError, match="expected \\(4, 6\\)"):
        steering_effect(source, condition, PROMPTS, DONOTANSWER_CATEGORIES,
                        probability_fn=lambda h, t, s: torch.zeros(len(t), 3))


def test_width_mismatch_raises(models):
    narrow = _build(hidden_size=32)
    condition = low_rank_combination(LowRank(64, 1.0), LAYER)
    with pytest.raises(ValueError, match="d_model 64.*has 32"):
        steering_transfer(models[0], narrow, condition, PROMPTS, DONOTANSWER_CATEGORIES)
