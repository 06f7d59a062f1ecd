"""summary.json as one record: its keys in order, one top-level entry per condition, the strengths relative
to the residual norm."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

from scripts.refusal_tokens import DONOTANSWER_CATEGORIES
from scripts.run_stages import LayerChoice, RoutingFit
from scripts.run_summary import build_run_summary
from scripts.steering import abstain_policy, binary_policy

RATES = {"base": {"refusal_rate_harmful": 0.5, "over_refusal_rate_benign": 0.25,
                  "harmful": {"rate": 0.5, "ci": [0.2, 0.8]}},
         "probe_routed_steering": {"refusal_rate_harmful": 1.0, "over_refusal_rate_benign": 0.0}}  # fmt: skip


PAIRED = {
    "probe_routed_steering": {"benign": {"difference": -0.25, "ci": [-0.4, -0.1]},
                              "harmful": {"difference": -0.03, "ci": [-0.1, 0.02]}},
    "abstain": {"benign": {"difference": 0.0, "ci": [-0.05, 0.02]}},
}


def summary():
    hooked = SimpleNamespace(device="cpu", hook_name=lambda layer, kind: f"blocks.{layer}.hook_{kind}")
    choice = LayerChoice(9, 16.0, -6.0, {9: 0.9, 15: 0.8}, [{"layer": 9}], [9], [], [])
    probe = SimpleNamespace(threshold=0.4)
    router = SimpleNamespace(policy=binary_policy())
    abstain = SimpleNamespace(policy=abstain_policy(-1.0, 2.0))
    routing_fit = RoutingFit(probe, {"auc_val": 0.95}, router, None, {"auc": 0.97}, None, np.array([1, 0]), {},
                             {"abstain": abstain})
    return build_run_summary(
        model_name="m", base_model_name=None, model_build={"cpu": "x"}, hooked=hooked, hook_kind="resid_post",
        category_set=DONOTANSWER_CATEGORIES, choice=choice, mean_resid_norm=8.0, judge_name="phrase",
        routing="probe", routing_fit=routing_fit, vector_analysis={"cosine": 1, "figures": {"a": "a.png"}},
        low_rank_history=[{"epoch": 1}], model_diffing=None, report={"agreement": {"kappa": 0.5}},
        generalization=None, rates=RATES, paired_vs_base=PAIRED)  # fmt: skip


def test_keys_in_order_then_one_entry_per_condition() -> None:
    data = json.loads(summary().to_json())
    assert list(data) == [
        "model", "base_model", "model_build", "layer", "hook", "categories", "strengths", "judge", "machine", "probe",
        "routing", "layer_sweep", "vector_analysis", "low_rank_history", "model_diffing", "judge_agreement",
        "generalization", "paired_vs_base", "do_no_harm", "conditions", "base", "probe_routed_steering"]  # fmt: skip
    assert data["conditions"] == ["base", "probe_routed_steering"] and data["base"]["harmful"]["ci"] == [0.2, 0.8]
    assert data["strengths"] == {"positive": 16.0, "negative": -6.0,
                                 "relative_to_mean_resid_norm": {"positive": 2.0, "negative": -0.75}}  # fmt: skip
    assert data["probe"] == {"auc": 0.97, "validation_auc": 0.95, "threshold": 0.4, "auc_by_layer": {"9": 0.9, "15": 0.8}}
    assert data["vector_analysis"] == {"cosine": 1} and data["judge_agreement"] == {"kappa": 0.5}
    assert data["hook"] == "blocks.9.hook_resid_post" and data["routing"] == {
        "router": "probe", "probe_token": None, "policy": binary_policy().to_dict(),
        "compared_policies": {"abstain": abstain_policy(-1.0, 2.0).to_dict()}}
    assert data["paired_vs_base"] == PAIRED
    # Over-refusal down, its interval's upper end below +0.02; harmful refusal down 3 points: harm.
    assert data["do_no_harm"] == {"probe_routed_steering": False, "abstain": True}
    assert set(data["machine"]) >= {"cpu", "device", "torch", "torch_threads"}


def test_describe_lists_each_conditions_two_rates() -> None:
    assert json.loads(summary().describe()) == {
        "base": {"refusal_rate_harmful": 0.5, "over_refusal_rate_benign": 0.25},
        "probe_routed_steering": {"refusal_rate_harmful": 1.0, "over_refusal_rate_benign": 0.0}}
