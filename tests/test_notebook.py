"""The notebook, executed headless in its fast configuration: a broken cell fails the build."""

import json

import pytest

from scripts.run_notebook import FAST_PARAMETERS, run_notebook

CONDITIONS = ("base", "categorical_steering", "probe_routed_steering", "low_rank_combination")


@pytest.mark.slow
def test_notebook_runs_end_to_end_in_fast_configuration(tmp_path):
    run_dir = run_notebook(dict(FAST_PARAMETERS), results_root=tmp_path)

    executed = json.loads((run_dir / "refusal_tokens.executed.ipynb").read_text())
    errors = [output for cell in executed["cells"] if cell["cell_type"] == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert errors == []

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["categories"] == [
        "discrimination_exclusion_toxicity", "human_chatbot_interaction_harms", "information_hazards",
        "malicious_uses", "misinformation_harms",
    ]
    assert isinstance(summary["layer"], int) and 0 <= summary["layer"] < 30
    assert 0.0 <= summary["probe"]["auc"] <= 1.0
    for condition in CONDITIONS:
        row = summary[condition]
        # 3 held-out harmful prompts per category, 3 HarmBench prompts and 10 over-refusal prompts; the
        # phrase judge never errs.
        assert (row["harmful"]["n"], row["benign"]["n"], row["harmful"]["n_errors"] + row["benign"]["n_errors"]) == (
            18, 10, 0)
        for label, metric in (("harmful", "refusal_rate_harmful"), ("benign", "over_refusal_rate_benign")):
            low, high = row[label]["ci"]  # the one interval shape of every rate
            assert row[metric] == row[label]["rate"] and 0.0 <= low <= row[metric] <= high <= 1.0
        assert set(row["harmful"]["per_category"]) == set(summary["categories"]) | {"harmbench"}
    # config.json records what the run did: the layer and strengths the sweep chose, every other setting as used.
    from scripts.paths import RunConfig

    config = RunConfig.load(run_dir / "config.json")
    assert (config.name, config.layer, config.hook_kind) == ("fast", summary["layer"], "resid_post")
    assert (config.positive_strength, config.negative_strength) == (
        summary["strengths"]["positive"], summary["strengths"]["negative"])
    assert config.positive_strength in (4.0, 16.0) and config.negative_strength == -6.0  # the fast sweep grid
    assert {key: config.parameters[key] for key in (
        "layer", "candidate_layers", "sweep_positive_strengths", "sweep_negative_strengths", "routing",
        "probe_threshold_method", "category_set_name", "system_prompt", "batch_size", "judge", "fast",
        "n_train_per_category", "n_eval_overrefusal")} == {
        "layer": "auto", "candidate_layers": [9, 15], "sweep_positive_strengths": [4.0, 16.0],
        "sweep_negative_strengths": [6.0], "routing": "probe+token", "probe_threshold_method": "fpr",
        "category_set_name": "donotanswer", "system_prompt": None, "batch_size": 64,
        "judge": summary["judge"],  # "auto" resolved to the judge that judged
        "fast": True, "n_train_per_category": 8, "n_eval_overrefusal": 10}
    png = (run_dir / "refusal_tradeoff.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    for condition in CONDITIONS:
        lines = (run_dir / "generations" / f"{condition}.jsonl").read_text().splitlines()
        assert len(lines) == 28  # 18 harmful + 10 over-refusal prompts, each written once

    generalization = summary["generalization"]
    assert list(generalization["sources"]) == ["rho_overrefusal", "harmbench"]
    over_refusal, harmbench = generalization["sources"]["rho_overrefusal"], generalization["sources"]["harmbench"]
    assert (over_refusal["label"], harmbench["label"]) == ("benign", "harmful")
    # Neither source is in the refusal-token model's fine-tune (both are evaluation-only).
    assert over_refusal["model_saw_source"] is False and harmbench["model_saw_source"] is False
    for entry in (over_refusal, harmbench):
        probes = {"probe_L9", "probe_L15", f"probe_L{summary['layer']}"}
        assert set(entry["probe_auc"]) == {"token", "multi_layer"} | probes | {f"{name}+token" for name in probes}
        assert all(0.0 <= auc["ci"][0] <= auc["auc"] <= auc["ci"][1] <= 1.0 for auc in entry["probe_auc"].values())
        assert set(entry["conditions"]) == {"base", "probe_routed_steering"}
    assert over_refusal["conditions"]["base"]["benign"]["n"] == 4
    assert harmbench["conditions"]["probe_routed_steering"]["harmful"]["n"] == 4
    assert generalization["best_router"] in generalization["router_mean_auc"]
    # The default router (probe + the model's token) routed both the main condition and each fold's steering.
    assert summary["routing"]["router"] == "probe+token"
    assert generalization["steering_router"] == f"probe_L{summary['layer']}+token"
    # The data curve: both routers at 0 and 8 added over-refusal prompts, on 4 held-out prompts per label.
    curve = generalization["data_curve"]
    assert curve["source"] == "rho_overrefusal" and set(curve["shots_needed"]) == {"probe", "probe+token"}
    assert [(p["routing"], p["shots"], p["val_shots"]) for p in curve["points"]] == [
        ("probe", 0, 0), ("probe+token", 0, 0), ("probe", 8, 2), ("probe+token", 8, 2)]
    assert all(p["rates"][label]["n"] == 4 for p in curve["points"] for label in ("benign", "harmful"))
    # Routing shares are over all 24 held-out over-refusal prompts of the fast pool.
    assert all((p["routed_label"], p["n_routed"]) == ("benign", 24) for p in curve["points"])
    assert all(0.0 <= p["routed_toward_refusal"] <= 1.0 for p in curve["points"])
    assert (run_dir / "figures" / "data_curve.png").read_bytes().startswith(b"\x89PNG")

    # config.json alone runs the same experiment again: the same summary (the machine block aside).
    rebuilt_dir = run_notebook({**config.notebook_parameters(), "run_name": "rebuilt"}, results_root=tmp_path)
    rebuilt = json.loads((rebuilt_dir / "summary.json").read_text())
    assert {k: v for k, v in rebuilt.items() if k != "machine"} == {k: v for k, v in summary.items() if k != "machine"}



def test_notebook_rejects_a_data_curve_source_that_is_not_held_out_before_any_work(tmp_path):
    import papermill

    parameters = {**FAST_PARAMETERS, "generalization_sources": ["harmbench"], "data_curve_source": "rho_bbq"}
    with pytest.raises(papermill.PapermillExecutionError, match="data_curve_source 'rho_bbq' is not held out"):
        run_notebook(parameters, results_root=tmp_path)
    executed = json.loads((tmp_path / "fast" / "refusal_tokens.executed.ipynb").read_text())
    ran = [cell for cell in executed["cells"] if cell["cell_type"] == "code" and cell.get("execution_count")]
    assert len(ran) == 3  # the parameters, the injected parameters and the set-up cell: nothing was loaded
