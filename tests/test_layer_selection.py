"""The layer × strength sweep against a brute-force reference (each prompt steered alone)."""

from __future__ import annotations

import pytest
import torch

from scripts import steering
from scripts.layer_selection import best_cell, objective, sweep_layers
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES as CATEGORIES
from tests.tiny_steering import PROMPTS, build_hooked_tiny, tiny_texts

HARMFUL = (PROMPTS[1], PROMPTS[3])
BENIGN = (PROMPTS[0], PROMPTS[2], PROMPTS[4])
LAYERS = [0, 2, -1]
STRENGTHS = [0.0, 0.05, 0.3]


@pytest.fixture(scope="module")
def hooked():
    return build_hooked_tiny()


def _vectors(hooked, layer: int) -> dict[str, torch.Tensor]:
    """Per layer: each category's unembedding direction mixed with layer-specific noise."""
    generator = torch.Generator().manual_seed(100 + layer)
    ids = CATEGORIES.token_ids(hooked.tokenizer)
    weight = hooked.model.get_output_embeddings().weight.detach()
    vectors = {}
    for category in CATEGORIES.categories:
        direction = weight[ids[category]] / weight[ids[category]].norm()
        vectors[category] = direction + 0.5 * torch.randn(hooked.d_model, generator=generator) / hooked.d_model**0.5
    return vectors


def _single_probabilities(hooked, text: str) -> torch.Tensor:
    ids = [CATEGORIES.token_ids(hooked.tokenizer)[c] for c in CATEGORIES.categories]
    ids.append(CATEGORIES.respond_token_id(hooked.tokenizer))
    encoded = hooked.tokenizer([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return torch.softmax(hooked.model(**encoded).logits[0, -1], dim=-1)[ids]


def test_sweep_returns_every_cell_and_matches_the_brute_force_reference(hooked):
    harmful, benign = tiny_texts(hooked, HARMFUL), tiny_texts(hooked, BENIGN)
    vectors = {layer: _vectors(hooked, layer) for layer in (0, 2, hooked.n_layers - 1)}
    harmful_labels = [CATEGORIES.categories[3], None]
    table = sweep_layers(hooked, harmful, benign, CATEGORIES, LAYERS, STRENGTHS, vectors,
                         harmful_categories=harmful_labels, benign_strength_ratio=1.5, batch_size=2, progress=False)
    assert [(c["layer"], c["strength"]) for c in table] == [(l, s) for l in (0, 2, 3) for s in STRENGTHS]

    unsteered = torch.stack([_single_probabilities(hooked, t) for t in harmful + benign])
    guessed = [CATEGORIES.categories[int(i)] for i in unsteered[:, :-1].argmax(dim=-1)]
    categories = [harmful_labels[0], guessed[1]] + guessed[2:]
    reference = []
    for layer in (0, 2, 3):
        for strength in STRENGTHS:
            rows, misrouted_rows = [], []
            for index, text in enumerate(harmful + benign):
                signed = strength if index < len(harmful) else -1.5 * strength
                with steering.steer(hooked, layer, vectors[layer][categories[index]], signed):
                    rows.append(_single_probabilities(hooked, text))
                if index < len(harmful):
                    with steering.steer(hooked, layer, vectors[layer][categories[index]], -1.5 * strength):
                        misrouted_rows.append(_single_probabilities(hooked, text))
            probabilities = torch.stack(rows)
            harmful_refusal = float(probabilities[: len(harmful), :-1].sum(dim=-1).mean())
            benign_respond = float(probabilities[len(harmful) :, -1].mean())
            misrouted = float(torch.stack(misrouted_rows)[:, :-1].sum(dim=-1).mean())
            reference.append((harmful_refusal, benign_respond, misrouted,
                              objective(harmful_refusal, benign_respond, misrouted)))
    for cell, (harmful_refusal, benign_respond, misrouted, value) in zip(table, reference):
        assert cell["harmful_refusal"] == pytest.approx(harmful_refusal, abs=1e-5)
        assert cell["benign_respond"] == pytest.approx(benign_respond, abs=1e-6)
        assert cell["misrouted_harmful_refusal"] == pytest.approx(misrouted, abs=1e-5)
        assert cell["objective"] == pytest.approx(value, abs=1e-5)
    best = best_cell(table)
    index = max(range(len(reference)), key=lambda i: reference[i][2])
    assert (best["layer"], best["strength"]) == (table[index]["layer"], table[index]["strength"])
    assert best["objective"] == max(c["objective"] for c in table)
    assert len({round(c["objective"], 4) for c in table}) > 3  # the cells really differ


def test_vectors_from_a_callable_and_clear_errors(hooked):
    harmful, benign = tiny_texts(hooked, HARMFUL), tiny_texts(hooked, BENIGN)
    from_callable = sweep_layers(hooked, harmful, benign, CATEGORIES, [1], [0.1], lambda layer: _vectors(hooked, layer),
                                 progress=False)
    from_mapping = sweep_layers(hooked, harmful, benign, CATEGORIES, [1], [0.1], {1: _vectors(hooked, 1)},
                                progress=False)
    assert from_callable == from_mapping
    with pytest.raises(KeyError, match="layers with vectors"):
        sweep_layers(hooked, harmful, benign, CATEGORIES, [2], [0.1], {1: _vectors(hooked, 1)}, progress=False)
    with pytest.raises(KeyError, match="expected"):
        sweep_layers(hooked, harmful, benign, CATEGORIES, [1], [0.1], {1: {"x": torch.zeros(hooked.d_model)}},
                     progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        sweep_layers(hooked, harmful, benign, CATEGORIES, [1], [-1.0], {1: _vectors(hooked, 1)}, progress=False)
    with pytest.raises(KeyError, match="valid categories"):
        sweep_layers(hooked, harmful, benign, CATEGORIES, [1], [0.1], {1: _vectors(hooked, 1)},
                     harmful_categories=["nope", None], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        sweep_layers(hooked, harmful, benign, CATEGORIES, [7], [0.1], {7: _vectors(hooked, 1)}, progress=False)


def test_best_cell_prefers_the_first_of_equal_cells():
    table = [{"objective": 0.5, "strength": 1.0}, {"objective": 0.7, "strength": 2.0},
             {"objective": 0.7, "strength": 3.0}]
    assert best_cell(table)["strength"] == 2.0
    with pytest.raises(ValueError):
        best_cell([])
