"""The run's ``summary.json``: one record (:class:`RunSummary`) built from the stages' records
(:func:`build_run_summary`).

Its keys are what ``scripts/results_doc.py``, ``scripts/run_notebook.py``, ``refusal_tradeoff_plot.py`` and
the tests read: the run's settings and choices, the probe, the routing, the sweep, the vector analysis,
the low-rank history, model diffing, judge agreement, the ``generalization`` block, and one top-level
entry per condition (its rates, each interval as ``ci: [low, high]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch

from scripts.hooked_model import HookedModel
from scripts.precision import cpu_description
from scripts.refusal_tokens import CategorySet
from scripts.report import do_no_harm
from scripts.run_stages import LayerChoice, RoutingFit


@dataclass(frozen=True)
class RunSummary:
    """Everything a later comparison needs; :meth:`to_json` writes ``summary.json``.

    ``rates`` (condition → its row of :func:`scripts.report.condition_rates`) is written as one top-level
    key per condition, after the other fields, in their order.
    """

    model: str
    base_model: str | None
    model_build: dict[str, Any]
    layer: int
    hook: str
    categories: list[str]
    strengths: dict[str, Any]
    judge: str
    machine: dict[str, Any]
    probe: dict[str, Any]
    routing: dict[str, Any]
    layer_sweep: list[dict[str, Any]]
    vector_analysis: dict[str, Any]
    low_rank_history: list[dict[str, Any]]
    model_diffing: dict[str, Any] | None
    judge_agreement: Any
    generalization: dict[str, Any] | None
    paired_vs_base: dict[str, Any]
    do_no_harm: dict[str, bool | None]
    conditions: list[str]
    rates: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``summary.json`` (fields in order, then one key per condition)."""
        summary = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rates"}
        summary.update(self.rates)
        return summary

    def to_json(self) -> str:
        """Indented JSON (values JSON cannot hold are written as their ``str``), with a final newline."""
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    def describe(self) -> str:
        """Each condition's refusal rate on harmful prompts and over-refusal rate on benign ones, as JSON."""
        return json.dumps({name: {k: row.get(k) for k in ("refusal_rate_harmful", "over_refusal_rate_benign")}
                           for name, row in self.rates.items()}, indent=1)  # fmt: skip


def build_run_summary(
    *,
    model_name: str,
    base_model_name: str | None,
    model_build: Mapping[str, Any],
    hooked: HookedModel,
    hook_kind: str,
    category_set: CategorySet,
    choice: LayerChoice,
    mean_resid_norm: float,
    judge_name: str,
    routing: str,
    routing_fit: RoutingFit,
    vector_analysis: Mapping[str, Any],
    low_rank_history: Sequence[Mapping[str, Any]],
    model_diffing: Mapping[str, Any] | None,
    report: Mapping[str, Any],
    generalization: Mapping[str, Any] | None,
    rates: Mapping[str, Mapping[str, Any]],
    paired_vs_base: Mapping[str, Any] | None = None,
) -> RunSummary:
    """The summary of a run from its stages' records.

    Args:
        choice: The layer and strengths the run steered with (and the sweep behind them).
        mean_resid_norm: The mean residual norm of the vectors' rows (the strengths are also given relative to it).
        vector_analysis: :func:`scripts.eval_steering_vectors.analyse_category_vectors` (its figures are left out).
        report: The judge report (its ``agreement`` is kept).
        rates: Condition → rates (:func:`scripts.report.condition_rates`).
        paired_vs_base: Condition → label → paired difference from the unsteered model on the same prompts
            (:func:`scripts.report.paired_against_reference`).
    """
    positive, negative = choice.positive_strength, choice.negative_strength
    return RunSummary(
        model=model_name, base_model=base_model_name, model_build=dict(model_build), layer=choice.layer,
        hook=hooked.hook_name(choice.layer, hook_kind), categories=category_set.categories,
        strengths={"positive": positive, "negative": negative,
                   "relative_to_mean_resid_norm": {"positive": positive / mean_resid_norm,
                                                   "negative": negative / mean_resid_norm}},
        judge=judge_name,
        machine={**cpu_description(), "device": str(hooked.device), "torch": torch.__version__,
                 "torch_threads": torch.get_num_threads()},
        probe={"auc": routing_fit.probe_test["auc"], "validation_auc": routing_fit.probe_metrics.get("auc_val"),
               "threshold": routing_fit.probe.threshold, "auc_by_layer": choice.auc_by_layer},
        routing={"router": routing, "probe_token": routing_fit.ensemble_test,
                 "policy": routing_fit.router.policy.to_dict(),
                 "compared_policies": {name: router.policy.to_dict() for name, router in routing_fit.policy_routers.items()}},
        layer_sweep=choice.sweep,
        vector_analysis={k: v for k, v in vector_analysis.items() if k != "figures"},
        low_rank_history=list(low_rank_history), model_diffing=model_diffing,
        judge_agreement=report.get("agreement"), generalization=generalization,
        paired_vs_base=dict(paired_vs_base or {}),
        do_no_harm={name: do_no_harm(paired) for name, paired in (paired_vs_base or {}).items()},
        conditions=list(rates), rates=dict(rates),
    )  # fmt: skip
