"""The method's stages as functions, shared by the notebook, every leave-one-source-out fold and the data curve.

Each stage takes tensors and records and returns the fitted object; a change to a stage reaches every
caller. The sets are disjoint by normalised prompt (:func:`check_disjoint`): the rows that build the
vectors and train the probe (``train``) never score the layer/strength sweep or choose a threshold
(``validation``), and neither side shares a prompt with the evaluation prompts.

Stages:

* :func:`split_fit_rows`: de-duplicate by normalised prompt, then a seeded train/validation split
  stratified by label;
* :func:`fit_category_vectors`: one unit vector per category, with the strategy as a parameter;
* :func:`fit_routing_probe`: the harmful-vs-benign probe (and its category head), threshold on validation;
* :func:`fit_routing_policy`: how the router's score becomes a route and a strength, fitted on validation
  scores (binary, abstain between two thresholds, or graded by a Platt-calibrated probability);
* :func:`fit_router`: the router of a routing (``probe`` or ``probe+token``) from a fitted probe.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from scripts.data_splits import dedupe_records, normalize_text
from scripts.linear_probe import ArrayLike, LinearProbe, ProbeTokenEnsemble, threshold_at_fpr
from scripts.records import PromptRecord
from scripts.refusal_tokens import CategorySet
from scripts.steering import (
    CATEGORY_SOURCES,
    ROUTING_POLICIES,
    ROUTINGS,
    ProbeRouter,
    RoutingPolicy,
    abstain_policy,
    binary_policy,
    graded_policy,
    probe_router,
    probe_token_router,
)
from scripts.steering_vectors import SteeringVectors, build_steering_vectors, get_strategy
from scripts.train_linear_probe import stratified_split, train_probe, train_probe_token_ensemble

logger = logging.getLogger(__name__)

DEFAULT_VECTOR_METHOD = "mean_difference"
DEFAULT_CATEGORY_SOURCE = "probe_head"
"""Each routed prompt's category: the argmax of the probe's category head (``"token"``: the model's own token)."""
PLATT_L2 = 1e-3
"""L2 penalty on the Platt slope (:func:`platt_scaling`): keeps it finite where validation scores separate."""


def check_disjoint(sides: Mapping[str, Sequence[PromptRecord]]) -> None:
    """Raise if any normalised prompt lies on two of the named sides.

    Raises:
        ValueError: naming the two sides, how many prompts they share and one of them.
    """
    keys = {name: {normalize_text(record.prompt) for record in records} for name, records in sides.items()}
    names = list(keys)
    for i, left in enumerate(names):
        for right in names[i + 1 :]:
            shared = keys[left] & keys[right]
            if shared:
                raise ValueError(f"{len(shared)} normalised prompt(s) lie on both {left!r} and {right!r}, "
                                 f"e.g. {sorted(shared)[0]!r}")


def split_fit_rows(
    records: Sequence[PromptRecord], validation_fraction: float = 0.25, seed: int = 0
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """The rows that fit vectors and probe, and the validation rows that choose thresholds, layer and strengths.

    Duplicates (same normalised prompt) are dropped first, keeping the first; the split is seeded and
    stratified by label (:func:`scripts.train_linear_probe.stratified_split`), each side in input order.

    Raises:
        ValueError: a fraction outside (0, 1).
    """
    unique = dedupe_records(records)
    if len(unique) < len(records):
        logger.info("dropped %d duplicate prompt(s) before the train/validation split", len(records) - len(unique))
    train_rows, val_rows = stratified_split([record.label == "harmful" for record in unique], validation_fraction, seed)
    return [unique[i] for i in train_rows], [unique[i] for i in val_rows]


def _harmful_categories(records: Sequence[PromptRecord], category_set: CategorySet) -> list[str | None]:
    """Each row's category where it names one of the set's refusal tokens (harmful rows only), else ``None``."""
    return [record.category if record.label == "harmful" and record.category in category_set.tokens else None
            for record in records]  # fmt: skip


def fit_category_vectors(
    acts: torch.Tensor,
    records: Sequence[PromptRecord],
    category_set: CategorySet,
    layer: int,
    vector_method: str = DEFAULT_VECTOR_METHOD,
    hook_kind: str = "resid_post",
    model: str = "",
    template_hash: str = "",
    **hyperparameters: Any,
) -> SteeringVectors:
    """Unit category vectors from harmful rows of each category against every benign row.

    Harmful rows of a category outside ``category_set`` (e.g. AdvBench, HarmBench) name no refusal token
    and are left out; the mean residual norm is that of the rows used.

    Args:
        acts: ``[N, d_model]`` activations at ``layer``, rows aligned with ``records``.
        vector_method: A strategy name of :func:`scripts.steering_vectors.get_strategy`
            (``mean_difference``, ``contrastive``, ``ridge``), built with ``hyperparameters``.

    Raises:
        ValueError: rows and records differ in number.
        KeyError: a category of the set has no harmful row.
    """
    if acts.shape[0] != len(records):
        raise ValueError(f"{acts.shape[0]} activation rows for {len(records)} records")
    categories = _harmful_categories(records, category_set)
    used = [i for i, record in enumerate(records) if record.label == "benign" or categories[i] is not None]
    harmful = {}
    for category in category_set.categories:
        members = [i for i in used if categories[i] == category]
        if not members:
            raise KeyError(f"no harmful row of category {category!r} to build its vector")
        harmful[category] = acts[members]
    benign = acts[[i for i in used if records[i].label == "benign"]]
    return build_steering_vectors(
        harmful, benign, layer=layer, hook_kind=hook_kind, strategy=get_strategy(vector_method, **hyperparameters),
        model=model, template_hash=template_hash, mean_resid_norm=float(acts[used].norm(dim=-1).mean()),
    )  # fmt: skip


def _binary(records: Sequence[PromptRecord]) -> torch.Tensor:
    return torch.tensor([1 if record.label == "harmful" else 0 for record in records])


def fit_routing_probe(
    train_acts: torch.Tensor,
    train_records: Sequence[PromptRecord],
    val_acts: torch.Tensor,
    val_records: Sequence[PromptRecord],
    category_set: CategorySet,
    layer: int,
    hook_kind: str = "resid_post",
    threshold_method: str = "fpr",
    metadata: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> tuple[LinearProbe, dict[str, Any]]:
    """The harmful-vs-benign probe with a category head, fitted on ``train`` rows, thresholded on ``val`` rows.

    Args:
        train_acts: ``[N_train, d_model]`` at ``layer``, aligned with ``train_records``.
        val_acts: ``[N_val, d_model]`` at ``layer``, aligned with ``val_records``.
        threshold_method: ``fpr`` or ``youden`` (:func:`scripts.train_linear_probe.choose_threshold`).

    Returns:
        ``(probe, validation metrics)`` as :func:`scripts.train_linear_probe.train_probe`.
    """
    return train_probe(
        train_acts, _binary(train_records), val_acts, _binary(val_records),
        categories_train=_harmful_categories(train_records, category_set), category_names=category_set.categories,
        threshold_method=threshold_method, layer=layer, hook_kind=hook_kind, metadata=metadata, progress=progress,
    )  # fmt: skip


def _policy_inputs(val_scores: ArrayLike, val_labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``([N] float64 scores, [N] float64 labels in {0, 1})``, checked."""
    scores = np.asarray(torch.as_tensor(val_scores).detach().cpu().double())
    labels = np.asarray(torch.as_tensor(val_labels).detach().cpu().double())
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"val_scores and val_labels must both be [N], got shapes {scores.shape} and {labels.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("val_scores contain NaN or infinite values")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"val_labels must be 0 (benign) or 1 (harmful), got values {sorted(set(labels.tolist()))}")
    if labels.min() == labels.max():
        raise ValueError("fitting a routing policy needs both harmful (1) and benign (0) validation rows")
    return scores, labels


def platt_scaling(scores: ArrayLike, labels: ArrayLike, l2: float = PLATT_L2) -> tuple[float, float]:
    """Platt scaling: ``(slope, intercept)`` of a 1-D logistic regression of ``labels`` on ``scores``.

    Minimises ``mean logistic loss + (l2 / 2)·slope²`` (the intercept is not penalised) by Newton steps
    with a backtracking line search, in float64 from zero: deterministic. The objective is strictly
    convex when both labels occur, so this is its unique minimum; the penalty keeps the slope finite
    where the scores separate the labels.

    Args:
        scores: ``[N]`` decision scores, higher = more harmful.
        labels: ``[N]`` in {0, 1}, both present.
        l2: Penalty on the slope (positive).

    Raises:
        ValueError: shapes, values or labels as :func:`fit_routing_policy`, or ``l2 <= 0``.
    """
    if not l2 > 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    x, y = _policy_inputs(scores, labels)
    design = np.stack([x, np.ones_like(x)], axis=1)
    penalty = np.array([l2, 0.0])

    def objective(w: np.ndarray) -> float:
        z = design @ w
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w[0] ** 2)

    w = np.zeros(2)
    for _ in range(100):
        probability = np.exp(-np.logaddexp(0.0, -(design @ w)))  # sigmoid without overflow
        gradient = design.T @ (probability - y) / len(x) + penalty * w
        if np.abs(gradient).max() < 1e-12:
            break
        curvature = probability * (1.0 - probability)
        hessian = (design.T * curvature) @ design / len(x) + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        current, size = objective(w), 1.0
        # Halve the Newton step until it decreases the objective enough (Armijo).
        while objective(w - size * step) > current - 1e-4 * size * float(gradient @ step) and size > 1e-10:
            size /= 2
        if size <= 1e-10:
            break
        w = w - size * step
    return float(w[0]), float(w[1])


def fit_routing_policy(
    name: str,
    val_scores: ArrayLike,
    val_labels: ArrayLike,
    threshold: float,
    target_fpr: float = 0.05,
    target_fnr: float = 0.05,
) -> RoutingPolicy:
    """A :class:`~scripts.steering.RoutingPolicy` fitted on the router's scores of validation rows.

    * ``binary`` ignores the data (the router's own threshold decides).
    * ``abstain``: two bounds from the validation rows. The toward bound is
      ``max(threshold, threshold_at_fpr(val_scores, val_labels, target_fpr))``: at most ``target_fpr``
      of the benign validation rows reach it, and it is never below the router's own operating point.
      The away bound is the highest score below which at most ``target_fnr`` of the harmful
      validation rows fall (the ``(k+1)``-th smallest harmful score, ``k`` the most rows the rate
      allows). A row is steered toward refusal only at or above both (``high``), away only below both
      (``low``), and not at all in between. Where the validation scores separate the labels, the
      band is the gap between them: a prompt unlike either side, such as a look-alike from another
      source, is left unsteered instead of pushed by whichever side of one threshold it falls on.
    * ``graded``: Platt scaling (:func:`platt_scaling`) of the labels on the scores.

    Args:
        name: One of :data:`scripts.steering.ROUTING_POLICIES`.
        val_scores: ``[N]`` the router's decision scores of the validation rows (probe logits, or
            ensemble scores), on the scale ``threshold`` is on.
        val_labels: ``[N]`` 1 harmful, 0 benign; both must occur.
        threshold: The router's own decision threshold on that scale.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), shapes that differ, non-finite
            scores or threshold, labels outside {0, 1} or of one class only, or rates outside [0, 1].
    """
    if name not in ROUTING_POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; valid: {list(ROUTING_POLICIES)}")
    if name == "binary":
        return binary_policy()
    scores, labels = _policy_inputs(val_scores, val_labels)
    if name == "graded":
        return graded_policy(*platt_scaling(scores, labels))
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if not (0 <= target_fpr <= 1 and 0 <= target_fnr <= 1):
        raise ValueError(f"target_fpr and target_fnr must be in [0, 1], got {target_fpr} and {target_fnr}")
    toward = max(float(threshold), threshold_at_fpr(scores, labels, target_fpr)[0])
    harmful = np.sort(scores[labels == 1])
    # k: the most harmful rows that may fall below the away bound (the rate as a checker computes it, k / P <= target).
    counts = np.arange(len(harmful) + 1)
    k = int(counts[counts / len(harmful) <= target_fnr].max())
    away = float(harmful[k]) if k < len(harmful) else toward
    return abstain_policy(min(toward, away), max(toward, away))


def fit_router(
    routing: str,
    probe: LinearProbe,
    category_set: CategorySet,
    positive_strength: float,
    negative_strength: float,
    category_source: str = DEFAULT_CATEGORY_SOURCE,
    val_acts: torch.Tensor | None = None,
    val_token_scores: torch.Tensor | None = None,
    val_records: Sequence[PromptRecord] | None = None,
    threshold_method: str = "fpr",
    batch_size: int = 16,
    metadata: Mapping[str, Any] | None = None,
    policy: str = "binary",
) -> tuple[ProbeRouter, ProbeTokenEnsemble | None, dict[str, Any]]:
    """The router of ``routing`` built on a fitted probe, with the run's strengths and category source.

    ``probe``: the probe alone routes. ``probe+token``: the probe's logit averaged with the model's
    refusal-token log-odds, standardised and thresholded on the validation rows (their activations and
    token scores, :func:`scripts.steering.token_router_scores`).

    Args:
        val_acts: ``[N_val, d_model]`` validation activations at the probe's layer.
        val_token_scores: ``[N_val]`` their refusal-token scores (``probe+token`` only).
        policy: A name of :data:`scripts.steering.ROUTING_POLICIES`, fitted by :func:`fit_routing_policy`
            on the validation rows' decision scores (the probe's logits, or the ensemble's scores) at the
            router's own threshold; ``"binary"`` (the paper's) needs no validation rows.

    Returns:
        ``(router, ensemble or None, metrics)``: the ensemble's validation metrics (``probe+token``),
        and for every routing ``policy``, the fitted policy's :meth:`~scripts.steering.RoutingPolicy.to_dict`.

    Raises:
        ValueError: an unknown routing, category source or policy (the message lists the valid ones),
            ``probe+token`` without the validation rows, or a policy other than binary without
            ``val_acts`` and ``val_records``.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; valid: {list(ROUTINGS)}")
    if category_source not in CATEGORY_SOURCES:
        raise ValueError(f"unknown category_source {category_source!r}; valid: {list(CATEGORY_SOURCES)}")
    if policy not in ROUTING_POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}; valid: {list(ROUTING_POLICIES)}")
    if policy != "binary" and (val_acts is None or val_records is None):
        raise ValueError(f"routing policy {policy!r} is fitted on the validation rows' activations and records")
    if routing == "probe":
        fitted = binary_policy() if policy == "binary" else fit_routing_policy(
            policy, probe.decision_function(val_acts), _binary(val_records), float(probe.threshold_logit))
        router = probe_router(probe, probe.layer, category_set, positive_strength=positive_strength,
                              negative_strength=negative_strength, category_source=category_source,
                              kind=probe.hook_kind, batch_size=batch_size, policy=fitted)  # fmt: skip
        return router, None, {"policy": fitted.to_dict()}
    if val_acts is None or val_token_scores is None or val_records is None:
        raise ValueError("routing 'probe+token' needs the validation rows' activations, token scores and records")
    labels = _binary(val_records)
    ensemble, metrics = train_probe_token_ensemble(probe, val_acts, val_token_scores, labels,
                                                   threshold_method=threshold_method, metadata=metadata)
    fitted = fit_routing_policy(policy, ensemble.decision_function(val_acts, val_token_scores), labels,
                                float(ensemble.threshold))
    router = probe_token_router(ensemble, category_set, positive_strength=positive_strength,
                                negative_strength=negative_strength, category_source=category_source,
                                batch_size=batch_size, policy=fitted)  # fmt: skip
    # A new dict: ``metrics`` is also the ensemble's saved metadata, which the policy is not part of.
    return router, ensemble, {**metrics, "policy": fitted.to_dict()}
