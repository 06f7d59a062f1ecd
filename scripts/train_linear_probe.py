"""Train the harmful-vs-benign probe on cached activations, pick its threshold on validation data, and compare layers.

Training is deterministic (convex objective, zero initialisation, full-batch L-BFGS); the only
randomness is in splitting, seeded: the train/validation split (:func:`stratified_split`) and the
cross-validation folds that choose the weight decay when a grid is given
(:func:`cross_validated_weight_decay`).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from scripts.activation_caching import CachedActivations
from scripts.linear_probe import (
    ArrayLike,
    LinearProbe,
    MultiLayerProbe,
    ProbeTokenEnsemble,
    as_binary_labels,
    as_features,
    rates_at_threshold,
    roc_auc,
    threshold_at_fpr,
    youden_threshold,
)

logger = logging.getLogger(__name__)

THRESHOLD_METHODS: tuple[str, ...] = ("youden", "fpr")
WEIGHT_DECAY_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""A grid for :func:`cross_validated_weight_decay`: with hundreds of prompts and d_model in the hundreds
or thousands, the best penalty on standardised features spans these decades."""


def stratified_split(labels: ArrayLike, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Shuffle indices per class with ``seed`` and put ``val_fraction`` of each class in validation.

    Returns:
        ``(train_indices, val_indices)``, each sorted ascending.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    values = torch.as_tensor(labels).cpu()
    targets = as_binary_labels(values, values.shape[0] if values.dim() else 0).numpy()
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for label in (0, 1):
        rows = np.flatnonzero(targets == label)
        rng.shuffle(rows)
        n_val = int(round(val_fraction * len(rows)))
        if len(rows) >= 2:
            n_val = min(max(n_val, 1), len(rows) - 1)
        val.extend(rows[:n_val].tolist())
        train.extend(rows[n_val:].tolist())
    return sorted(train), sorted(val)


def stratified_folds(labels: ArrayLike, folds: int = 5, seed: int = 0) -> list[list[int]]:
    """Seeded folds with each class dealt round-robin after shuffling, so every fold has both classes.

    Returns:
        ``folds`` lists of row indices (sorted), together covering every row once.
    """
    values = torch.as_tensor(labels).cpu()
    targets = as_binary_labels(values, values.shape[0] if values.dim() else 0).numpy()
    smallest = min(int((targets == 0).sum()), int((targets == 1).sum()))
    if not 2 <= folds <= smallest:
        raise ValueError(f"folds must be in [2, {smallest}] (rows of the smaller class), got {folds}")
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(targets), dtype=np.int64)
    for label in (0, 1):
        rows = np.flatnonzero(targets == label)
        rng.shuffle(rows)
        assignment[rows] = np.arange(len(rows)) % folds
    return [np.flatnonzero(assignment == fold).tolist() for fold in range(folds)]


def cross_validated_weight_decay(
    features: ArrayLike,
    labels: ArrayLike,
    grid: Sequence[float] = WEIGHT_DECAY_GRID,
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 500,
    progress: bool = True,
) -> tuple[float, dict[float, float]]:
    """The weight decay of highest mean held-out-fold ROC-AUC (the larger one among ties: more regularised).

    Args:
        features: ``[N, d_model]``.
        labels: ``[N]`` in {0, 1}.
        grid: Candidate weight decays.

    Returns:
        ``(best weight decay, {weight decay: mean fold AUC})``.
    """
    from tqdm.auto import tqdm

    if not grid:
        raise ValueError("the weight-decay grid is empty")
    features_64 = as_features(features)
    targets = as_binary_labels(labels, features_64.shape[0])
    splits = stratified_folds(targets, folds, seed)
    aucs: dict[float, float] = {}
    for weight_decay in tqdm(sorted(grid), desc="cross-validate weight decay", disable=not progress):
        fold_aucs = []
        for held_out in splits:
            keep = torch.ones(len(targets), dtype=torch.bool)
            keep[held_out] = False
            probe = LinearProbe(features_64.shape[1], weight_decay=weight_decay)
            probe.fit(features_64[keep], targets[keep], max_iter=max_iter, progress=False)
            fold_aucs.append(probe.roc_auc(features_64[held_out], targets[held_out]))
        aucs[float(weight_decay)] = float(np.mean(fold_aucs))
    best = max(aucs, key=lambda weight_decay: (aucs[weight_decay], weight_decay))
    return best, aucs


def choose_threshold(
    scores: ArrayLike, labels: ArrayLike, method: str = "youden", target_fpr: float = 0.05
) -> tuple[float, float, float]:
    """``(threshold, tpr, fpr)`` by Youden's J (``youden``) or the highest TPR at ``fpr <= target_fpr`` (``fpr``)."""
    if method == "youden":
        return youden_threshold(scores, labels)
    if method == "fpr":
        return threshold_at_fpr(scores, labels, target_fpr)
    raise ValueError(f"unknown threshold method {method!r}; valid: {list(THRESHOLD_METHODS)}")


def _metrics(
    train_scores: torch.Tensor, y_train: torch.Tensor, val_scores: torch.Tensor, y_val: torch.Tensor, method: str,
    target_fpr: float,
) -> dict[str, Any]:
    threshold, tpr, fpr = choose_threshold(val_scores, y_val, method, target_fpr)
    predicted = (val_scores >= threshold).long()
    return {
        "auc_val": roc_auc(val_scores, y_val),
        "auc_train": roc_auc(train_scores, y_train),
        "threshold_logit": threshold,
        "threshold_method": method,
        "target_fpr": target_fpr if method == "fpr" else None,
        "tpr": tpr,
        "fpr": fpr,
        "accuracy_val": float((predicted == y_val).double().mean()),
        "n_train": int(y_train.shape[0]),
        "n_val": int(y_val.shape[0]),
    }


def train_probe(
    acts_train: ArrayLike,
    y_train: ArrayLike,
    acts_val: ArrayLike,
    y_val: ArrayLike,
    weight_decay: float | Sequence[float] = 1e-2,
    categories_train: Sequence[str | None] | None = None,
    category_names: Sequence[str] | None = None,
    threshold_method: str = "youden",
    target_fpr: float = 0.05,
    layer: int | None = None,
    hook_kind: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    cv_folds: int = 5,
    seed: int = 0,
    max_iter: int = 500,
    progress: bool = True,
) -> tuple[LinearProbe, dict[str, Any]]:
    """Fit a probe on the training split and set its threshold on the validation split.

    Args:
        acts_train: ``[N_train, d_model]``.
        y_train: ``[N_train]`` in {0, 1} (1 = harmful).
        acts_val: ``[N_val, d_model]``.
        y_val: ``[N_val]`` in {0, 1}; both classes must occur.
        weight_decay: L2 penalty (see :class:`LinearProbe`), or a grid (e.g. :data:`WEIGHT_DECAY_GRID`)
            to choose from by ``cv_folds``-fold cross-validation on the training split (seeded by ``seed``),
            leaving the validation split for the threshold.
        categories_train: Category per training row, to fit a category head (read on harmful rows).
        category_names: Head order; default the sorted categories of the harmful training rows.
        threshold_method: ``youden`` or ``fpr`` (see :func:`choose_threshold`).
        target_fpr: False-positive-rate budget of the ``fpr`` method.
        layer: Recorded on the probe.
        hook_kind: Recorded on the probe.
        metadata: Extra fields saved with the probe; the metrics are added under ``"metrics"``.

    Returns:
        ``(probe, metrics)`` where metrics has ``auc_val``, ``auc_train``, ``threshold_logit`` and
        ``threshold`` (its probability), ``tpr`` and ``fpr`` at the threshold on validation,
        ``accuracy_val``, ``n_train``, ``n_val``, ``weight_decay`` (the one used), ``cv_auc``
        (``[[weight decay, mean fold AUC], ...]`` when a grid was given) and ``categories`` (with a head).
    """
    train_features = as_features(acts_train, what="training activations")
    val_features = as_features(acts_val, train_features.shape[1], what="validation activations")
    train_labels = as_binary_labels(y_train, train_features.shape[0], what="training labels")
    val_labels = as_binary_labels(y_val, val_features.shape[0], what="validation labels")
    cv_auc = None
    if not isinstance(weight_decay, (int, float)):
        weight_decay, by_decay = cross_validated_weight_decay(
            train_features, train_labels, list(weight_decay), cv_folds, seed, max_iter, progress
        )
        cv_auc = [[decay, auc] for decay, auc in by_decay.items()]
    if categories_train is not None and category_names is None:
        category_names = sorted(
            {str(categories_train[row]) for row in torch.nonzero(train_labels == 1).flatten().tolist()}
        )
    probe = LinearProbe(
        d_model=train_features.shape[1],
        weight_decay=weight_decay,
        layer=layer,
        hook_kind=hook_kind,
        categories=category_names if categories_train is not None else None,
        metadata=metadata,
    )
    probe.fit(train_features, train_labels, categories=categories_train, max_iter=max_iter, progress=progress)
    metrics = _metrics(
        probe.decision_function(train_features), train_labels, probe.decision_function(val_features), val_labels,
        threshold_method, target_fpr,
    )
    probe.set_threshold_logit(metrics["threshold_logit"])
    metrics["threshold"] = probe.threshold
    metrics["weight_decay"] = float(weight_decay)
    metrics["cv_auc"] = cv_auc
    if categories_train is not None:
        metrics["categories"] = probe.categories
    probe.metadata["metrics"] = metrics
    logger.info(
        "probe (layer %s): val AUC %.4f, threshold %.4f (probability), TPR %.3f, FPR %.3f",
        layer, metrics["auc_val"], metrics["threshold"], metrics["tpr"], metrics["fpr"],
    )
    return probe, metrics


def category_accuracy(probe: LinearProbe, acts: ArrayLike, categories: Sequence[str]) -> float:
    """Accuracy of the category head on harmful rows ``[N, d_model]`` with their true categories."""
    predicted = probe.predict_category(acts)
    if len(predicted) != len(categories):
        raise ValueError(f"{len(predicted)} rows but {len(categories)} categories")
    return float(np.mean([guess == truth for guess, truth in zip(predicted, categories)]))


def _layer_map(acts_by_layer: Mapping[int, torch.Tensor] | CachedActivations) -> Mapping[int, torch.Tensor]:
    return acts_by_layer.acts if isinstance(acts_by_layer, CachedActivations) else acts_by_layer


def probe_auc_by_layer(
    acts_by_layer: Mapping[int, torch.Tensor] | CachedActivations,
    labels: ArrayLike,
    split: tuple[Sequence[int], Sequence[int]],
    weight_decay: float | Sequence[float] = 1e-2,
    max_iter: int = 500,
    progress: bool = True,
) -> dict[int, float]:
    """Validation ROC-AUC of a probe trained at each layer, for choosing the probe's layer.

    Args:
        acts_by_layer: Layer → ``[N, d_model]`` (or :class:`CachedActivations`).
        labels: ``[N]`` in {0, 1}.
        split: ``(train_indices, val_indices)`` into the N rows (e.g. :func:`stratified_split`).
        weight_decay: As in :func:`train_probe` (a grid is cross-validated per layer).

    Returns:
        Layer → validation AUC, layers ascending.
    """
    from tqdm.auto import tqdm

    layer_map = _layer_map(acts_by_layer)
    if not layer_map:
        raise ValueError("no layers given")
    train_rows, val_rows = (list(part) for part in split)
    if set(train_rows) & set(val_rows):
        raise ValueError("train and validation indices overlap")
    aucs = {}
    for layer in tqdm(sorted(layer_map), desc="probe AUC by layer", disable=not progress):
        acts = torch.as_tensor(layer_map[layer])
        targets = as_binary_labels(labels, acts.shape[0])
        _, metrics = train_probe(
            acts[train_rows], targets[train_rows], acts[val_rows], targets[val_rows],
            weight_decay=weight_decay, layer=layer, max_iter=max_iter, progress=False,
        )
        aucs[layer] = metrics["auc_val"]
    return aucs


def best_layer(aucs: Mapping[int, float]) -> int:
    """The layer of highest AUC (the shallowest among ties, as it is cheapest to reach)."""
    if not aucs:
        raise ValueError("no layers given")
    return min(aucs, key=lambda layer: (-aucs[layer], layer))


def train_multi_layer_probe(
    acts_train: Mapping[int, ArrayLike],
    y_train: ArrayLike,
    acts_val: Mapping[int, ArrayLike],
    y_val: ArrayLike,
    weight_decay: float | Sequence[float] = 1e-2,
    threshold_method: str = "youden",
    target_fpr: float = 0.05,
    hook_kind: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    max_iter: int = 500,
    progress: bool = True,
) -> tuple[MultiLayerProbe, dict[str, Any]]:
    """Fit one probe per layer, average their logits and set the threshold on validation.

    Args:
        acts_train: Layer → ``[N_train, d_model]``.
        acts_val: Layer → ``[N_val, d_model]`` with the same layers.

    Returns:
        ``(probe, metrics)`` as in :func:`train_probe`, plus ``auc_val_by_layer``.
    """
    from tqdm.auto import tqdm

    if set(acts_train) != set(acts_val):
        raise ValueError(f"training layers {sorted(acts_train)} != validation layers {sorted(acts_val)}")
    probes: dict[int, LinearProbe] = {}
    per_layer: dict[int, float] = {}
    for layer in tqdm(sorted(acts_train), desc="fit per-layer probes", disable=not progress):
        probes[layer], layer_metrics = train_probe(
            acts_train[layer], y_train, acts_val[layer], y_val, weight_decay=weight_decay,
            threshold_method=threshold_method, target_fpr=target_fpr, layer=layer, hook_kind=hook_kind,
            max_iter=max_iter, progress=False,
        )
        per_layer[layer] = layer_metrics["auc_val"]
    probe = MultiLayerProbe(probes, metadata=metadata)
    train_labels = as_binary_labels(y_train, len(torch.as_tensor(y_train)))
    val_labels = as_binary_labels(y_val, len(torch.as_tensor(y_val)))
    metrics = _metrics(
        probe.decision_function(acts_train), train_labels, probe.decision_function(acts_val), val_labels,
        threshold_method, target_fpr,
    )
    metrics["auc_val_by_layer"] = per_layer
    probe.set_threshold_logit(metrics["threshold_logit"])
    metrics["threshold"] = probe.threshold
    probe.metadata["metrics"] = metrics
    return probe, metrics


def train_probe_token_ensemble(
    probe: LinearProbe,
    acts_val: ArrayLike,
    token_val: ArrayLike,
    y_val: ArrayLike,
    threshold_method: str = "youden",
    target_fpr: float = 0.05,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[ProbeTokenEnsemble, dict[str, Any]]:
    """Average a fitted probe with the model's refusal-token score; standardise and threshold on validation rows.

    Only rows the probe was not trained on are needed (and only their token scores: one forward pass
    over the validation prompts).

    Args:
        probe: Fitted on other rows (e.g. by :func:`train_probe`).
        acts_val: ``[N_val, d_model]`` validation activations at the probe's layer.
        token_val: ``[N_val]`` refusal-token scores of the same rows (:func:`scripts.steering.token_router_scores`).
        y_val: ``[N_val]`` in {0, 1}.

    Returns:
        ``(ensemble, metrics)``: ``auc_val``, ``threshold`` (on the ensemble's scale), ``tpr``, ``fpr``,
        ``threshold_method``, ``target_fpr``, ``n_val``.
    """
    ensemble = ProbeTokenEnsemble(probe, metadata=metadata).fit(acts_val, token_val)
    val_scores = ensemble.decision_function(acts_val, token_val)
    labels = as_binary_labels(y_val, val_scores.shape[0])
    threshold, tpr, fpr = choose_threshold(val_scores, labels, threshold_method, target_fpr)
    ensemble.set_threshold(threshold)
    metrics = {
        "auc_val": roc_auc(val_scores, labels),
        "threshold": threshold,
        "threshold_method": threshold_method,
        "target_fpr": target_fpr if threshold_method == "fpr" else None,
        "tpr": tpr,
        "fpr": fpr,
        "n_val": int(labels.shape[0]),
    }
    ensemble.metadata["metrics"] = metrics
    logger.info("probe+token ensemble: val AUC %.4f, TPR %.3f, FPR %.3f", metrics["auc_val"], tpr, fpr)
    return ensemble, metrics


def evaluate_probe(probe: LinearProbe, acts: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """AUC, and TPR/FPR/accuracy at the probe's stored threshold, on held-out ``[N, d_model]`` activations."""
    scores = probe.decision_function(acts)
    targets = as_binary_labels(labels, scores.shape[0])
    tpr, fpr = rates_at_threshold(scores, targets, float(probe.threshold_logit))
    return {
        "auc": roc_auc(scores, targets),
        "tpr": tpr,
        "fpr": fpr,
        "accuracy": float((probe.predict(acts) == targets).double().mean()),
    }
