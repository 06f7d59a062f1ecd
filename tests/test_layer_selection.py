"""The layer × strength sweep against a brute-force reference (each prompt steered alone, every pair of strengths tried)."""

from __future__ import annotations

import pytest
import torch

from scripts import steering
import itertools

from scripts.layer_selection import best_strengths, sweep_layers
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES as CATEGORIES
from tests.tiny_steering import PROMPTS, build_hooked_tiny, tiny_texts

HARMFUL = (PROMPTS[1], PROMPTS[3])
BENIGN = (PROMPTS[0], PROMPTS[2], PROMPTS[4])
LAYERS = [0, 2, -1]
POSITIVE = [0.0, 0.05, 0.3]
NEGATIVE = [0.1, 0.45]
TPR, FPR = 0.9, 0.2


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


def test_sweep_returns_every_entry_and_matches_the_brute_force_reference(hooked):
    harmful, benign = tiny_texts(hooked, HARMFUL), tiny_texts(hooked, BENIGN)
    vectors = {layer: _vectors(hooked, layer) for layer in (0, 2, hooked.n_layers - 1)}
    harmful_labels = [CATEGORIES.categories[3], None]
    table = sweep_layers(hooked, harmful, benign, CATEGORIES, LAYERS, POSITIVE, NEGATIVE, vectors,
                         harmful_categories=harmful_labels, router_tpr=TPR, router_fpr=FPR, batch_size=2,
                         progress=False)
    signed = [("positive", s) for s in POSITIVE] + [("negative", -s) for s in NEGATIVE]
    assert [(e["layer"], e["side"], e["strength"]) for e in table] == [(l, *x) for l in (0, 2, 3) for x in signed]

    unsteered = torch.stack([_single_probabilities(hooked, t) for t in harmful + benign])
    guessed = [CATEGORIES.categories[int(i)] for i in unsteered[:, :-1].argmax(dim=-1)]
    categories = [harmful_labels[0], guessed[1]] + guessed[2:]
    reference = {}
    for layer in (0, 2, 3):
        for _, strength in signed:
            rows = []
            for index, text in enumerate(harmful + benign):
                with steering.steer(hooked, layer, vectors[layer][categories[index]], strength):
                    rows.append(_single_probabilities(hooked, text))
            probabilities = torch.stack(rows)
            reference[layer, strength] = (float(probabilities[: len(harmful), :-1].sum(dim=-1).mean()),
                                          float(probabilities[len(harmful) :, -1].mean()))
    for entry in table:
        harmful_refusal, benign_respond = reference[entry["layer"], entry["strength"]]
        assert entry["harmful_refusal"] == pytest.approx(harmful_refusal, abs=1e-5)
        assert entry["benign_respond"] == pytest.approx(benign_respond, abs=1e-6)

    # Every (layer, +s, −s') triple, scored as the routed pipeline's expected balanced accuracy.
    def routed(layer: int, positive: float, negative: float) -> tuple[float, float, float]:
        (h_pos, b_pos), (h_neg, b_neg) = reference[layer, positive], reference[layer, negative]
        refuse = TPR * h_pos + (1 - TPR) * h_neg
        respond = (1 - FPR) * b_neg + FPR * b_pos
        return (refuse + respond) / 2, refuse, respond

    triples = list(itertools.product((0, 2, 3), POSITIVE, [-s for s in NEGATIVE]))
    scores = {triple: routed(*triple) for triple in triples}
    best_triple = max(triples, key=lambda triple: scores[triple][0])
    best = best_strengths(table)
    assert (best["layer"], best["positive_strength"], best["negative_strength"]) == best_triple
    assert best["objective"] == pytest.approx(scores[best_triple][0], abs=1e-5)
    assert best["harmful_refusal"] == pytest.approx(scores[best_triple][1], abs=1e-5)
    assert best["benign_respond"] == pytest.approx(scores[best_triple][2], abs=1e-5)
    assert len({round(value[0], 4) for value in scores.values()}) > 5  # the triples really differ


def test_steering_every_prompt_position_runs_each_entry_in_full(hooked):
    """Positions other than the last prompt one cannot share the prefix pass; the reference steers each prompt alone."""
    harmful, benign = tiny_texts(hooked, HARMFUL), tiny_texts(hooked, BENIGN)
    vectors = _vectors(hooked, 2)
    table = sweep_layers(hooked, harmful, benign, CATEGORIES, [2], [0.3], [0.45], {2: vectors}, positions="prompt",
                         batch_size=2, progress=False)  # fmt: skip
    guessed = [CATEGORIES.categories[int(i)] for i in
               torch.stack([_single_probabilities(hooked, t) for t in harmful + benign])[:, :-1].argmax(dim=-1)]
    for entry in table:
        rows = []
        for text, category in zip(harmful + benign, guessed):
            with steering.steer(hooked, 2, vectors[category], entry["strength"], positions="prompt"):
                rows.append(_single_probabilities(hooked, text))
        probabilities = torch.stack(rows)
        # Batched (left-padded) against one prompt at a time: another kernel path.
        assert entry["harmful_refusal"] == pytest.approx(float(probabilities[:2, :-1].sum(dim=-1).mean()), abs=1e-5)
        assert entry["benign_respond"] == pytest.approx(float(probabilities[2:, -1].mean()), abs=1e-6)


def test_vectors_from_a_callable_and_clear_errors(hooked):
    harmful, benign = tiny_texts(hooked, HARMFUL), tiny_texts(hooked, BENIGN)
    from_callable = sweep_layers(hooked, harmful, benign, CATEGORIES, [1], [0.1], [0.2], lambda layer: _vectors(hooked, layer),
                                 progress=False)
    from_mapping = sweep_layers(hooked, harmful, benign, CATEGORIES, [1], [0.1], [0.2], {1: _vectors(hooked, 1)},
                                progress=False)
    assert from_callable == from_mapping
    with pytest.raises(KeyError, match="layers with vectors"):
        sweep_layers(hooked, harmful, benign, CATEGORIES, [2], [0.1], [0.2], {1: _vectors(hooked, 1)}, progress=False)
    with pytest.raises(KeyError, match="expected"):
        sweep_layers(hooked, harmful, benign, CATEGORIES, [1], [0.1], [0.2], {1: {"x": torch.zeros(hooked.d_model)}},
                     progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        sweep_layers(hooked, harmful, benign, CATEGORIES, [1], [-1.0], [0.2], {1: _vectors(hooked, 1)}, progress=False)
    with pytest.raises(ValueError, match="negative_strengths"):
        sweep_layers(hooked, harmful, benign, CATEGORIES, [1], [1.0], [], {1: _vectors(hooked, 1)}, progress=False)
    with pytest.raises(ValueError, match="router_fpr"):
        sweep_layers(hooked, harmful, benign, CATEGORIES, [1], [1.0], [1.0], {1: _vectors(hooked, 1)},
                     router_fpr=1.5, progress=False)
    with pytest.raises(KeyError, match="valid categories"):
        sweep_layers(hooked, harmful, benign, CATEGORIES, [1], [0.1], [0.2], {1: _vectors(hooked, 1)},
                     harmful_categories=["nope", None], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        sweep_layers(hooked, harmful, benign, CATEGORIES, [7], [0.1], [0.2], {7: _vectors(hooked, 1)}, progress=False)


def _entry(layer: int, side: str, strength: float, harmful_refusal: float, benign_respond: float) -> dict:
    weights = {"positive": (TPR, FPR), "negative": (1 - TPR, 1 - FPR)}[side]
    return {"layer": layer, "hook": f"blocks.{layer}.hook_resid_post", "side": side, "strength": strength,
            "harmful_refusal": harmful_refusal, "benign_respond": benign_respond, "weight_harmful": weights[0],
            "weight_benign": weights[1],
            "contribution": (weights[0] * harmful_refusal + weights[1] * benign_respond) / 2}


def test_best_strengths_chooses_each_side_alone_and_prefers_the_first_of_equals():
    table = [_entry(1, "positive", 4.0, 0.8, 0.5), _entry(1, "positive", 8.0, 0.9, 0.4),
             _entry(1, "negative", -3.0, 0.7, 0.9), _entry(1, "negative", -6.0, 0.6, 0.9),
             _entry(2, "positive", 4.0, 0.8, 0.5), _entry(2, "negative", -3.0, 0.7, 0.9)]
    best = best_strengths(table)
    # +8 gains 0.1·TPR on harmful and loses 0.1·FPR on benign; −3 and −6 tie on benign, −3 refuses more harmful.
    assert (best["layer"], best["positive_strength"], best["negative_strength"]) == (1, 8.0, -3.0)
    assert best["harmful_refusal"] == pytest.approx(TPR * 0.9 + (1 - TPR) * 0.7)
    assert best["benign_respond"] == pytest.approx(FPR * 0.4 + (1 - FPR) * 0.9)
    assert best["objective"] == pytest.approx((best["harmful_refusal"] + best["benign_respond"]) / 2)
    tie = [_entry(3, "positive", 1.0, 0.5, 0.5), _entry(3, "negative", -1.0, 0.5, 0.5),
           _entry(4, "positive", 1.0, 0.5, 0.5), _entry(4, "negative", -1.0, 0.5, 0.5)]
    assert best_strengths(tie)["layer"] == 3
    with pytest.raises(ValueError, match="empty"):
        best_strengths([])
    with pytest.raises(ValueError, match="negative"):
        best_strengths([_entry(1, "positive", 4.0, 0.8, 0.5)])
