"""The main run's stages after the data and the activations: the layer and strengths
(:func:`choose_layer_and_strengths`), the routing probe and router with their held-out scores
(:func:`fit_routing_stage`), and the low-rank operator (:func:`train_low_rank_stage`).

Each stage takes the run's data (:class:`scripts.run_data.RunData`), activations and settings and returns one
record; saving artifacts and drawing figures is left to the caller.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from scripts.activation_caching import cache_activations
from scripts.data_splits import subsample_per_category
from scripts.hooked_model import HookedModel
from scripts.layer_selection import best_strengths, sweep_layers
from scripts.linear_probe import LinearProbe, ProbeTokenEnsemble
from scripts.low_rank_combination import fit_whitening, steering_basis
from scripts.low_rank_combination_steering import LowRankCombinationSteering
from scripts.model import format_chat
from scripts.pipeline import fit_router, fit_routing_probe
from scripts.records import PromptRecord
from scripts.refusal_tokens import CategorySet
from scripts.run_data import RunData
from scripts.steering import ProbeRouter, unsteered_token_scores
from scripts.steering_vectors import SteeringVectors
from scripts.train_linear_probe import evaluate_probe, probe_auc_by_layer
from scripts.train_low_rank_combination_steering import TrainingConfig, train_low_rank_combination


@dataclass(frozen=True)
class LayerChoice:
    """The steering layer and strengths, and the evidence they were chosen on.

    Attributes:
        layer: The chosen layer.
        positive_strength: Strength toward refusal.
        negative_strength: Strength away from refusal.
        auc_by_layer: Candidate layer → validation ROC-AUC of a probe at that layer.
        sweep: Rows of :func:`scripts.layer_selection.sweep_layers` (empty when the layer was fixed).
        sweep_layers: The layers the sweep visited (the best by probe AUC, ascending).
        sweep_harmful: Validation harmful prompts the sweep scored.
        sweep_benign: Validation benign prompts the sweep scored.
    """

    layer: int
    positive_strength: float
    negative_strength: float
    auc_by_layer: dict[int, float]
    sweep: list[dict[str, Any]]
    sweep_layers: list[int]
    sweep_harmful: list[PromptRecord]
    sweep_benign: list[PromptRecord]

    def describe(self) -> str:
        """The AUCs, the sweep's prompts and the choice, one line each."""
        sources = dict(Counter(r.source for r in self.sweep_harmful))
        return "\n".join([
            f"probe validation AUC by layer: { {k: round(v, 3) for k, v in self.auc_by_layer.items()} }",
            f"sweep: {len(self.sweep_harmful)} harmful {sources}, {len(self.sweep_benign)} benign",
            f"layer {self.layer}; strengths +{self.positive_strength:g} / {self.negative_strength:g}",
        ])  # fmt: skip


def choose_layer_and_strengths(
    hooked: HookedModel,
    tokenizer: Any,
    train_acts: Any,
    run_data: RunData,
    vectors_by_layer: Mapping[int, SteeringVectors],
    category_set: CategorySet,
    *,
    layer: int | str,
    positive_strength: float,
    negative_strength: float,
    n_sweep_layers: int,
    n_sweep_per_label: int,
    sweep_positive_strengths: Sequence[float],
    sweep_negative_strengths: Sequence[float],
    hook_kind: str = "resid_post",
    system_prompt: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> LayerChoice:
    """Probe validation AUC at each cached layer, then (``layer == "auto"``) the strength sweep on the best layers.

    The sweep scores validation prompts only: harmful ones subsampled per source (the fine-tune's own and
    another source), the first benign ones. With a fixed ``layer`` the given strengths are kept.

    Args:
        train_acts: :class:`scripts.activation_caching.CachedActivations` of ``run_data.train_records``
            (``[N_train, d_model]`` per layer).
        vectors_by_layer: Layer → the category vectors fitted on the fit rows at that layer.
    """
    auc_by_layer = probe_auc_by_layer(train_acts, run_data.train_labels, (run_data.fit_rows, run_data.validation_rows),
                                      progress=True)  # fmt: skip
    validation = run_data.validation_records
    sweep_harmful = subsample_per_category([r for r in validation if r.label == "harmful"], n_sweep_per_label,
                                           seed=seed, by=("source",))  # fmt: skip
    sweep_benign = [r for r in validation if r.label == "benign"][:n_sweep_per_label]
    if layer != "auto":
        return LayerChoice(int(layer), positive_strength, negative_strength, auc_by_layer, [], [], sweep_harmful,
                           sweep_benign)  # fmt: skip
    visited = sorted(sorted(auc_by_layer, key=auc_by_layer.get, reverse=True)[:n_sweep_layers])
    sweep = sweep_layers(
        hooked,
        format_chat(tokenizer, [r.prompt for r in sweep_harmful], system_prompt),
        format_chat(tokenizer, [r.prompt for r in sweep_benign], system_prompt),
        category_set, layers=visited, positive_strengths=sweep_positive_strengths,
        negative_strengths=sweep_negative_strengths, vectors=vectors_by_layer,
        harmful_categories=[r.category if r.category in category_set.tokens else None for r in sweep_harmful],
        kind=hook_kind, batch_size=batch_size, progress=True,
    )  # fmt: skip
    best = best_strengths(sweep)
    return LayerChoice(int(best["layer"]), float(best["positive_strength"]), float(best["negative_strength"]),
                       auc_by_layer, sweep, visited, sweep_harmful, sweep_benign)  # fmt: skip


@dataclass(frozen=True)
class RoutingFit:
    """The routing probe, the run's router, and how both score the evaluation rows.

    Attributes:
        probe: The harmful-vs-benign probe (with its category head), thresholded on validation rows.
        probe_metrics: The probe's validation metrics.
        router: The router of the run's routing (steers each prompt toward or away from refusal).
        ensemble: The probe+token ensemble (``None`` when the probe routes alone).
        probe_test: The probe's metrics on the evaluation rows (``auc``, rates at its threshold, ...).
        ensemble_test: The ensemble's ``auc``, ``tpr``, ``fpr``, ``validation_auc``, ``threshold`` on the
            evaluation rows (``None`` without an ensemble).
        eval_labels: ``[N_eval]`` 1 harmful, 0 benign.
        eval_scores: Router name (``probe``, ``probe+token``) → ``[N_eval]`` scores on the evaluation rows.
        policy_routers: Policy name → the same routing under that policy, fitted on the same validation
            rows, for side-by-side comparison with ``router``.
    """

    probe: LinearProbe
    probe_metrics: dict[str, Any]
    router: ProbeRouter
    ensemble: ProbeTokenEnsemble | None
    probe_test: dict[str, float]
    ensemble_test: dict[str, float] | None
    eval_labels: np.ndarray
    eval_scores: dict[str, np.ndarray] = field(default_factory=dict)
    policy_routers: dict[str, ProbeRouter] = field(default_factory=dict)

    def describe(self) -> str:
        """The validation and held-out metrics, one line each."""
        lines = [
            f"validation: { {k: round(float(v), 3) for k, v in self.probe_metrics.items() if isinstance(v, (int, float))} }",
            f"held-out harmful vs over-refusal set: { {k: round(float(v), 3) for k, v in self.probe_test.items()} }",
        ]  # fmt: skip
        if self.ensemble_test is not None:
            lines.append(f"probe+token, held-out: { {k: round(float(v), 3) for k, v in self.ensemble_test.items()} }")
        return "\n".join(lines)

    @property
    def eval_aucs(self) -> dict[str, float]:
        """Router name → its ROC-AUC on the evaluation rows."""
        aucs = {"probe": self.probe_test["auc"]}
        if self.ensemble_test is not None:
            aucs["probe+token"] = self.ensemble_test["auc"]
        return aucs


def fit_routing_stage(
    hooked: HookedModel,
    tokenizer: Any,
    acts: torch.Tensor,
    train_texts: Sequence[str],
    run_data: RunData,
    category_set: CategorySet,
    *,
    layer: int,
    routing: str,
    positive_strength: float,
    negative_strength: float,
    category_source: str,
    threshold_method: str = "fpr",
    hook_kind: str = "resid_post",
    system_prompt: str | None = None,
    batch_size: int = 16,
    model_name: str = "",
    policy: str = "binary",
    compare_policies: Sequence[str] = (),
) -> RoutingFit:
    """Fit the probe on the fit rows and the router on the validation rows, then score the evaluation rows.

    Args:
        acts: ``[N_train, d_model]`` activations at ``layer`` of ``run_data.train_records``.
        train_texts: The chat-formatted ``run_data.train_records`` (their validation rows' token scores feed
            the ``probe+token`` router).
        policy: The router's policy (:data:`scripts.steering.ROUTING_POLICIES`), fitted on the validation rows.
        compare_policies: Further policies for the same probe and routing, each fitted on the same rows.
    """
    fit_rows, val_rows = run_data.fit_rows, run_data.validation_rows
    probe, probe_metrics = fit_routing_probe(acts[fit_rows], run_data.fit_records, acts[val_rows],
                                             run_data.validation_records, category_set, layer, hook_kind,
                                             threshold_method, progress=True)  # fmt: skip
    val_token_scores = None
    if routing == "probe+token":
        val_token_scores = unsteered_token_scores(hooked, [train_texts[i] for i in val_rows], category_set,
                                                  batch_size=batch_size, progress=True)  # fmt: skip
    router_settings = dict(
        routing=routing, probe=probe, category_set=category_set, positive_strength=positive_strength,
        negative_strength=negative_strength, category_source=category_source, val_acts=acts[val_rows],
        val_token_scores=val_token_scores, val_records=run_data.validation_records,
        threshold_method=threshold_method, batch_size=batch_size, metadata={"model": model_name},
    )  # fmt: skip
    router, ensemble, ensemble_metrics = fit_router(policy=policy, **router_settings)
    policy_routers = {name: fit_router(policy=name, **router_settings)[0]
                      for name in compare_policies if name != policy}
    eval_texts = format_chat(tokenizer, [r.prompt for r in run_data.eval_records], system_prompt)
    eval_acts = cache_activations(hooked, eval_texts, [layer], hook_kind=hook_kind, batch_size=batch_size,
                                  cache=True, progress=True).layer(layer)  # fmt: skip
    y_eval = torch.tensor([1 if r.label == "harmful" else 0 for r in run_data.eval_records])
    probe_test = evaluate_probe(probe, eval_acts, y_eval)
    ensemble_test = None
    eval_scores = {"probe": probe.predict_proba(eval_acts).detach().numpy()}
    if ensemble is not None:
        eval_token_scores = unsteered_token_scores(hooked, eval_texts, category_set, batch_size=batch_size,
                                                   progress=True)  # fmt: skip
        routed = ensemble.predict(eval_acts, eval_token_scores).bool()
        ensemble_test = {"auc": ensemble.roc_auc(eval_acts, eval_token_scores, y_eval),
                         "tpr": float(routed[y_eval == 1].double().mean()),
                         "fpr": float(routed[y_eval == 0].double().mean()),
                         "validation_auc": ensemble_metrics["auc_val"], "threshold": ensemble_metrics["threshold"]}
        eval_scores["probe+token"] = ensemble.decision_function(eval_acts, eval_token_scores).numpy()
    return RoutingFit(probe, probe_metrics, router, ensemble, probe_test, ensemble_test, y_eval.numpy(), eval_scores,
                      policy_routers)  # fmt: skip


@dataclass(frozen=True)
class LowRankFit:
    """The trained low-rank operator, its per-epoch history and the training configuration."""

    operator: LowRankCombinationSteering
    history: list[dict[str, Any]]
    config: TrainingConfig


def train_low_rank_stage(
    hooked: HookedModel,
    acts: torch.Tensor,
    vectors: SteeringVectors,
    train_texts: Sequence[str],
    run_data: RunData,
    category_set: CategorySet,
    *,
    layer: int,
    hook_kind: str = "resid_post",
    epochs: int = 2,
    kl_weight: float = 1.0,
    n_per_label: int = 64,
    seed: int = 0,
    model_name: str = "",
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> LowRankFit:
    """Whiten and orthonormalise the category vectors into a basis, then train the operator on the fit rows.

    The first ``n_per_label`` harmful and benign fit rows train it (refusal-token loss on harmful,
    ``kl_weight`` × KL to the unsteered model on benign); checkpoints go to ``checkpoint_dir`` and a rerun
    resumes from them.

    Args:
        acts: ``[N_train, d_model]`` activations at ``layer`` of ``run_data.train_records`` (whitening statistics).
        train_texts: The chat-formatted ``run_data.train_records``.
    """
    whitening = fit_whitening(acts)
    basis = steering_basis(vectors.vectors, whitening)
    operator = LowRankCombinationSteering.from_basis(basis, metadata={"model": model_name, "layer": layer})
    fit = [(train_texts[i], run_data.fit_records[i].label) for i in run_data.fit_rows]
    harmful_texts = [text for text, label in fit if label == "harmful"][:n_per_label]
    benign_texts = [text for text, label in fit if label == "benign"][:n_per_label]
    config = TrainingConfig(layer=layer, kind=hook_kind, epochs=epochs, kl_weight=kl_weight, seed=seed)
    result = train_low_rank_combination(hooked, operator, harmful_texts, benign_texts, category_set, config,
                                        checkpoint_dir=checkpoint_dir, progress=True)  # fmt: skip
    return LowRankFit(result.operator, result.history, config)
