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
* :func:`fit_router`: the router of a routing (``probe`` or ``probe+token``) from a fitted probe.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from scripts.data_splits import dedupe_records, normalize_text
from scripts.linear_probe import LinearProbe, ProbeTokenEnsemble
from scripts.records import PromptRecord
from scripts.refusal_tokens import CategorySet
from scripts.steering import CATEGORY_SOURCES, ROUTINGS, ProbeRouter, probe_router, probe_token_router
from scripts.steering_vectors import SteeringVectors, build_steering_vectors, get_strategy
from scripts.train_linear_probe import stratified_split, train_probe, train_probe_token_ensemble

logger = logging.getLogger(__name__)

DEFAULT_VECTOR_METHOD = "mean_difference"
DEFAULT_CATEGORY_SOURCE = "probe_head"
"""Each routed prompt's category: the argmax of the probe's category head (``"token"``: the model's own token)."""


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
) -> tuple[ProbeRouter, ProbeTokenEnsemble | None, dict[str, Any]]:
    """The router of ``routing`` built on a fitted probe, with the run's strengths and category source.

    ``probe``: the probe alone routes. ``probe+token``: the probe's logit averaged with the model's
    refusal-token log-odds, standardised and thresholded on the validation rows (their activations and
    token scores, :func:`scripts.steering.token_router_scores`).

    Returns:
        ``(router, ensemble or None, ensemble validation metrics or {})``.

    Raises:
        ValueError: an unknown routing or category source (the message lists the valid ones), or
            ``probe+token`` without the validation rows.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; valid: {list(ROUTINGS)}")
    if category_source not in CATEGORY_SOURCES:
        raise ValueError(f"unknown category_source {category_source!r}; valid: {list(CATEGORY_SOURCES)}")
    if routing == "probe":
        router = probe_router(probe, probe.layer, category_set, positive_strength=positive_strength,
                              negative_strength=negative_strength, category_source=category_source,
                              kind=probe.hook_kind, batch_size=batch_size)  # fmt: skip
        return router, None, {}
    if val_acts is None or val_token_scores is None or val_records is None:
        raise ValueError("routing 'probe+token' needs the validation rows' activations, token scores and records")
    ensemble, metrics = train_probe_token_ensemble(probe, val_acts, val_token_scores, _binary(val_records),
                                                   threshold_method=threshold_method, metadata=metadata)
    router = probe_token_router(ensemble, category_set, positive_strength=positive_strength,
                                negative_strength=negative_strength, category_source=category_source,
                                batch_size=batch_size)  # fmt: skip
    return router, ensemble, metrics
