"""The results pages: cells carry rate, Wilson interval and k/n of the run file; small cells are marked; the
README block is replaced between its markers and nowhere else."""

from __future__ import annotations

import json

import pytest

from scripts.report import condition_rates, summarise_verdicts, wilson_interval
from scripts.results_doc import (
    README_BEGIN,
    README_END,
    SMALL_MARK,
    condition_table,
    format_cell,
    format_paired,
    publish,
    readme_block,
    replace_block,
    timing_description,
)


def _rates(k: int, n: int) -> tuple[float, list[float]]:
    return k / n, list(wilson_interval(k, n))


def _condition(harmful: tuple[int, int], benign: tuple[int, int]) -> dict:
    """A condition of ``summary.json`` as :func:`scripts.report.condition_rates` writes it, from real verdict rows."""
    rows = [{"judge": "phrase", "condition": "c", "label": label, "is_refusal": i < k}
            for label, (k, n) in (("harmful", harmful), ("benign", benign)) for i in range(n)]
    return condition_rates(summarise_verdicts(rows), "phrase")["c"]


def _summary() -> dict:
    return {
        "model": "tiny", "layer": 3, "hook": "blocks.3.hook_resid_post", "judge": "phrase",
        "strengths": {"positive": 8.0, "negative": -6.0}, "conditions": ["base", "probe_routed_steering"],
        "base": _condition((84, 100), (15, 75)), "probe_routed_steering": _condition((84, 100), (6, 40)),
    }


def test_a_cell_shows_the_rate_its_wilson_interval_and_the_counts():
    rate, interval = _rates(15, 75)
    low, high = wilson_interval(15, 75)
    assert format_cell(rate, interval, 75) == f"0.200 [{low:.3f}, {high:.3f}] (15/75)"
    assert format_cell(None, None, 0) == "–"


@pytest.mark.parametrize(("n", "marked"), [(59, True), (60, False), (200, False)])
def test_cells_under_sixty_prompts_are_marked(n, marked):
    assert format_cell(0.5, [0.4, 0.6], n).endswith(SMALL_MARK) == marked


def test_the_condition_table_has_one_row_per_condition_in_order_with_the_run_counts():
    table = condition_table(_summary())
    rows = table.splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == ["base", "probe_routed_steering"]
    assert "(84/100)" in rows[0] and "(15/75)" in rows[0] and "(6/40) " + SMALL_MARK in rows[1]


def test_replace_block_changes_only_what_lies_between_the_markers():
    text = f"intro\n{README_BEGIN}\nold table\n{README_END}\noutro\n"
    replaced = replace_block(text, "new table")
    assert replaced == f"intro\n{README_BEGIN}\nnew table\n{README_END}\noutro\n"
    assert replace_block(replaced, "new table") == replaced
    with pytest.raises(ValueError, match="markers"):
        replace_block("no markers here", "x")


def test_publish_writes_the_block_the_page_and_copies_the_figures(tmp_path):
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(_summary()))
    (run / "refusal_tradeoff.png").write_bytes(b"png bytes")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n{README_BEGIN}\n{README_END}\nrest\n")
    written = publish(run / "summary.json", readme, tmp_path / "docs")
    assert (tmp_path / "docs" / "refusal_tradeoff.png").read_bytes() == b"png bytes"
    page = (tmp_path / "docs" / "results.md").read_text()
    assert condition_table(_summary()) in page and "refusal_tradeoff.png" in page
    text = readme.read_text()
    assert text.startswith("# Title\n") and text.endswith("rest\n") and "(84/100)" in text
    assert set(written) >= {readme, tmp_path / "docs" / "results.md"}


def test_the_timing_sentence_reads_the_build_metrics_and_papermills_record(tmp_path):
    model_dir, run_dir = tmp_path / "model", tmp_path / "run"
    model_dir.mkdir()
    run_dir.mkdir()
    (model_dir / "metrics.json").write_text(json.dumps({
        "timings": {"benign_answers_s": 120.0, "training_s": 600.0, "evaluation_s": 90.0, "total_s": 810.0},
        "precision": {"requested": "auto", "resolved": "float32"}, "cpu": "Some CPU", "cpu_capability": "AVX2",
        "torch_threads": 2,
    }))
    (run_dir / "refusal_tokens.executed.ipynb").write_text(json.dumps(
        {"cells": [], "metadata": {"papermill": {"duration": 1530.0}}}))
    summary = {**_summary(), "model": str(model_dir),
               "machine": {"cpu": "Some CPU", "cpu_capability": "AVX2", "torch_threads": 1}}
    text = timing_description(summary, run_dir)
    assert "the refusal-token build 13.5 min (benign answers 2.0, training 10.0, evaluation 1.5; float32" in text
    assert "2 threads on Some CPU, capability AVX2" in text
    assert "the notebook 25.5 min (1 threads on Some CPU" in text
    assert timing_description({**_summary(), "model": str(tmp_path / "absent")}, tmp_path) == ""


def test_paired_columns_show_each_conditions_difference_from_the_unsteered_model():
    from scripts.report import paired_difference

    benign = paired_difference([True] * 10 + [False] * 30, [False] * 10 + [False] * 30)
    summary = {**_summary(), "paired_vs_base": {"probe_routed_steering": {"benign": benign}}}
    rows = condition_table(summary).splitlines()
    assert len(rows[0].split("|")) == 8  # condition, two rates, two paired differences, do no harm
    low, high = benign["ci"]
    assert f"-0.250 [{low:+.3f}, {high:+.3f}], p {benign['p_value']:.2g}" in rows[3]
    assert high < 0.02 and rows[3].rstrip(" |").endswith("yes")  # over-refusal down, no harmful rows to drop
    assert rows[2].count("–") == 3  # the unsteered row has no difference from itself


def test_policy_table_rows_give_the_seed_range_and_the_widest_paired_interval():
    from scripts.results_doc import policy_table_markdown

    spread = lambda mean, low, high: {"mean": mean, "min": low, "max": high}  # noqa: E731
    cell = {
        "rate": {"benign": spread(0.25, 0.2, 0.3), "harmful": spread(0.9, 0.9, 0.9)},
        "paired_difference": {"benign": spread(-0.05, -0.1, 0.0), "harmful": spread(0.0, 0.0, 0.0)},
        "paired_lower": {"benign": spread(-0.12, -0.2, -0.05), "harmful": spread(-0.03, -0.03, -0.03)},
        "paired_upper": {"benign": spread(0.01, -0.01, 0.015), "harmful": spread(0.03, 0.03, 0.03)},
        "do_no_harm_every_seed": True,
    }
    table = {
        "protocol": {"seeds": [0, 1, 2], "max_over_refusal_rise": 0.02},
        "sources": {"look": {"label": "benign", "unsteered": {"benign": {"rate": 0.3, "n": 60},
                                                             "harmful": {"rate": 0.9, "n": 60}},
                             "policies": {"abstain": cell}}},
        "do_no_harm": {"abstain": True},
    }  # fmt: skip
    rows = policy_table_markdown(table).splitlines()
    assert rows[2] == "| look | abstain | benign | 60 | 0.300 | 0.250 (0.200–0.300) | -0.050 [-0.200, +0.015] | True |"
    assert rows[3].endswith("| 0.900 (0.900–0.900) | +0.000 [-0.030, +0.030] |  |")  # the contrast label has no verdict
    assert rows[-1].startswith("Does no harm on every held-out source and seed: `abstain` True.")
    # The table's resolution: 60 prompts with no verdict changed still leave the upper end above +0.02.
    from scripts.report import paired_difference

    upper = paired_difference([False] * 60, [False] * 60)["ci"][1]
    assert f"60 benign prompts give a paired interval up to {upper:+.3f}" in rows[-1] and upper > 0.02


def test_held_out_tables_name_the_routing_policy_their_steering_used():
    from scripts.results_doc import data_curve_table, generalization_table

    base, steered = _condition((0, 0), (12, 60))["benign"], _condition((0, 0), (9, 60))["benign"]
    generalization = {
        "best_probe_router": "probe_L3", "steering_router": "probe_L3+token", "router_mean_auc": {"probe_L3": 0.9},
        "protocol": {"policy": "graded"},
        "sources": {"look": {"label": "benign", "routing": {"probe_L3+token": {"benign_routed_benign": 0.75}},
                             "probe_auc": {"probe_L3": {"auc": 0.81, "ci": [0.7, 0.9]}},
                             "conditions": {"base": {"benign": base}, "probe_routed_steering": {"benign": steered}}}},
    }  # fmt: skip
    steered_cell = format_cell(steered["rate"], steered["ci"], steered["n"])
    rows = generalization_table(generalization).splitlines()
    assert rows[0].rstrip(" |").endswith("probe-routed rate (graded policy)")
    assert "| 0.25 |" in rows[2] and steered_cell in rows[2]
    curve = {"source": "look", "base": {"benign": base},
             "points": [{"routing": "probe", "policy": "graded", "shots": 0, "rates": {"benign": steered},
                         "routed_toward_refusal": 0.25}]}  # fmt: skip
    text = data_curve_table(curve)
    assert text.startswith("Held-out source `look`; routing policy graded.")
    assert f"| probe | 0 | {steered_cell} | 0.25 |" in text


def test_the_tradeoff_names_the_policy_that_does_no_harm_in_both_places_and_lowers_over_refusal_most():
    from scripts.report import paired_difference
    from scripts.results_doc import tradeoff_statement

    def pair(benign_down: int, harmful_down: int) -> dict:
        # unsteered refuses all 60 of each label; steering turns the first few into answers
        return {"benign": paired_difference([True] * 60, [False] * benign_down + [True] * (60 - benign_down)),
                "harmful": paired_difference([True] * 60, [False] * harmful_down + [True] * (60 - harmful_down))}

    summary = {
        **_summary(), "conditions": ["base", "probe_routed_steering", "probe_routed_binary", "probe_routed_abstain"],
        "probe_routed_binary": {}, "probe_routed_abstain": {}, "routing": {"policy": {"name": "graded"}},
        # binary lowers over-refusal most but drops harmful refusal by 10 points; abstain beats graded in distribution
        "paired_vs_base": {"probe_routed_steering": pair(3, 0), "probe_routed_binary": pair(12, 6),
                           "probe_routed_abstain": pair(6, 0)},
        "generalization": {"policy_table": {"do_no_harm": {"graded": True, "binary": False, "abstain": True}}},
    }  # fmt: skip
    text = tradeoff_statement(summary)
    assert text.index("`graded` (`probe_routed_steering`)") < text.index("`binary`") < text.index("`abstain`")
    assert f"over-refusal {format_paired(summary['paired_vs_base']['probe_routed_abstain']['benign'])}" in text
    assert "does no harm in the main table: no, on every held-out source and seed: no" in text  # binary
    assert "`abstain` lowers over-refusal most in distribution. In the main table, even with no verdict changed, " \
           "60 benign prompts give a paired interval up to +0.060" in text
    summary["generalization"]["policy_table"]["do_no_harm"]["abstain"] = False
    assert "`graded` lowers over-refusal most in distribution." in tradeoff_statement(summary)
    del summary["generalization"]
    text = tradeoff_statement(summary)
    assert "held-out source and seed: not measured" in text
    assert "No policy does no harm both in the main table and on every held-out source and seed." in text
    assert tradeoff_statement({k: v for k, v in summary.items() if k != "paired_vs_base"}) == ""
    assert "Routing policies against the unsteered model" in readme_block(summary)
