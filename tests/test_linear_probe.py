"""Tests of scripts.linear_probe against scikit-learn and brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.linear_probe import (
    LinearProbe,
    MultiLayerProbe,
    ProbeTokenEnsemble,
    as_binary_labels,
    as_features,
    rates_at_threshold,
    roc_auc,
    roc_points,
    threshold_at_fpr,
    youden_threshold,
)

D_MODEL = 16


def gaussians(
    n_per_class: int, separation: float, seed: int, d_model: int = D_MODEL
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian classes ``[2n, d_model]`` whose means differ by ``separation`` along one fixed random direction."""
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(1234))
    direction = direction / direction.norm()
    generator = torch.Generator().manual_seed(seed)
    benign = torch.randn(n_per_class, d_model, generator=generator) * 2 + 3
    harmful = torch.randn(n_per_class, d_model, generator=generator) * 2 + 3 + separation * direction
    labels = torch.cat([torch.zeros(n_per_class), torch.ones(n_per_class)]).long()
    return torch.cat([benign, harmful]), labels


def brute_force_j(scores: np.ndarray, labels: np.ndarray) -> float:
    """Max over every threshold (each score and one above all) of TPR − FPR."""
    candidates = np.append(np.unique(scores), scores.max() + 1)
    return max(
        (scores[labels == 1] >= t).mean() - (scores[labels == 0] >= t).mean() for t in candidates
    )


def j_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return (scores[labels == 1] >= threshold).mean() - (scores[labels == 0] >= threshold).mean()


def test_roc_auc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(5):
        labels = rng.integers(0, 2, size=200)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 6, size=200).astype(float) + labels * trial * 0.5
        assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_points_against_direct_count():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 10, size=50).astype(float)
    labels = rng.integers(0, 2, size=50)
    thresholds, tpr, fpr = roc_points(scores, labels)
    assert np.all(np.diff(thresholds) < 0)
    for threshold, true_rate, false_rate in zip(thresholds, tpr, fpr):
        assert true_rate == pytest.approx((scores[labels == 1] >= threshold).mean())
        assert false_rate == pytest.approx((scores[labels == 0] >= threshold).mean())


def test_youden_threshold_is_brute_force_optimal():
    rng = np.random.default_rng(2)
    for _ in range(5):
        labels = rng.integers(0, 2, size=120)
        labels[:2] = [0, 1]
        scores = rng.normal(size=120) + labels * 0.8
        threshold, tpr, fpr = youden_threshold(scores, labels)
        assert j_at(scores, labels, threshold) == pytest.approx(brute_force_j(scores, labels))
        assert (tpr, fpr) == pytest.approx(rates_at_threshold(scores, labels, threshold))


def test_threshold_at_fpr_is_the_best_tpr_within_budget():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=300)
    scores = rng.normal(size=300) + labels
    for target in (0.0, 0.05, 0.2):
        threshold, tpr, fpr = threshold_at_fpr(scores, labels, target)
        assert fpr <= target
        best = max(
            (scores[labels == 1] >= t).mean()
            for t in np.unique(scores)
            if (scores[labels == 0] >= t).mean() <= target
        )
        assert tpr == pytest.approx(best)
        assert (tpr, fpr) == pytest.approx(rates_at_threshold(scores, labels, threshold))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        threshold_at_fpr(scores, labels, 1.5)


def test_separable_gaussians_auc_one_and_youden_optimal_threshold():
    train_x, train_y = gaussians(200, separation=12.0, seed=0)
    val_x, val_y = gaussians(100, separation=12.0, seed=1)
    probe = LinearProbe(D_MODEL).fit(train_x, train_y, progress=False)
    assert probe.roc_auc(val_x, val_y) > 0.999
    scores = probe.decision_function(val_x).double().numpy()
    threshold, _, _ = youden_threshold(scores, val_y)
    probe.set_threshold_logit(threshold)
    optimum = brute_force_j(scores, val_y.numpy())
    assert j_at(scores, val_y.numpy(), float(probe.threshold_logit)) == pytest.approx(optimum)
    assert probe.score(val_x, val_y) > 0.99


def test_fit_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    features, labels = gaussians(150, separation=1.5, seed=4)
    weight_decay = 0.05
    probe = LinearProbe(D_MODEL, weight_decay=weight_decay).fit(features, labels, progress=False)
    standardized = (features.double() - features.double().mean(0)) / features.double().std(0, unbiased=False)
    reference = LogisticRegression(C=1 / (len(labels) * weight_decay), tol=1e-12, max_iter=10_000)
    reference.fit(standardized.numpy(), labels.numpy())
    np.testing.assert_allclose(probe.weight.numpy(), reference.coef_[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        probe.decision_function(features).numpy(), reference.decision_function(standardized.numpy()),
        rtol=1e-4, atol=1e-4,
    )


def test_category_head_matches_sklearn_multinomial():
    from sklearn.linear_model import LogisticRegression

    generator = torch.Generator().manual_seed(5)
    names = ["violence", "fraud", "privacy"]
    centres = torch.randn(3, D_MODEL, generator=generator) * 2
    classes = torch.arange(90) % 3
    harmful = centres[classes] + torch.randn(90, D_MODEL, generator=generator)
    benign = torch.randn(40, D_MODEL, generator=generator)
    features = torch.cat([harmful, benign])
    labels = torch.cat([torch.ones(90), torch.zeros(40)]).long()
    categories = [names[index] for index in classes.tolist()] + [None] * 40
    weight_decay = 0.1
    probe = LinearProbe(D_MODEL, weight_decay=weight_decay, categories=names).fit(
        features, labels, categories=categories, progress=False
    )
    standardized = (features.double() - features.double().mean(0)) / features.double().std(0, unbiased=False)
    reference = LogisticRegression(C=1 / (90 * weight_decay), tol=1e-12, max_iter=10_000)
    reference.fit(standardized[:90].numpy(), np.array(categories[:90]))
    order = [list(reference.classes_).index(name) for name in names]
    np.testing.assert_allclose(
        probe.predict_category_proba(features).numpy(), reference.predict_proba(standardized.numpy())[:, order],
        atol=1e-4,
    )
    assert probe.predict_category(harmful) == [names[index] for index in classes.tolist()]


def test_uncategorised_harmful_rows_train_the_harmful_unit_but_not_the_category_head():
    generator = torch.Generator().manual_seed(8)
    names = ["violence", "fraud"]
    centres = torch.randn(2, D_MODEL, generator=generator) * 2
    classes = torch.arange(40) % 2
    harmful = centres[classes] + torch.randn(40, D_MODEL, generator=generator)
    extra = torch.randn(20, D_MODEL, generator=generator) + 3.0  # harmful, from a source without categories
    benign = torch.randn(40, D_MODEL, generator=generator)
    labels = torch.cat([torch.ones(60), torch.zeros(40)]).long()
    categories = [names[index] for index in classes.tolist()] + [None] * 60
    with_extra = LinearProbe(D_MODEL, categories=names).fit(torch.cat([harmful, extra, benign]), labels,
                                                             categories=categories, progress=False)
    head_only = LinearProbe(D_MODEL, categories=names).fit(
        torch.cat([harmful, benign]), torch.cat([torch.ones(40), torch.zeros(40)]).long(),
        categories=categories[:40] + [None] * 40, progress=False)
    assert with_extra.predict_category(harmful) == head_only.predict_category(harmful) == [
        names[index] for index in classes.tolist()]
    assert not torch.allclose(with_extra.weight, head_only.weight)  # the extra rows moved the harmful unit
    assert with_extra.predict(extra).float().mean() > head_only.predict(extra).float().mean()
    with pytest.raises(ValueError, match="all are None"):
        LinearProbe(D_MODEL, categories=names).fit(torch.cat([extra, benign]), torch.cat(
            [torch.ones(20), torch.zeros(40)]).long(), categories=[None] * 60, progress=False)


def test_probe_interface_used_by_the_router():
    features, labels = gaussians(50, separation=3.0, seed=6)
    probe = LinearProbe(D_MODEL).fit(features, labels, progress=False).set_threshold_logit(0.7)
    probabilities = probe.predict_proba(features)
    assert probabilities.shape == (100,)
    torch.testing.assert_close(probabilities, torch.sigmoid(probe.decision_function(features)))
    assert isinstance(probe.threshold, float)
    assert probe.threshold == pytest.approx(1 / (1 + np.exp(-0.7)), abs=1e-12)
    assert torch.equal(probe.predict(features), (probabilities >= probe.threshold).long())
    # Inside a hook the probe runs as a module on [batch, pos, d_model] activations.
    stacked = features.reshape(10, 10, D_MODEL)
    torch.testing.assert_close(probe(stacked).reshape(-1), probe.decision_function(features))


def test_save_load_round_trip_identical_predictions(tmp_path):
    features, labels = gaussians(60, separation=2.0, seed=7)
    categories = ["a" if row % 2 else "b" for row in range(120)]
    probe = LinearProbe(D_MODEL, weight_decay=0.03, layer=15, hook_kind="resid_post", categories=["a", "b"],
                        metadata={"model": "tiny"})
    probe.fit(features, labels, categories=categories, progress=False).set_threshold_logit(-0.25)
    path = probe.save(tmp_path / "probe.safetensors")
    loaded = LinearProbe.load(path)
    assert torch.equal(loaded.decision_function(features), probe.decision_function(features))
    assert torch.equal(loaded.predict(features), probe.predict(features))
    assert torch.equal(loaded.predict_category_proba(features), probe.predict_category_proba(features))
    assert loaded.threshold == probe.threshold
    assert (loaded.layer, loaded.hook_kind, loaded.categories) == (15, "resid_post", ["a", "b"])
    assert loaded.weight_decay == 0.03 and loaded.metadata == {"model": "tiny"}
    with pytest.raises(ValueError, match="multi_layer_probe"):
        MultiLayerProbe.load(path)


def test_multi_layer_probe_averages_logits_and_round_trips(tmp_path):
    features, labels = gaussians(60, separation=2.0, seed=8)
    shifted = features.flip(1) * 0.5
    probes = {
        3: LinearProbe(D_MODEL, layer=3, hook_kind="resid_post").fit(features, labels, progress=False),
        7: LinearProbe(D_MODEL, layer=7, hook_kind="resid_post").fit(shifted, labels, progress=False),
    }
    multi = MultiLayerProbe(probes, metadata={"note": "x"}).set_threshold_logit(0.1)
    acts = {7: shifted, 3: features}
    expected = (probes[3].decision_function(features) + probes[7].decision_function(shifted)) / 2
    torch.testing.assert_close(multi.decision_function(acts), expected)
    assert multi.layers == [3, 7]
    loaded = MultiLayerProbe.load(multi.save(tmp_path / "multi.safetensors"))
    assert torch.equal(loaded.decision_function(acts), multi.decision_function(acts))
    assert loaded.threshold == multi.threshold and loaded.metadata == {"note": "x"}
    with pytest.raises(KeyError, match=r"needs layers \[3, 7\]"):
        multi.decision_function({3: features})
    with pytest.raises(ValueError, match="one hook kind"):
        MultiLayerProbe({
            1: LinearProbe(D_MODEL, hook_kind="resid_pre"),
            2: LinearProbe(D_MODEL, hook_kind="resid_mid"),
        })


def test_probe_token_ensemble_averages_standardised_scores_and_round_trips(tmp_path):
    features, labels = gaussians(60, separation=2.0, seed=8)
    probe = LinearProbe(D_MODEL, layer=4, hook_kind="resid_post", categories=["a", "b"]).fit(
        features, labels, categories=["a" if i % 2 else "b" for i in range(len(labels))], progress=False
    )
    token = labels.double() * 3 + torch.randn(len(labels), generator=torch.Generator().manual_seed(3)).double()
    ensemble = ProbeTokenEnsemble(probe, metadata={"note": "x"}).fit(features, token).set_threshold(0.25)
    logits = probe.decision_function(features).double().numpy()
    expected = ((logits - logits.mean()) / logits.std() + (token.numpy() - token.numpy().mean()) / token.numpy().std()) / 2
    np.testing.assert_allclose(ensemble.decision_function(features, token).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(ensemble.predict(features, token), torch.as_tensor(expected >= 0.25).long())
    assert ensemble.layer == 4 and ensemble.hook_kind == "resid_post" and ensemble.categories == ["a", "b"]
    loaded = ProbeTokenEnsemble.load(ensemble.save(tmp_path / "router.safetensors"))
    assert torch.equal(loaded.decision_function(features, token), ensemble.decision_function(features, token))
    assert float(loaded.threshold) == 0.25 and loaded.metadata == {"note": "x"}
    assert torch.equal(loaded.predict_category_proba(features), probe.predict_category_proba(features))
    with pytest.raises(ValueError, match="token_scores must be"):
        ensemble.decision_function(features, token[:-1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        ensemble.fit(features, torch.full_like(token, float("inf")))
    with pytest.raises(RuntimeError, match="not fitted"):
        ProbeTokenEnsemble(probe).decision_function(features, token)
    # A non-finite threshold is refused by the ensemble and the probe alike, and leaves the old one in place.
    with pytest.raises(ValueError, match="threshold must be finite, got nan"):
        ensemble.set_threshold(float("nan"))
    with pytest.raises(ValueError, match="threshold must be finite, got inf"):
        probe.set_threshold_logit(float("inf"))
    assert float(ensemble.threshold) == 0.25 and np.isfinite(float(probe.threshold_logit))
    with pytest.raises(ValueError, match="holds a 'probe_token_ensemble'"):
        LinearProbe.load(tmp_path / "router.safetensors")


def test_bad_inputs_raise_clear_errors():
    features, labels = gaussians(10, separation=2.0, seed=9)
    probe = LinearProbe(D_MODEL)
    with pytest.raises(RuntimeError, match="not fitted"):
        probe.predict_proba(features)
    with pytest.raises(ValueError, match=r"\[N, d_model\]"):
        probe.fit(features[0], labels, progress=False)
    with pytest.raises(ValueError, match="d_model=16"):
        probe.fit(features[:, :5], labels, progress=False)
    with pytest.raises(ValueError, match=r"values \[0, 2\]"):
        probe.fit(features, labels * 2, progress=False)
    with pytest.raises(ValueError, match="N=20"):
        probe.fit(features, labels[:5], progress=False)
    nan_features = features.clone()
    nan_features[3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        probe.fit(nan_features, labels, progress=False)
    with pytest.raises(ValueError, match="both classes"):
        probe.fit(features, torch.ones(20), progress=False)
    with pytest.raises(ValueError, match="no category head"):
        probe.fit(features, labels, categories=["a"] * 20, progress=False)
    headed = LinearProbe(D_MODEL, categories=["a", "b"])
    with pytest.raises(ValueError, match=r"valid categories: \['a', 'b'\]"):
        headed.fit(features, labels, categories=["c"] * 20, progress=False)
    with pytest.raises(ValueError, match="valid kinds"):
        LinearProbe(D_MODEL, hook_kind="resid")
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])
    assert as_binary_labels(torch.tensor([0.0, 1.0]), 2).tolist() == [0, 1]
    assert as_features(np.ones((2, 3))).dtype == torch.float64
