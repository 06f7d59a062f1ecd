"""Execute ``refusal_tokens.ipynb`` headless with papermill and print the run's summary.

``python -m scripts.run_notebook`` is the README's main job (after provisioning); ``--fast`` runs the
same notebook with tiny sample sizes, as CI does, so a broken cell fails the build.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping

from scripts.report import format_rate

logger = logging.getLogger(__name__)

NOTEBOOK = Path(__file__).resolve().parent.parent / "refusal_tokens.ipynb"

FAST_PARAMETERS: dict[str, Any] = {
    "run_name": "fast",
    "fast": True,
}
"""Overrides of the notebook's ``parameters`` cell for the fast configuration (the notebook scales sizes down)."""


def run_notebook(
    parameters: Mapping[str, Any] | None = None,
    results_root: str | Path = "results",
    notebook: str | Path = NOTEBOOK,
) -> Path:
    """Execute the notebook with ``parameters`` and return the run directory it wrote.

    The executed copy is saved as ``<run_dir>/refusal_tokens.executed.ipynb``; a failing cell raises
    ``papermill.PapermillExecutionError`` after the partial notebook is saved.
    """
    import papermill

    parameters = dict(parameters or {})
    parameters["results_root"] = str(results_root)
    run_name = parameters.get("run_name") or "default"
    parameters["run_name"] = run_name
    run_dir = Path(results_root) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    output = run_dir / "refusal_tokens.executed.ipynb"
    logger.info("executing %s into %s", notebook, output)
    papermill.execute_notebook(
        str(notebook),
        str(output),
        parameters=parameters,
        cwd=str(Path(notebook).resolve().parent),
        kernel_name="python3",
        progress_bar=False,
        log_output=False,
    )
    return run_dir


CONDITION_ORDER: tuple[str, ...] = (
    "base", "categorical_steering", "probe_routed_steering", "low_rank_combination", "logit_bias",
)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The run's headline figures from ``summary.json`` as a plain-text table.

    Conditions (refusal rate on harmful prompts, over-refusal rate on the benign look-alikes, counts),
    then, when the run has a ``generalization`` block, its table
    (:func:`scripts.generalization.format_generalization_table`) and its data curve
    (:func:`scripts.generalization.format_data_curve_table`), if any.
    """
    probe = summary.get("probe", {})
    lines = [
        f"model {summary.get('model')}, layer {summary.get('layer')}, judge {summary.get('judge')}, "
        f"probe AUC (held-out harmful vs over-refusal set) {probe.get('auc', float('nan')):.3f}",
        "",
        f"{'condition':24s} {'refusal (harmful)':>18s} {'over-refusal (benign)':>22s} {'n harmful':>10s} {'n benign':>9s}",
    ]
    names = [name for name in CONDITION_ORDER if name in summary]
    names += [name for name in summary.get("conditions", []) if name not in names]
    for name in names:
        row = summary[name]
        lines.append(f"{name:24s} {format_rate(row.get('refusal_rate_harmful')):>18s} "
                     f"{format_rate(row.get('over_refusal_rate_benign')):>22s} {row.get('n_harmful', 0):10d} "
                     f"{row.get('n_benign', 0):9d}")  # fmt: skip
    generalization = summary.get("generalization")
    if generalization:
        from scripts.generalization import format_data_curve_table, format_generalization_table

        lines += ["", "leave-one-source-out (rates on each held-out source's own prompts: base -> probe-routed)",
                  format_generalization_table(generalization)]
        if generalization.get("data_curve"):
            lines += ["", "look-alike data curve (prompts of the held-out source added to its fold; rates [95% CI])",
                      format_data_curve_table(generalization["data_curve"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m scripts.run_notebook [--fast] [--results-root DIR] [-p NAME VALUE ...]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fast", action="store_true", help="tiny sample sizes (CI configuration)")
    parser.add_argument("--results-root", default="results")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override a notebook parameter (VALUE parsed as JSON when possible)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parameters: dict[str, Any] = dict(FAST_PARAMETERS) if args.fast else {}
    for name, value in args.parameter:
        try:
            parameters[name] = json.loads(value)
        except json.JSONDecodeError:
            parameters[name] = value
    run_dir = run_notebook(parameters, results_root=args.results_root)
    summary_path = run_dir / "summary.json"
    print(format_summary(json.loads(summary_path.read_text())))
    print(f"\nsummary: {summary_path}\nexecuted notebook: {run_dir / 'refusal_tokens.executed.ipynb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
