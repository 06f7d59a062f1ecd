"""The shared stages: disjoint fit/validation rows, vectors against a by-hand mean difference, routers against
their probe's own decisions, and a fold built on the main split routing exactly as the main run's router."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scripts.activation_caching import cache_activations
from scripts.data_splits import normalize_text
from scripts.generalization import FoldSettings, SourceSplit, fold_steering_condition
from scripts.model import format_chat
from scripts.pipeline import (
    check_disjoint,
    fit_category_vectors,
    fit_router,
    fit_routing_policy,
    fit_routing_probe,
    platt_scaling,
    split_fit_rows,
)
from scripts.records import PromptRecord
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES
from scripts.steering import (
    ROUTINGS,
    abstain_policy,
    binary_policy,
    categorical,
    refusal_token_probabilities,
    token_router_scores,
)
from scripts.steering_vectors import get_strategy
from tests.tiny_steering import build_hooked_tiny

CATEGORIES = DONOTANSWER_CATEGORIES.categories
WORDS = ["bread", "wifi", "poem", "weapon", "moon", "vaccine", "soup", "sea"]


def make(prompt: str, label: str, category: str, source: str = "s") -> PromptRecord:
    return PromptRecord(prompt=prompt, label=label, category=category, source=source)


def records() -> list[PromptRecord]:
    rows = [make(f"How do I get {w} {c}?", "harmful", c, "dna") for c in CATEGORIES for w in WORDS[:4]]
    rows += [make(f"Explain {w} to me.", "harmful", "advbench", "adv") for w in WORDS[:3]]  # no refusal token
    rows += [make(f"Tell me about {w} number {i}.", "benign", "benign", "plain") for i in range(3) for w in WORDS]
    rows += [make(f"Tell me about {w}, safely.", "benign", CATEGORIES[0], "look") for w in WORDS]
    return rows


def test_check_disjoint_names_the_sides_that_share_a_normalised_prompt():
    check_disjoint({"a": [make("One?", "benign", "benign")], "b": [make("Two?", "benign", "benign")]})
    with pytest.raises(ValueError, match="1 normalised prompt.*'train' and 'eval'.*'how do i bake'"):
        check_disjoint({"train": [make("How do I bake?", "benign", "benign")],
                        "val": [make("Other", "benign", "benign")],
                        "eval": [make("how do I  BAKE", "benign", "benign")]})


def test_split_fit_rows_drops_duplicates_first_so_no_prompt_lies_on_both_sides():
    rows = records()
    repeated = rows + [make(r.prompt.upper() + "!!", r.label, r.category, r.source) for r in rows[::2]]
    train, val = split_fit_rows(repeated, validation_fraction=0.25, seed=3)
    check_disjoint({"train": train, "validation": val})
    assert len(train) + len(val) == len({normalize_text(r.prompt) for r in repeated}) == len(rows)
    for label in ("harmful", "benign"):  # stratified by label
        n_label = sum(r.label == label for r in rows)
        assert sum(r.label == label for r in val) == round(0.25 * n_label)
    assert split_fit_rows(repeated, 0.25, seed=3) == (train, val)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_fit_rows(rows, validation_fraction=1.0)


def test_category_vectors_are_the_unit_mean_differences_of_the_rows_that_name_a_refusal_token():
    rows = records()
    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(len(rows), 16, generator=generator, dtype=torch.float64)
    vectors = fit_category_vectors(acts, rows, DONOTANSWER_CATEGORIES, layer=2, model="m", template_hash="t")
    benign = acts[[i for i, r in enumerate(rows) if r.label == "benign"]].mean(dim=0)
    for category in CATEGORIES:
        expected = acts[[i for i, r in enumerate(rows) if r.category == category and r.label == "harmful"]].mean(0)
        expected = expected - benign
        torch.testing.assert_close(vectors.vectors[category], (expected / expected.norm()).to(vectors.vectors[category].dtype))
    used = [i for i, r in enumerate(rows) if r.category != "advbench"]
    assert vectors.mean_resid_norm == pytest.approx(float(acts[used].norm(dim=-1).mean()))
    assert (vectors.layer, vectors.model, vectors.template_hash, vectors.method) == (2, "m", "t", "mean_difference")
    ridge = fit_category_vectors(acts, rows, DONOTANSWER_CATEGORIES, 2, vector_method="ridge", alpha=0.5)
    assert ridge.method == get_strategy("ridge", alpha=0.5).name and ridge.hyperparameters["alpha"] == 0.5
    assert not torch.allclose(ridge.vectors[CATEGORIES[0]], vectors.vectors[CATEGORIES[0]])
    with pytest.raises(KeyError, match="no harmful row of category"):
        fit_category_vectors(acts[:4], rows[:4], DONOTANSWER_CATEGORIES, 2)
    with pytest.raises(KeyError, match="unknown vector strategy 'mean'"):
        fit_category_vectors(acts, rows, DONOTANSWER_CATEGORIES, 2, vector_method="mean")


@pytest.fixture(scope="module")
def fitted():
    """The tiny model's activations and token scores over :func:`records`, split into fit and validation rows."""
    hooked = build_hooked_tiny()
    rows = records()
    train, val = split_fit_rows(rows, 0.3, seed=0)
    test = [make(f"How do I get {w} {c} fast?", "harmful", c, "t") for c in CATEGORIES[:2] for w in WORDS[:4]]
    test += [make(f"Tell me about {w} number 7.", "benign", "benign", "t") for w in WORDS]
    everything = train + val + test
    texts = format_chat(hooked.tokenizer, [r.prompt for r in everything])
    acts = cache_activations(hooked, texts, [1], progress=False).layer(1)
    tokens = token_router_scores(refusal_token_probabilities(hooked, texts, DONOTANSWER_CATEGORIES))
    return hooked, train, val, test, acts, tokens, texts[len(train) + len(val):]


def test_the_probe_router_routes_as_its_probe_decides(fitted):
    hooked, train, val, test, acts, _, test_texts = fitted
    n, m = len(train), len(train) + len(val)
    probe, metrics = fit_routing_probe(acts[:n], train, acts[n:m], val, DONOTANSWER_CATEGORIES, layer=1)
    assert metrics["categories"] == CATEGORIES
    router, ensemble, _ = fit_router("probe", probe, DONOTANSWER_CATEGORIES, 3.0, -5.0)
    routes = router.route(hooked, test_texts)
    expected = (probe.decision_function(acts[m:]) >= float(probe.threshold_logit)).tolist()
    assert ensemble is None and [route.strength for route in routes] == [3.0 if e else -5.0 for e in expected]
    heads = probe.predict_category_proba(acts[m:]).argmax(dim=-1).tolist()
    assert [route.category for route in routes] == [CATEGORIES[i] for i in heads]
    with pytest.raises(ValueError, match="unknown routing 'token'"):
        fit_router("token", probe, DONOTANSWER_CATEGORIES, 3.0, -5.0)
    with pytest.raises(ValueError, match="needs the validation rows"):
        fit_router("probe+token", probe, DONOTANSWER_CATEGORIES, 3.0, -5.0)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_a_fold_on_the_main_split_routes_exactly_as_the_main_router(fitted, routing):
    hooked, train, val, test, acts, tokens, test_texts = fitted
    n, m = len(train), len(train) + len(val)
    probe, _ = fit_routing_probe(acts[:n], train, acts[n:m], val, DONOTANSWER_CATEGORIES, layer=1,
                                 metadata={"held_out_source": "t"})
    router, _, _ = fit_router(routing, probe, DONOTANSWER_CATEGORIES, 3.0, -5.0, val_acts=acts[n:m],
                              val_token_scores=tokens[n:m], val_records=val, metadata={"held_out_source": "t"})
    vectors = fit_category_vectors(acts[:n], train, DONOTANSWER_CATEGORIES, 1)
    main = categorical(vectors, router, 1, name="main").plan(hooked, [r.prompt for r in test], test_texts)
    fold = fold_steering_condition(acts, train + val + test, SourceSplit("t", train, val, test), 1, routing, tokens,
                                   FoldSettings(DONOTANSWER_CATEGORIES, 3.0, -5.0), name="fold")
    planned = fold.plan(hooked, [r.prompt for r in test], test_texts)
    assert planned.decisions == main.decisions
    assert planned.metadata["vector_sha256"] == main.metadata["vector_sha256"]
    assert len({d["route"] for d in main.decisions}) == 2, "both routes should occur"


HARMFUL_SCORES = [-1.0, 0.5, 1.0, 2.0, 3.0, 4.0]
BENIGN_SCORES = [-3.0, -2.0, -0.5, 0.0, 1.5]


def _abstain(threshold: float, target_fpr: float, target_fnr: float):
    scores = torch.tensor(HARMFUL_SCORES + BENIGN_SCORES, dtype=torch.float64)
    labels = torch.tensor([1] * len(HARMFUL_SCORES) + [0] * len(BENIGN_SCORES))
    return fit_routing_policy("abstain", scores, labels, threshold, target_fpr, target_fnr)


def test_the_abstain_thresholds_by_hand():
    # FPR <= 0.2 allows one of the five benign scores at or above the toward bound: the lowest such
    # operating point is 0.5 (benign 1.5 above it), placed halfway to the next lower score, 0.
    # FNR <= 0.2 allows one of the six harmful scores below the away bound: the second smallest, 0.5.
    assert _abstain(1.2, 0.2, 0.2) == abstain_policy(0.5, 1.2)  # the router's threshold is the stricter toward bound
    assert _abstain(0.0, 0.2, 0.2) == abstain_policy(0.25, 0.5)  # the FPR bound is; between it and 0.5, no steering
    assert _abstain(1.2, 0.2, 0.5) == abstain_policy(1.2, 2.0)  # three harmful rows may fall below 2.0: toward needs 2.0
    assert _abstain(1.2, 0.2, 0.0) == abstain_policy(-1.0, 1.2)  # none may: the smallest harmful score
    assert _abstain(1.2, 0.2, 1.0) == abstain_policy(1.2, 1.2)  # every one may: only the toward bound is left
    harmful, benign = np.array(HARMFUL_SCORES), np.array(BENIGN_SCORES)
    for threshold in (-1.0, 0.0, 1.2, 5.0):
        for target_fpr in (0.0, 0.2, 0.4):
            for target_fnr in (0.0, 0.2, 0.4):
                policy = _abstain(threshold, target_fpr, target_fnr)
                assert policy.low <= policy.high and policy.high >= threshold
                assert (benign >= policy.high).mean() <= target_fpr
                assert (harmful < policy.low).mean() <= target_fnr
    # Scores that separate the labels leave their gap unsteered instead of collapsing the band.
    separated = fit_routing_policy("abstain", [-2.0, -1.0, 0.0, 3.0, 4.0, 5.0], [0, 0, 0, 1, 1, 1], 0.5, 0.0, 0.0)
    assert separated == abstain_policy(1.5, 3.0)  # no benign reaches 1.5 (halfway to 0.0); no harmful is below 3.0


def test_platt_scaling_matches_the_closed_form_and_an_independent_fit():
    # One binary feature without penalty: the intercept is the log-odds at x = 0 and the slope the
    # log odds ratio (1 of 4 harmful at 0, 3 of 4 at 1).
    slope, intercept = platt_scaling([0, 0, 0, 0, 1, 1, 1, 1], [1, 0, 0, 0, 1, 1, 1, 0], l2=1e-12)
    assert slope == pytest.approx(2 * math.log(3), abs=1e-6) and intercept == pytest.approx(-math.log(3), abs=1e-6)
    from sklearn.linear_model import LogisticRegression

    generator = np.random.default_rng(0)
    scores = np.concatenate([generator.normal(1.0, 1.5, 40), generator.normal(-1.0, 1.5, 60)])
    labels = np.r_[np.ones(40), np.zeros(60)]
    slope, intercept = platt_scaling(scores, labels, l2=1e-3)
    # scikit-learn minimises C·Σ loss + ½·w², the same optimum at C = 1 / (N·l2); the intercept is unpenalised.
    reference = LogisticRegression(C=1 / (100 * 1e-3), tol=1e-12, max_iter=10_000).fit(scores[:, None], labels)
    assert slope == pytest.approx(float(reference.coef_[0, 0]), abs=1e-6)
    assert intercept == pytest.approx(float(reference.intercept_[0]), abs=1e-6)
    policy = fit_routing_policy("graded", torch.tensor(scores), torch.tensor(labels), threshold=0.0)
    assert (policy.name, policy.slope, policy.intercept) == ("graded", slope, intercept)


def test_platt_scaling_stays_finite_on_separated_scores():
    scores, labels = [-3.0, -2.0, -1.0, 1.0, 2.0, 3.0], [0, 0, 0, 1, 1, 1]
    slope, intercept = platt_scaling(scores, labels)
    assert 0 < slope < 100 and abs(intercept) < 1e-6  # symmetric data: the intercept is 0
    # Stationary: the gradient of mean loss + (l2 / 2)·slope² vanishes.
    z = slope * np.array(scores) + intercept
    residual = 1 / (1 + np.exp(-z)) - np.array(labels)
    assert abs(residual.mean()) < 1e-9 and abs((residual * scores).mean() + 1e-3 * slope) < 1e-9


def test_fit_routing_policy_rejects_bad_inputs():
    assert fit_routing_policy("binary", [], [], float("nan")) == binary_policy()  # ignores the data
    with pytest.raises(ValueError, match=r"unknown routing policy 'soft'; valid: \['binary', 'abstain', 'graded'\]"):
        fit_routing_policy("soft", [0.0, 1.0], [0, 1], 0.5)
    with pytest.raises(ValueError, match="must both be \\[N\\]"):
        fit_routing_policy("abstain", [0.0, 1.0, 2.0], [0, 1], 0.5)
    with pytest.raises(ValueError, match="both harmful"):
        fit_routing_policy("graded", [0.0, 1.0], [1, 1], 0.5)
    with pytest.raises(ValueError, match="0 \\(benign\\) or 1"):
        fit_routing_policy("abstain", [0.0, 1.0], [0, 2], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        fit_routing_policy("abstain", [0.0, float("nan")], [0, 1], 0.5)
    with pytest.raises(ValueError, match="threshold must be finite"):
        fit_routing_policy("abstain", [0.0, 1.0], [0, 1], float("inf"))
    with pytest.raises(ValueError, match="target_fpr and target_fnr"):
        fit_routing_policy("abstain", [0.0, 1.0], [0, 1], 0.5, target_fnr=1.5)


@pytest.fixture(scope="module")
def routing_probe(fitted):
    """The routing probe fitted on :func:`fitted`'s rows, shared because fitting it is the slow part."""
    _, train, val, _, acts, _, _ = fitted
    n, m = len(train), len(train) + len(val)
    return fit_routing_probe(acts[:n], train, acts[n:m], val, DONOTANSWER_CATEGORIES, layer=1)[0]


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("policy", ["abstain", "graded"])
def test_fit_router_fits_its_policy_on_the_validation_scores(fitted, routing_probe, routing, policy):
    hooked, train, val, test, acts, tokens, test_texts = fitted
    n, m = len(train), len(train) + len(val)
    probe = routing_probe
    router, ensemble, metrics = fit_router(routing, probe, DONOTANSWER_CATEGORIES, 3.0, -5.0, val_acts=acts[n:m],
                                           val_token_scores=tokens[n:m], val_records=val, policy=policy)
    labels = torch.tensor([r.label == "harmful" for r in val]).long()
    if routing == "probe":
        scores, threshold = probe.decision_function(acts[n:m]), float(probe.threshold_logit)
    else:
        scores, threshold = ensemble.decision_function(acts[n:m], tokens[n:m]), float(ensemble.threshold)
        assert "policy" not in ensemble.metadata["metrics"]  # the saved ensemble stays as it was
    assert router.policy == fit_routing_policy(policy, scores, labels, threshold)
    assert metrics["policy"] == router.policy.to_dict() == router.metadata()["policy"]
    for route in router.route(hooked, test_texts[::4]):
        # Abstain and graded read the score alone, not the router's own decision.
        expected = router.policy.decide(route.info["router_score"], False, 3.0, -5.0)
        assert (route.route, route.strength) == expected[:2]


def test_fit_router_needs_validation_rows_for_a_fitted_policy(routing_probe):
    probe = routing_probe
    router, _, metrics = fit_router("probe", probe, DONOTANSWER_CATEGORIES, 3.0, -5.0)
    assert router.policy == binary_policy() and metrics == {"policy": {"name": "binary"}}
    with pytest.raises(ValueError, match="'abstain' is fitted on the validation rows"):
        fit_router("probe", probe, DONOTANSWER_CATEGORIES, 3.0, -5.0, policy="abstain")
    with pytest.raises(ValueError, match="unknown routing policy 'soft'"):
        fit_router("probe", probe, DONOTANSWER_CATEGORIES, 3.0, -5.0, policy="soft")
