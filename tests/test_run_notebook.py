"""The main command: its printed summary and what it shows while a notebook runs (the real notebook is
tested in test_notebook.py)."""

import json

from scripts.run_notebook import format_summary


def _condition(harmful: float, benign: float) -> dict:
    return {"refusal_rate_harmful": harmful, "over_refusal_rate_benign": benign,
            "harmful": {"rate": harmful, "n": 60}, "benign": {"rate": benign, "n": 80}}


def test_format_summary_lists_conditions_in_order_with_their_rates_and_the_held_out_sources() -> None:
    summary = {
        "model": "m", "layer": 15, "judge": "phrase", "probe": {"auc": 0.9512},
        "conditions": ["probe_routed_steering", "base", "extra"],
        "probe_routed_steering": _condition(0.95, 0.125), "base": _condition(0.9, 0.25), "extra": _condition(0.5, 0.5),
        "generalization": {
            "best_probe_router": "probe_L18", "best_router": "probe_L18+token", "steering_router": "probe_L18+token",
            "router_mean_auc": {"token": 0.8, "probe_L18": 0.855, "probe_L18+token": 0.87},
            "sources": {
                "rho_overrefusal": {"label": "benign", "model_saw_source": False,
                                    "probe_auc": {"probe_L18": {"auc": 0.91, "ci": [0.85, 0.95]},
                                                  "token": {"auc": 0.75, "ci": [0.6, 0.8]},
                                                  "probe_L18+token": {"auc": 0.93, "ci": [0.9, 0.96]}},
                                    "routing": {"probe_L18": {"benign_routed_benign": 0.75},
                                                "probe_L18+token": {"benign_routed_benign": 0.875}},
                                    "conditions": {"base": {"benign": {"rate": 0.2}},
                                                   "probe_routed_steering": {"benign": {"rate": 0.1}}}},
                "harmbench": {"label": "harmful", "model_saw_source": False,
                              "probe_auc": {"probe_L18": {"auc": 0.8, "ci": [0.7, 0.88]},
                                            "probe_L18+token": {"auc": 0.82, "ci": [0.72, 0.9]}},
                              "routing": {"probe_L18": {"harmful_routed_harmful": 0.6},
                                          "probe_L18+token": {"harmful_routed_harmful": 0.65}},
                              "conditions": {"base": {"harmful": {"rate": 0.45}}}},
            },
        },
    }
    lines = format_summary(summary).splitlines()
    assert "layer 15" in lines[0] and "0.951" in lines[0]
    rows = [line.split() for line in lines if line.split()[:1] in (["base"], ["probe_routed_steering"], ["extra"])]
    assert rows == [["base", "0.900", "0.250", "60", "80"], ["probe_routed_steering", "0.950", "0.125", "60", "80"],
                    ["extra", "0.500", "0.500", "60", "80"]]
    sources = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["rho_overrefusal"], ["harmbench"])}
    # Best probe router's AUC and interval, token AUC, the steering router's AUC, the share it sent toward
    # refusal, base and steered rates on the source's own prompts.
    assert sources["rho_overrefusal"] == ["rho_overrefusal", "benign", "False", "0.910", "[0.85,", "0.95]", "0.750",
                                          "0.930", "0.125", "0.200", "0.100"]
    assert sources["harmbench"] == ["harmbench", "harmful", "False", "0.800", "[0.70,", "0.88]", "-", "0.820",
                                    "0.650", "0.450", "-"]
    assert lines[-1] == ("mean held-out AUC: token 0.800, probe_L18 0.855, probe_L18+token 0.870; "
                         "best router: probe_L18+token; steering router: probe_L18+token")


def test_format_summary_without_generalization_block_prints_conditions_only() -> None:
    text = format_summary({"model": "m", "layer": 3, "judge": "token", "probe": {"auc": 0.5}, "conditions": ["base"],
                           "base": _condition(0.1, 0.2)})
    assert "leave-one-source-out" not in text and text.splitlines()[-1].split() == ["base", "0.100", "0.200", "60", "80"]


def test_format_summary_prints_the_data_curve_after_the_held_out_table() -> None:
    from scripts.generalization import data_curve_summary

    def rates(benign: float, harmful: float) -> dict:
        return {label: {"rate": value, "ci": [value / 2, (1 + value) / 2], "n": 16, "k": 0, "n_errors": 0}
                for label, value in (("benign", benign), ("harmful", harmful))}

    curve = data_curve_summary("rho_overrefusal", {"base": rates(0.25, 1.0), "probe_shots64": rates(0.0625, 1.0)},
                               {"probe_shots64": {"routing": "probe", "shots": 64, "val_shots": 13,
                                                  "routed_toward_refusal": 0.05}})
    summary = {"model": "m", "layer": 3, "judge": "phrase", "probe": {"auc": 0.5}, "conditions": ["base"],
               "base": _condition(0.1, 0.2),
               "generalization": {"best_probe_router": "probe_L3", "best_router": "probe_L3", "router_mean_auc": {},
                                  "sources": {}, "data_curve": curve}}
    lines = format_summary(summary).splitlines()
    start = lines.index("look-alike data curve (prompts of the held-out source added to its fold; rates [95% CI])")
    assert lines[start + 1] == "held-out source rho_overrefusal; unsteered: over_refusal_rate 0.250, refusal_rate 1.000"
    assert lines[start + 2].split()[-3:] == ["met", "to", "refusal"]
    assert lines[start + 3].split() == ["probe", "64", "0.062", "[0.031,", "0.531]", "1.000", "[0.500,", "1.000]", "met",
                                        "0.050"]
    assert lines[-1] == "fewest shots meeting the steering targets: probe: 64"


def test_markdown_headings_are_the_heading_lines_without_their_marks() -> None:
    from scripts.run_notebook import markdown_headings

    assert markdown_headings("## 5. Layer and strength\nTwo criteria, # not a heading\n### Sub\n#\n") == [
        "5. Layer and strength", "Sub"]
    assert markdown_headings("plain text") == []


def _cell(cell_type: str, source: str, **extra) -> dict:
    cell = {"cell_type": cell_type, "id": f"c{len(source)}", "metadata": extra.pop("metadata", {}), "source": source,
            **extra}
    if cell_type == "code":
        cell.update(outputs=[], execution_count=None)
    return cell


def test_run_notebook_logs_sections_and_streams_cell_output_and_progress_bars(tmp_path, monkeypatch, caplog, capsys):
    import logging

    from scripts.run_notebook import run_notebook

    notebook = tmp_path / "notebooks" / "n.ipynb"
    notebook.parent.mkdir()
    cells = [
        _cell("code", 'results_root = "results"\nrun_name = ""', metadata={"tags": ["parameters"]}),
        _cell("markdown", "## 1. First section\ntext"),
        _cell("code", "from pathlib import Path\nfrom tqdm.auto import tqdm\n"
                      "print('hello from the kernel')\n"
                      "for _ in tqdm(range(3), desc='loop'):\n    pass\n"
                      "marker = Path(results_root or '.', run_name, 'marker')\n"
                      "marker.parent.mkdir(parents=True, exist_ok=True)\n"
                      "marker.write_text(repr(results_root))"),
        _cell("markdown", "## 2. Second section"),
        _cell("code", "print('done')"),
    ]
    notebook.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="scripts.run_notebook"):
        run_dir = run_notebook({"run_name": "r"}, results_root="out", notebook=notebook)
    # A relative results root is the caller's, not the kernel's working directory (the notebook's folder).
    assert run_dir == tmp_path / "out" / "r" and (run_dir / "marker").read_text() == repr(str(run_dir.parent))
    sections = [r.getMessage() for r in caplog.records if r.getMessage().startswith("notebook section")]
    assert sections == ["notebook section: 1. First section", "notebook section: 2. Second section"]
    captured = capsys.readouterr()
    assert captured.out.splitlines()[:2] == ["hello from the kernel", "done"]
    assert "loop: 100%" in captured.err and "3/3" in captured.err  # tqdm's bar, streamed as it was drawn
    executed = json.loads((run_dir / "refusal_tokens.executed.ipynb").read_text())
    streams = [output for output in executed["cells"][3]["outputs"] if output["output_type"] == "stream"]
    assert {output["name"] for output in streams} == {"stdout", "stderr"} and len(streams) == 2  # merged per stream

    # No results root: the repository's results/, passed to the notebook as "" (so config.json says so).
    monkeypatch.setattr("scripts.run_notebook.results_dir", lambda: tmp_path / "repo_results")
    run_dir = run_notebook({"run_name": "q"}, notebook=notebook, stream_output=False)
    assert run_dir == tmp_path / "repo_results" / "q" and (run_dir / "refusal_tokens.executed.ipynb").is_file()
    assert (notebook.parent / "q" / "marker").read_text() == "''"  # the kernel runs in the notebook's folder
    assert capsys.readouterr().out == ""
