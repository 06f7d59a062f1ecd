"""Harmful-vs-benign linear probe on residual activations, with an optional category head, and its metrics.

:class:`LinearProbe` is a ``torch.nn.Module``: standardisation (train mean and std, stored as buffers)
followed by one logistic unit, trained by full-batch L-BFGS on the convex objective
``mean logistic loss + (weight_decay / 2)·‖w‖²`` (the bias is not penalised). Initialisation is zero,
so training is deterministic; the optimum is scikit-learn's ``LogisticRegression(C=1 / (N·weight_decay))``
on the standardised features. Because it is a module, it can also run inside a hook on the model's
own device. Conventions follow scikit-learn where the router allows: :meth:`~LinearProbe.fit` returns
the probe, :meth:`~LinearProbe.decision_function` gives logits, :meth:`~LinearProbe.score` is
accuracy, ROC-AUC is :meth:`~LinearProbe.roc_auc`; but :meth:`~LinearProbe.predict_proba` returns the
harmful probability ``[N]`` (not scikit-learn's ``[N, 2]``) and :attr:`~LinearProbe.threshold` is a
probability, because that is the interface :class:`scripts.steering.HarmfulnessProbe` routes with
(``predict_proba(x) >= threshold``).

The threshold is chosen on the logit scale (probabilities saturate to 1.0 in float32 and tie; logits
do not) by :func:`youden_threshold` or :func:`threshold_at_fpr`, stored as the ``threshold_logit``
buffer, and exposed as the probability ``sigmoid(threshold_logit)`` computed in float64.

The optional category head is a multinomial logistic regression over harmful categories, fitted on
the harmful rows only, so a router can pick which category's vector to apply.

:class:`MultiLayerProbe` averages the logits of per-layer probes. :class:`ProbeTokenEnsemble` averages a
probe's logit with the model's own refusal-token score, each standardised on held-out validation rows.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Self, Sequence

import numpy as np
import torch

from scripts.hooked_model import HOOK_KINDS

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MIN_STD = 1e-6

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


# ---------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------


def as_features(features: ArrayLike, d_model: int | None = None, what: str = "activations") -> torch.Tensor:
    """Validate and convert activations to a float64 CPU tensor ``[N, d_model]``.

    Raises:
        ValueError: not 2-D, no rows, wrong width, or non-finite values.
    """
    tensor = torch.as_tensor(features).detach().to(device="cpu", dtype=torch.float64)
    if tensor.dim() != 2:
        raise ValueError(f"{what} must be [N, d_model], got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"{what} has no rows")
    if d_model is not None and tensor.shape[1] != d_model:
        raise ValueError(f"{what} have width {tensor.shape[1]}, the probe expects d_model={d_model}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contain non-finite values (NaN or inf)")
    return tensor


def as_binary_labels(labels: ArrayLike, n: int, what: str = "labels") -> torch.Tensor:
    """Validate labels ``[N]`` with values in {0, 1} (1 = harmful) and return them as a long tensor."""
    tensor = torch.as_tensor(labels).detach().cpu()
    if tensor.dim() != 1 or tensor.shape[0] != n:
        raise ValueError(f"{what} must be a [N] vector with N={n}, got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contain non-finite values")
    values = set(torch.unique(tensor).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"{what} must be 0 (benign) or 1 (harmful), got values {sorted(values)}")
    return tensor.long()


def _as_scores(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    score_array = np.asarray(torch.as_tensor(scores).detach().cpu().double())
    if score_array.ndim != 1:
        raise ValueError(f"scores must be [N], got shape {score_array.shape}")
    if not np.isfinite(score_array).all():
        raise ValueError("scores contain non-finite values")
    label_array = np.asarray(as_binary_labels(labels, score_array.shape[0]))
    if label_array.min() == label_array.max():
        raise ValueError("ROC metrics need both classes (0 and 1) among the labels")
    return score_array, label_array


# ---------------------------------------------------------------------------------------------------
# Metrics (pure functions)
# ---------------------------------------------------------------------------------------------------


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count one half).

    Args:
        scores: ``[N]``, higher means more likely harmful.
        labels: ``[N]`` in {0, 1}.
    """
    score_array, label_array = _as_scores(scores, labels)
    order = np.argsort(score_array, kind="mergesort")
    sorted_scores = score_array[order]
    ranks = np.empty(len(score_array), dtype=np.float64)
    start = 0
    # Tied scores share the average of the ranks they span.
    while start < len(sorted_scores):
        stop = start
        while stop + 1 < len(sorted_scores) and sorted_scores[stop + 1] == sorted_scores[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    positives = int(label_array.sum())
    negatives = len(label_array) - positives
    rank_sum = ranks[label_array == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def roc_points(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every operating point ``score >= t`` for ``t`` over the distinct scores, highest first.

    Returns:
        ``(thresholds [K], tpr [K], fpr [K])``.
    """
    score_array, label_array = _as_scores(scores, labels)
    order = np.argsort(-score_array, kind="mergesort")
    sorted_scores = score_array[order]
    true_positives = np.cumsum(label_array[order] == 1)
    false_positives = np.cumsum(label_array[order] == 0)
    # The operating point of a distinct score counts every row tied with it: the last of its run.
    last_of_run = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    thresholds = sorted_scores[last_of_run]
    tpr = true_positives[last_of_run] / true_positives[-1]
    fpr = false_positives[last_of_run] / false_positives[-1]
    return thresholds, tpr, fpr


def _between(thresholds: np.ndarray, index: int) -> float:
    """A threshold halfway between the chosen distinct score and the next lower one (same split, more margin)."""
    if index + 1 < len(thresholds):
        return float((thresholds[index] + thresholds[index + 1]) / 2)
    return float(thresholds[index])


def youden_threshold(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float, float]:
    """The threshold maximising Youden's J = TPR − FPR (predict harmful when ``score >= threshold``).

    Among equally good points the highest threshold (fewest positives) wins. The threshold returned
    lies halfway to the next lower score, which classifies the given data identically.

    Returns:
        ``(threshold, tpr, fpr)`` at that threshold.
    """
    thresholds, tpr, fpr = roc_points(scores, labels)
    best = int(np.argmax(tpr - fpr))
    return _between(thresholds, best), float(tpr[best]), float(fpr[best])


def threshold_at_fpr(scores: ArrayLike, labels: ArrayLike, target_fpr: float) -> tuple[float, float, float]:
    """The lowest threshold whose false-positive rate is at most ``target_fpr`` (the highest TPR under it).

    Returns:
        ``(threshold, tpr, fpr)`` at that threshold.
    """
    if not 0 <= target_fpr <= 1:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    thresholds, tpr, fpr = roc_points(scores, labels)
    allowed = np.flatnonzero(fpr <= target_fpr)
    if allowed.size == 0:
        # Even the highest score admits too many negatives: predict nothing harmful.
        return float(thresholds[0] + 1.0), 0.0, 0.0
    best = int(allowed[-1])
    return _between(thresholds, best), float(tpr[best]), float(fpr[best])


def rates_at_threshold(scores: ArrayLike, labels: ArrayLike, threshold: float) -> tuple[float, float]:
    """``(tpr, fpr)`` of predicting harmful when ``score >= threshold``."""
    score_array, label_array = _as_scores(scores, labels)
    predicted = score_array >= threshold
    tpr = float(predicted[label_array == 1].mean())
    fpr = float(predicted[label_array == 0].mean())
    return tpr, fpr


# ---------------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------------


def _lbfgs(parameters: list[torch.Tensor], objective, max_iter: int, desc: str, progress: bool) -> None:
    """Minimise ``objective()`` over ``parameters`` with full-batch L-BFGS (strong Wolfe line search)."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.LBFGS(
        parameters,
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )
    bar = tqdm(total=2 * max_iter, desc=desc, disable=not progress, leave=False)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        bar.update(1)
        return loss

    try:
        optimizer.step(closure)
    finally:
        bar.close()


def _fit_binary(
    standardized: torch.Tensor, labels: torch.Tensor, weight_decay: float, max_iter: int, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression on standardised features; returns ``(weight [d], bias [])``."""
    weight = torch.zeros(standardized.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    targets = labels.double()

    def objective() -> torch.Tensor:
        logits = standardized @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        return loss + 0.5 * weight_decay * weight.pow(2).sum()

    _lbfgs([weight, bias], objective, max_iter, "fit probe", progress)
    return weight.detach(), bias.detach()


def _fit_multinomial(
    standardized: torch.Tensor, classes: torch.Tensor, n_classes: int, weight_decay: float, max_iter: int,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised softmax regression; returns ``(weight [C, d], bias [C])``."""
    weight = torch.zeros(n_classes, standardized.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)

    def objective() -> torch.Tensor:
        logits = standardized @ weight.T + bias
        loss = torch.nn.functional.cross_entropy(logits, classes)
        return loss + 0.5 * weight_decay * weight.pow(2).sum()

    _lbfgs([weight, bias], objective, max_iter, "fit category head", progress)
    return weight.detach(), bias.detach()


# ---------------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------------


class _Thresholded:
    """The decision threshold shared by :class:`LinearProbe` and :class:`MultiLayerProbe`.

    Both keep it as a ``threshold_logit`` buffer on their (harmful) logit scale.
    """

    threshold_logit: torch.Tensor

    def set_threshold_logit(self, threshold: float) -> Self:
        """Set the decision threshold on the logit scale (harmful when ``logit >= threshold``)."""
        _fill_threshold(self.threshold_logit, threshold)
        return self

    @property
    def threshold(self) -> float:
        """The decision threshold as a harmful probability: ``sigmoid(threshold_logit)`` in float64."""
        return float(torch.sigmoid(self.threshold_logit.detach().to(torch.float64)))


class LinearProbe(_Thresholded, torch.nn.Module):
    """Standardisation + logistic unit (+ optional multinomial category head) on ``[..., d_model]`` activations.

    Attributes:
        d_model: Input width.
        weight_decay: L2 penalty on the (standardised) weights.
        layer: Layer the activations come from (metadata).
        hook_kind: Hook kind the activations come from (metadata).
        categories: Category names of the head, in head order (empty without a head).
        metadata: Free-form JSON-serialisable fields saved with the probe (model, metrics…).

    Buffers: ``mean [d_model]``, ``std [d_model]``, ``weight [d_model]``, ``bias []``,
    ``threshold_logit []``, and with a head ``category_weight [C, d_model]``, ``category_bias [C]``.
    """

    def __init__(
        self,
        d_model: int,
        weight_decay: float = 1e-2,
        layer: int | None = None,
        hook_kind: str | None = None,
        categories: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if hook_kind is not None and hook_kind not in HOOK_KINDS:
            raise ValueError(f"unknown hook kind {hook_kind!r}; valid kinds: {list(HOOK_KINDS)}")
        self.d_model = d_model
        self.weight_decay = float(weight_decay)
        self.layer = layer
        self.hook_kind = hook_kind
        self.categories: list[str] = list(categories or [])
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"category names must be distinct, got {self.categories}")
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.register_buffer("mean", torch.zeros(d_model))
        self.register_buffer("std", torch.ones(d_model))
        self.register_buffer("weight", torch.zeros(d_model))
        self.register_buffer("bias", torch.zeros(()))
        # float64: the threshold is a single number compared against float64 metrics; keep it exact.
        self.register_buffer("threshold_logit", torch.zeros((), dtype=torch.float64))
        if self.categories:
            self.register_buffer("category_weight", torch.zeros(len(self.categories), d_model))
            self.register_buffer("category_bias", torch.zeros(len(self.categories)))
        self.fitted = False

    # -- training --------------------------------------------------------------------------------

    def fit(
        self,
        features: ArrayLike,
        labels: ArrayLike,
        categories: Sequence[str | None] | None = None,
        max_iter: int = 500,
        progress: bool = True,
    ) -> "LinearProbe":
        """Fit standardisation, the harmful-vs-benign unit and (with a head) the category head.

        Args:
            features: ``[N, d_model]``.
            labels: ``[N]`` in {0, 1} (1 = harmful); both classes must occur.
            categories: Category per row, read on harmful rows (benign rows may hold anything, e.g.
                ``None``); required exactly when the probe has a category head. A harmful row with
                ``None`` (an uncategorised harmful source) trains the harmful unit but not the head.
            max_iter: L-BFGS iterations per fit.

        Returns:
            ``self``. The threshold is left at probability 0.5; see :meth:`set_threshold_logit`.
        """
        features_64 = as_features(features, self.d_model)
        targets = as_binary_labels(labels, features_64.shape[0])
        if targets.min() == targets.max():
            raise ValueError("fit needs both classes (0 = benign, 1 = harmful) among the labels")
        mean = features_64.mean(dim=0)
        std = features_64.std(dim=0, unbiased=False)
        # A constant feature carries no information; dividing by ~0 would only amplify noise.
        std = torch.where(std < _MIN_STD, torch.ones_like(std), std)
        standardized = (features_64 - mean) / std
        weight, bias = _fit_binary(standardized, targets, self.weight_decay, max_iter, progress)
        with torch.no_grad():
            self.mean.copy_(mean)
            self.std.copy_(std)
            self.weight.copy_(weight)
            self.bias.copy_(bias)
        if self.categories:
            if categories is None:
                raise ValueError(f"this probe has a category head over {self.categories}; pass categories")
            self._fit_head(standardized, targets, categories, max_iter, progress)
        elif categories is not None:
            raise ValueError("categories given but the probe has no category head (construct it with categories=...)")
        self.fitted = True
        return self

    def _fit_head(
        self, standardized: torch.Tensor, targets: torch.Tensor, categories: Sequence[str | None], max_iter: int,
        progress: bool,
    ) -> None:
        if len(categories) != standardized.shape[0]:
            raise ValueError(f"{len(categories)} categories for {standardized.shape[0]} rows")
        # Harmful rows without a category (an uncategorised harmful source) shape the harmful/benign
        # direction only.
        harmful_rows = [row for row in torch.nonzero(targets == 1).flatten().tolist() if categories[row] is not None]
        if not harmful_rows:
            raise ValueError("the category head needs harmful rows with a category; all are None")
        unknown = sorted({str(categories[row]) for row in harmful_rows} - set(self.categories))
        if unknown:
            raise ValueError(f"unknown categories {unknown} on harmful rows; valid categories: {self.categories}")
        index = {name: position for position, name in enumerate(self.categories)}
        classes = torch.tensor([index[categories[row]] for row in harmful_rows], dtype=torch.long)
        weight, bias = _fit_multinomial(
            standardized[harmful_rows], classes, len(self.categories), self.weight_decay, max_iter, progress
        )
        with torch.no_grad():
            self.category_weight.copy_(weight)
            self.category_bias.copy_(bias)

    # -- inference -------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("this probe is not fitted yet; call fit() or load()")

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        """Harmful logits ``[...]`` of activations ``[..., d_model]`` (on the probe's device; any float dtype)."""
        if activations.shape[-1] != self.d_model:
            raise ValueError(f"activations have width {activations.shape[-1]}, the probe expects {self.d_model}")
        standardized = (activations.to(self.mean.dtype) - self.mean) / self.std
        return standardized @ self.weight + self.bias

    def category_logits(self, activations: torch.Tensor) -> torch.Tensor:
        """Category-head logits ``[..., C]`` of activations ``[..., d_model]``."""
        if not self.categories:
            raise RuntimeError("this probe has no category head")
        standardized = (activations.to(self.mean.dtype) - self.mean) / self.std
        return standardized @ self.category_weight.T + self.category_bias

    def decision_function(self, features: ArrayLike) -> torch.Tensor:
        """Harmful logits ``[N]`` (float32, CPU) of ``[N, d_model]`` activations."""
        self._check_fitted()
        features_32 = as_features(features, self.d_model).to(self.mean.device, self.mean.dtype)
        with torch.no_grad():
            return self(features_32).cpu()

    def predict_proba(self, features: ArrayLike) -> torch.Tensor:
        """Harmful probability ``[N]`` (float32, CPU) of ``[N, d_model]`` activations."""
        return torch.sigmoid(self.decision_function(features))

    def predict(self, features: ArrayLike) -> torch.Tensor:
        """``[N]`` long: 1 (harmful) where the logit reaches ``threshold_logit``, else 0."""
        return (self.decision_function(features) >= float(self.threshold_logit)).long()

    def score(self, features: ArrayLike, labels: ArrayLike) -> float:
        """Accuracy of :meth:`predict` (scikit-learn's ``score`` convention)."""
        predicted = self.predict(features)
        return float((predicted == as_binary_labels(labels, predicted.shape[0])).double().mean())

    def roc_auc(self, features: ArrayLike, labels: ArrayLike) -> float:
        """ROC-AUC of the harmful logits."""
        return roc_auc(self.decision_function(features), labels)

    def predict_category_proba(self, features: ArrayLike) -> torch.Tensor:
        """``[N, C]`` category probabilities (float32, CPU; columns in :attr:`categories` order)."""
        self._check_fitted()
        features_32 = as_features(features, self.d_model).to(self.mean.device, self.mean.dtype)
        with torch.no_grad():
            return torch.softmax(self.category_logits(features_32), dim=-1).cpu()

    def predict_category(self, features: ArrayLike) -> list[str]:
        """The most likely category name per row."""
        return [self.categories[index] for index in self.predict_category_proba(features).argmax(dim=1).tolist()]

    # -- persistence -----------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Everything but the tensors, as a JSON-serialisable dict."""
        return {
            "format": FORMAT_VERSION,
            "kind": "linear_probe",
            "d_model": self.d_model,
            "weight_decay": self.weight_decay,
            "layer": self.layer,
            "hook_kind": self.hook_kind,
            "categories": self.categories,
            "threshold_logit": float(self.threshold_logit),
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write buffers and :meth:`config` (JSON metadata) to a safetensors file, atomically."""
        self._check_fitted()
        return _save_module(self, self.config(), path)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LinearProbe":
        """An unfitted probe shaped by a :meth:`config` dict."""
        return cls(
            d_model=int(config["d_model"]),
            weight_decay=float(config["weight_decay"]),
            layer=config["layer"],
            hook_kind=config["hook_kind"],
            categories=config["categories"],
            metadata=config["metadata"],
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "LinearProbe":
        """Read a probe written by :meth:`save` (threshold, layer, hook kind and metadata included)."""
        config, tensors = _read_module(path, "linear_probe")
        probe = cls.from_config(config)
        probe.load_state_dict(tensors, strict=True)
        probe.fitted = True
        return probe


class MultiLayerProbe(_Thresholded, torch.nn.Module):
    """The average of the harmful logits of per-layer :class:`LinearProbe` s.

    Attributes:
        probes: Layer (as a string key, as ``ModuleDict`` requires) → probe.
        hook_kind: Hook kind shared by the per-layer probes.
        metadata: Free-form JSON-serialisable fields saved with the probe.

    Buffers: ``threshold_logit []`` on the averaged-logit scale; :attr:`threshold` is its probability.
    """

    def __init__(self, probes: Mapping[int, LinearProbe], metadata: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not probes:
            raise ValueError("a multi-layer probe needs at least one layer")
        kinds = {probe.hook_kind for probe in probes.values()}
        if len(kinds) != 1:
            raise ValueError(f"per-layer probes must share one hook kind, got {sorted(map(str, kinds))}")
        self.probes = torch.nn.ModuleDict({str(layer): probes[layer] for layer in sorted(probes)})
        self.hook_kind = kinds.pop()
        self.metadata: dict[str, Any] = dict(metadata or {})
        # float64: the threshold is a single number compared against float64 metrics; keep it exact.
        self.register_buffer("threshold_logit", torch.zeros((), dtype=torch.float64))

    @property
    def layers(self) -> list[int]:
        """Layers, ascending."""
        return [int(layer) for layer in self.probes]

    def _check_layers(self, acts_by_layer: Mapping[int, Any]) -> None:
        missing = sorted(set(self.layers) - set(acts_by_layer))
        if missing:
            raise KeyError(f"activations lack layers {missing}; this probe needs layers {self.layers}")

    def forward(self, acts_by_layer: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Mean harmful logit ``[...]`` over layers of ``{layer: [..., d_model]}``."""
        self._check_layers(acts_by_layer)
        return torch.stack([self.probes[str(layer)](acts_by_layer[layer]) for layer in self.layers]).mean(dim=0)

    def decision_function(self, acts_by_layer: Mapping[int, ArrayLike]) -> torch.Tensor:
        """Mean harmful logit ``[N]`` (float32, CPU) over layers of ``{layer: [N, d_model]}``."""
        self._check_layers(acts_by_layer)
        return torch.stack(
            [self.probes[str(layer)].decision_function(acts_by_layer[layer]) for layer in self.layers]
        ).mean(dim=0)

    def predict_proba(self, acts_by_layer: Mapping[int, ArrayLike]) -> torch.Tensor:
        """Harmful probability ``[N]`` from the averaged logit."""
        return torch.sigmoid(self.decision_function(acts_by_layer))

    def predict(self, acts_by_layer: Mapping[int, ArrayLike]) -> torch.Tensor:
        """``[N]`` long: 1 where the averaged logit reaches ``threshold_logit``."""
        return (self.decision_function(acts_by_layer) >= float(self.threshold_logit)).long()

    def roc_auc(self, acts_by_layer: Mapping[int, ArrayLike], labels: ArrayLike) -> float:
        """ROC-AUC of the averaged logits."""
        return roc_auc(self.decision_function(acts_by_layer), labels)

    def config(self) -> dict[str, Any]:
        """Per-layer probe configs, threshold and metadata, as a JSON-serialisable dict."""
        return {
            "format": FORMAT_VERSION,
            "kind": "multi_layer_probe",
            "layers": {str(layer): self.probes[str(layer)].config() for layer in self.layers},
            "threshold_logit": float(self.threshold_logit),
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write every layer's buffers and :meth:`config` to one safetensors file."""
        return _save_module(self, self.config(), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "MultiLayerProbe":
        """Read a probe written by :meth:`save`."""
        config, tensors = _read_module(path, "multi_layer_probe")
        probes = {int(layer): LinearProbe.from_config(sub) for layer, sub in config["layers"].items()}
        probe = cls(probes, metadata=config["metadata"])
        probe.load_state_dict(tensors, strict=True)
        for sub in probe.probes.values():
            sub.fitted = True
        return probe


class ProbeTokenEnsemble(torch.nn.Module):
    """A probe's harmful logit and the model's own refusal-token score, each standardised, averaged.

    ``score = ½·((probe_logit − μ_probe) / σ_probe + (token_score − μ_token) / σ_token)``, where the
    token score is the log-odds of a refusal token over ``[respond]`` at the assistant's first position
    (:func:`scripts.steering.token_router_scores`) and μ, σ come from rows the probe was not trained on
    (:meth:`fit`; its logits on its own training rows are overconfident, so their spread would
    under-weight it on new prompts). The two scores fail on different prompt sources (the probe on look-alikes phrased
    unlike its benign data, the token on harmful prompts unlike the fine-tune's), so their mean ranks new
    sources better than either; equal weights, because weights tuned on validation data would favour
    whichever score fits the sources already seen.

    Attributes:
        probe: The :class:`LinearProbe` whose logit is one half (its own threshold is not used).
        metadata: Free-form JSON-serialisable fields saved with the ensemble.

    Buffers (float64 scalars): ``probe_mean``, ``probe_std``, ``token_mean``, ``token_std`` and
    ``threshold`` (harmful when ``score >= threshold``, on the score's own scale).
    """

    def __init__(self, probe: LinearProbe, metadata: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.probe = probe
        self.metadata: dict[str, Any] = dict(metadata or {})
        for name, value in (("probe_mean", 0.0), ("probe_std", 1.0), ("token_mean", 0.0), ("token_std", 1.0),
                            ("threshold", 0.0)):  # fmt: skip
            self.register_buffer(name, torch.tensor(value, dtype=torch.float64))
        self.fitted = False

    @property
    def layer(self) -> int | None:
        """The probe's layer."""
        return self.probe.layer

    @property
    def hook_kind(self) -> str | None:
        """The probe's hook kind."""
        return self.probe.hook_kind

    @property
    def categories(self) -> list[str]:
        """The probe's category-head names (empty without a head)."""
        return self.probe.categories

    def predict_category_proba(self, features: ArrayLike) -> torch.Tensor:
        """The probe's category-head probabilities ``[N, C]``."""
        return self.probe.predict_category_proba(features)

    def _inputs(self, features: ArrayLike, token_scores: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.probe.decision_function(features).double()
        tokens = torch.as_tensor(token_scores).detach().cpu().double()
        if tokens.shape != logits.shape:
            raise ValueError(f"token_scores must be [N] with N={logits.shape[0]}, got shape {tuple(tokens.shape)}")
        if not torch.isfinite(tokens).all():
            raise ValueError("token_scores contain NaN or infinite values")
        return logits, tokens

    def fit(self, features: ArrayLike, token_scores: ArrayLike) -> Self:
        """Standardisation of both scores, from rows the probe was not trained on (e.g. its validation rows).

        Args:
            features: ``[N, d_model]`` activations.
            token_scores: ``[N]`` the model's refusal-token scores of the same rows.

        Returns:
            ``self``; the threshold is left at 0 (see :meth:`set_threshold`).
        """
        logits, tokens = self._inputs(features, token_scores)
        if logits.shape[0] < 2:
            raise ValueError("fit needs at least two rows")
        with torch.no_grad():
            for name, values in (("probe", logits), ("token", tokens)):
                getattr(self, f"{name}_mean").fill_(float(values.mean()))
                getattr(self, f"{name}_std").fill_(max(float(values.std(unbiased=False)), _MIN_STD))
        self.fitted = True
        return self

    def set_threshold(self, threshold: float) -> Self:
        """Set the decision threshold on the ensemble score's scale."""
        _fill_threshold(self.threshold, threshold)
        return self

    def decision_function(self, features: ArrayLike, token_scores: ArrayLike) -> torch.Tensor:
        """Ensemble scores ``[N]`` (float64, CPU) of ``[N, d_model]`` activations and ``[N]`` token scores."""
        if not self.fitted:
            raise RuntimeError("this ensemble is not fitted yet; call fit() or load()")
        logits, tokens = self._inputs(features, token_scores)
        probe_z = (logits - self.probe_mean) / self.probe_std
        token_z = (tokens - self.token_mean) / self.token_std
        return (probe_z + token_z) / 2

    def predict(self, features: ArrayLike, token_scores: ArrayLike) -> torch.Tensor:
        """``[N]`` long: 1 where the ensemble score reaches :attr:`threshold`."""
        return (self.decision_function(features, token_scores) >= float(self.threshold)).long()

    def roc_auc(self, features: ArrayLike, token_scores: ArrayLike, labels: ArrayLike) -> float:
        """ROC-AUC of the ensemble scores."""
        return roc_auc(self.decision_function(features, token_scores), labels)

    def config(self) -> dict[str, Any]:
        """The probe's config, the standardisation, threshold and metadata, as a JSON-serialisable dict."""
        return {
            "format": FORMAT_VERSION,
            "kind": "probe_token_ensemble",
            "probe": self.probe.config(),
            **{name: float(getattr(self, name)) for name in ("probe_mean", "probe_std", "token_mean", "token_std")},
            "threshold": float(self.threshold),
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the probe's buffers, the ensemble's and :meth:`config` to one safetensors file."""
        if not self.fitted:
            raise RuntimeError("this ensemble is not fitted yet; call fit() before save()")
        return _save_module(self, self.config(), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ProbeTokenEnsemble":
        """Read an ensemble written by :meth:`save`."""
        config, tensors = _read_module(path, "probe_token_ensemble")
        probe = LinearProbe.from_config(config["probe"])
        ensemble = cls(probe, metadata=config["metadata"])
        ensemble.load_state_dict(tensors, strict=True)
        probe.fitted = True
        ensemble.fitted = True
        return ensemble


def _fill_threshold(buffer: torch.Tensor, threshold: float) -> None:
    """Write a finite decision threshold into a scalar buffer (a NaN or infinite one would route every row alike)."""
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    with torch.no_grad():
        buffer.fill_(float(threshold))


def _save_module(module: torch.nn.Module, config: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
    staging = path.with_name(path.name + ".part")
    save_file(tensors, str(staging), metadata={"probe": json.dumps(config, sort_keys=True)})
    os.replace(staging, path)
    return path


def _read_module(path: str | os.PathLike[str], kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("probe")
        if raw is None:
            raise ValueError(f"{path} has no probe metadata; was it written by a probe's save()?")
        config = json.loads(raw)
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if config.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has probe format {config.get('format')}, expected {FORMAT_VERSION}")
    if config.get("kind") != kind:
        raise ValueError(f"{path} holds a {config.get('kind')!r}, not a {kind!r}")
    return config, tensors
