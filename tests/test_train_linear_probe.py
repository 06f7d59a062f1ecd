"""Tests of scripts.train_linear_probe on synthetic activations (and the offline refusal-token model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.linear_probe import LinearProbe, MultiLayerProbe, rates_at_threshold, roc_auc
from scripts.train_linear_probe import (
    WEIGHT_DECAY_GRID,
    best_layer,
    category_accuracy,
    choose_threshold,
    cross_validated_weight_decay,
    evaluate_probe,
    probe_auc_by_layer,
    stratified_folds,
    stratified_split,
    train_multi_layer_probe,
    train_probe,
    train_probe_token_ensemble,
)
from tests.test_linear_probe import brute_force_j, gaussians, j_at

D_MODEL = 16


def test_stratified_split_is_disjoint_stratified_and_seeded():
    labels = torch.tensor([0] * 30 + [1] * 10)
    train, val = stratified_split(labels, val_fraction=0.2, seed=0)
    assert sorted(train + val) == list(range(40)) and not set(train) & set(val)
    assert sum(labels[val].tolist()) == 2 and len(val) == 8
    assert stratified_split(labels, 0.2, seed=0) == (train, val)
    assert stratified_split(labels, 0.2, seed=1) != (train, val)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        stratified_split(labels, 1.0)


def test_stratified_folds_cover_every_row_once_with_both_classes():
    labels = torch.tensor([0] * 13 + [1] * 7)
    folds = stratified_folds(labels, folds=3, seed=0)
    assert sorted(row for fold in folds for row in fold) == list(range(20))
    for fold in folds:
        assert set(labels[fold].tolist()) == {0, 1}
        assert fold == sorted(fold)
    assert stratified_folds(labels, 3, seed=0) == folds != stratified_folds(labels, 3, seed=1)
    with pytest.raises(ValueError, match=r"\[2, 7\]"):
        stratified_folds(labels, folds=8)


def test_cross_validated_weight_decay_against_manual_folds():
    features, labels = gaussians(30, separation=2.0, seed=22)
    grid = [0.01, 10.0]
    best, aucs = cross_validated_weight_decay(features, labels, grid, folds=3, seed=4, progress=False)
    folds = stratified_folds(labels, 3, seed=4)
    for weight_decay in grid:
        fold_aucs = []
        for held_out in folds:
            train = [row for row in range(60) if row not in held_out]
            probe = LinearProbe(D_MODEL, weight_decay=weight_decay).fit(features[train], labels[train], progress=False)
            fold_aucs.append(roc_auc(probe.decision_function(features[held_out]), labels[held_out]))
        assert aucs[weight_decay] == pytest.approx(float(np.mean(fold_aucs)), abs=1e-12)
    assert best == max(grid, key=lambda decay: (aucs[decay], decay))
    _, metrics = train_probe(features, labels, features, labels, weight_decay=grid, cv_folds=3, seed=4, progress=False)
    assert metrics["weight_decay"] == best
    assert metrics["cv_auc"] == [[decay, aucs[decay]] for decay in grid]


def test_train_probe_on_separable_gaussians():
    train_x, train_y = gaussians(150, separation=12.0, seed=10)
    val_x, val_y = gaussians(80, separation=12.0, seed=11)
    probe, metrics = train_probe(train_x, train_y, val_x, val_y, layer=4, hook_kind="resid_post", progress=False)
    assert metrics["auc_val"] > 0.999 and metrics["auc_train"] > 0.999
    scores = probe.decision_function(val_x).double().numpy()
    assert metrics["auc_val"] == roc_auc(scores, val_y)
    threshold = metrics["threshold_logit"]
    assert j_at(scores, val_y.numpy(), threshold) == pytest.approx(brute_force_j(scores, val_y.numpy()))
    assert (metrics["tpr"], metrics["fpr"]) == pytest.approx(rates_at_threshold(scores, val_y, threshold))
    assert metrics["threshold"] == probe.threshold
    assert metrics["accuracy_val"] == pytest.approx(probe.score(val_x, val_y))
    assert (metrics["n_train"], metrics["n_val"]) == (300, 160)
    assert probe.layer == 4 and probe.metadata["metrics"] == metrics


def test_train_probe_is_deterministic_and_fpr_threshold_respects_budget():
    train_x, train_y = gaussians(100, separation=1.0, seed=12)
    val_x, val_y = gaussians(100, separation=1.0, seed=13)
    first, metrics = train_probe(train_x, train_y, val_x, val_y, threshold_method="fpr", target_fpr=0.1, progress=False)
    second, _ = train_probe(train_x, train_y, val_x, val_y, threshold_method="fpr", target_fpr=0.1, progress=False)
    assert torch.equal(first.weight, second.weight)
    assert metrics["fpr"] <= 0.1
    expected = choose_threshold(first.decision_function(val_x), val_y, "fpr", 0.1)
    assert metrics["threshold_logit"] == expected[0]
    with pytest.raises(ValueError, match="valid"):
        choose_threshold([0.1, 0.9], [0, 1], "median")


def test_train_probe_with_category_head():
    generator = torch.Generator().manual_seed(14)
    centres = torch.randn(3, D_MODEL, generator=generator) * 4
    names = ["c", "a", "b"]

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
        classes = torch.arange(n) % 3
        harmful = centres[classes] + torch.randn(n, D_MODEL, generator=generator) + 5
        benign = torch.randn(n, D_MODEL, generator=generator)
        categories = [names[index] for index in classes.tolist()] + [None] * n
        return torch.cat([harmful, benign]), torch.cat([torch.ones(n), torch.zeros(n)]), categories

    train_x, train_y, train_categories = sample(60)
    val_x, val_y, val_categories = sample(30)
    probe, metrics = train_probe(train_x, train_y, val_x, val_y, categories_train=train_categories, progress=False)
    assert probe.categories == ["a", "b", "c"] == metrics["categories"]
    assert category_accuracy(probe, val_x[:30], val_categories[:30]) > 0.95


def test_probe_auc_by_layer_picks_the_informative_layer():
    features, labels = gaussians(100, separation=8.0, seed=15)
    noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(16))
    split = stratified_split(labels, 0.3, seed=0)
    aucs = probe_auc_by_layer({2: noise, 5: features}, labels, split, progress=False)
    assert list(aucs) == [2, 5]
    train, val = split
    _, reference = train_probe(features[train], labels[train], features[val], labels[val], progress=False)
    assert aucs[5] == reference["auc_val"]
    assert aucs[5] > 0.95 and aucs[2] < 0.8
    assert best_layer(aucs) == 5
    assert best_layer({3: 0.9, 1: 0.9, 7: 0.5}) == 1
    with pytest.raises(ValueError, match="overlap"):
        probe_auc_by_layer({5: features}, labels, (train, val[:3] + train[:1]), progress=False)


def test_train_multi_layer_probe():
    train_x, train_y = gaussians(80, separation=3.0, seed=17)
    val_x, val_y = gaussians(80, separation=3.0, seed=18)
    acts_train = {1: train_x, 2: train_x.flip(1)}
    acts_val = {1: val_x, 2: val_x.flip(1)}
    probe, metrics = train_multi_layer_probe(
        acts_train, train_y, acts_val, val_y, hook_kind="resid_post", progress=False
    )
    assert isinstance(probe, MultiLayerProbe) and probe.layers == [1, 2]
    assert set(metrics["auc_val_by_layer"]) == {1, 2}
    scores = probe.decision_function(acts_val).double().numpy()
    assert metrics["auc_val"] == roc_auc(scores, val_y)
    optimum = brute_force_j(scores, val_y.numpy())
    assert j_at(scores, val_y.numpy(), metrics["threshold_logit"]) == pytest.approx(optimum)
    with pytest.raises(ValueError, match="layers"):
        train_multi_layer_probe(acts_train, train_y, {1: val_x}, val_y, progress=False)


def test_evaluate_probe_on_held_out_data():
    train_x, train_y = gaussians(80, separation=3.0, seed=19)
    test_x, test_y = gaussians(80, separation=3.0, seed=20)
    probe, _ = train_probe(train_x, train_y, train_x, train_y, progress=False)
    result = evaluate_probe(probe, test_x, test_y)
    predicted = probe.predict(test_x)
    assert result["accuracy"] == pytest.approx(float((predicted == test_y).double().mean()))
    assert result["tpr"] == pytest.approx(float(predicted[test_y == 1].double().mean()))
    assert result["fpr"] == pytest.approx(float(predicted[test_y == 0].double().mean()))


def test_train_probe_bad_inputs():
    features, labels = gaussians(10, separation=2.0, seed=21)
    with pytest.raises(ValueError, match="validation activations"):
        train_probe(features, labels, features[:, :3], labels, progress=False)
    with pytest.raises(ValueError, match="training labels"):
        train_probe(features, labels[:4], features, labels, progress=False)
    with pytest.raises(ValueError, match="both classes"):
        train_probe(features, labels, features, torch.zeros(20), progress=False)


def held_out_probe_auc(model_alias: str, n_prompts: int = 600, max_chars: int = 300) -> tuple[dict, dict]:
    """Train a probe at the middle layer of ``model_alias`` on a seeded sample of the offline corpus.

    Returns:
        ``(held-out metrics of evaluate_probe, training metrics)``. Activations use the disk cache,
        so reruns cost no forward pass. Skips the calling test when the model or corpus is absent.
    """
    from scripts.activation_caching import cache_prompt_activations
    from scripts.hooked_model import load_hooked_model
    from scripts.linear_probe_data import build_probe_splits
    from scripts.offline_corpus import load_offline_corpus

    try:
        hooked = load_hooked_model(model_alias, device="cpu")
        records = load_offline_corpus()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    # Short prompts keep the forward passes cheap on CPU; the sample is seeded.
    short = [record for record in records if len(record.prompt) <= max_chars]
    rng = np.random.default_rng(0)
    sample = [short[index] for index in sorted(rng.choice(len(short), size=min(n_prompts, len(short)), replace=False))]
    splits = build_probe_splits(sample, val_fraction=0.2, test_fraction=0.25, seed=0)
    layer = hooked.n_layers // 2

    def acts(dataset) -> torch.Tensor:
        cached = cache_prompt_activations(hooked, dataset.prompts, layer, batch_size=32, cache=True, progress=False)
        return cached.acts[layer]

    probe, metrics = train_probe(
        acts(splits.train), splits.train.labels, acts(splits.val), splits.val.labels,
        weight_decay=WEIGHT_DECAY_GRID, layer=layer, progress=False,
    )
    return evaluate_probe(probe, acts(splits.test), splits.test.labels), metrics


@pytest.mark.refusal_model
def test_refusal_model_probe_reaches_auc_095():
    held_out, metrics = held_out_probe_auc("smollm2-135m-refusal-tokens")
    assert held_out["auc"] >= 0.95, (held_out, metrics)


def test_probe_token_ensemble_is_standardised_and_thresholded_on_validation_rows():
    features, labels = gaussians(80, separation=1.5, seed=21)
    generator = torch.Generator().manual_seed(22)
    token = labels.double() * 2 + torch.randn(len(labels), generator=generator).double()
    order = torch.randperm(len(labels), generator=generator)
    train, val = order[:100], order[100:]
    probe = LinearProbe(D_MODEL, layer=2).fit(features[train], labels[train], progress=False)
    ensemble, metrics = train_probe_token_ensemble(
        probe, features[val], token[val], labels[val], threshold_method="fpr"
    )
    val_scores = ensemble.decision_function(features[val], token[val])
    # Standardised on the validation rows: each half has mean 0 and unit (population) spread there.
    logits = probe.decision_function(features[val]).double()
    expected = ((logits - logits.mean()) / logits.std(unbiased=False)
                + (token[val] - token[val].mean()) / token[val].std(unbiased=False)) / 2
    torch.testing.assert_close(val_scores, expected, rtol=1e-12, atol=1e-12)
    threshold, tpr, fpr = choose_threshold(val_scores, labels[val], "fpr")
    assert float(ensemble.threshold) == threshold == metrics["threshold"]
    assert (metrics["tpr"], metrics["fpr"]) == (tpr, fpr) and fpr <= 0.05
    assert metrics["auc_val"] == roc_auc(val_scores, labels[val])
    # Both halves carry signal, so their average ranks the validation rows better than the probe alone.
    assert metrics["auc_val"] > roc_auc(probe.decision_function(features[val]), labels[val])
