"""Execute ``refusal_tokens.ipynb`` headless with papermill and print the run's summary.

``python -m scripts.run_notebook`` is the README's main job (after provisioning); ``--fast`` runs the
same notebook with tiny sample sizes, as CI does, so a broken cell fails the build. While it runs, the
notebook's section headings are logged as each section starts, and what its cells print (their log
lines and tqdm progress bars included) goes to this process's stdout and stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping

from scripts.paths import NOTEBOOK_PATH, RunConfig, results_dir
from scripts.report import format_rate

logger = logging.getLogger(__name__)

FAST_PARAMETERS: dict[str, Any] = {
    "run_name": "fast",
    "fast": True,
}
"""Overrides of the notebook's ``parameters`` cell for the fast configuration (the notebook scales sizes down)."""

DEFAULT_RUN_NAME = "default"
"""The run directory of a run that names none (the README's ``results/default/``)."""


def markdown_headings(source: str) -> list[str]:
    """The headings of a markdown cell's source, without their ``#`` marks, in order."""
    headings = (line.lstrip("#").strip() for line in source.splitlines() if line.startswith("#"))
    return [heading for heading in headings if heading]


def log_section(cell: Mapping[str, Any], cell_index: int) -> None:
    """nbclient's ``on_cell_start`` hook: log the headings of each markdown cell as execution reaches it."""
    if cell.get("cell_type") == "markdown":
        for heading in markdown_headings("".join(cell.get("source", ""))):
            logger.info("notebook section: %s", heading)


def run_notebook(
    parameters: Mapping[str, Any] | None = None,
    results_root: str | Path | None = None,
    notebook: str | Path = NOTEBOOK_PATH,
    stream_output: bool = True,
) -> Path:
    """Execute the notebook with ``parameters`` and return the run directory it wrote.

    Args:
        parameters: Overrides of the notebook's ``parameters`` cell; an empty ``run_name`` becomes
            :data:`DEFAULT_RUN_NAME`.
        results_root: Directory of run directories; default the repository's ``results/``. A relative
            path is taken from the working directory (the kernel itself runs in the repository).
        notebook: The notebook to execute.
        stream_output: Write what the cells print (stdout, and stderr with the progress bars) to this
            process's stdout and stderr as it comes; the section headings are logged either way.

    The executed copy is saved as ``<run_dir>/refusal_tokens.executed.ipynb`` (each cell's streams merged,
    progress bars at their final state); a failing cell raises ``papermill.PapermillExecutionError``
    after the partial notebook is saved.
    """
    import papermill

    root = Path(results_root).resolve() if results_root is not None else None
    parameters = dict(parameters or {})
    # The notebook reads "" as the repository's results/ (and config.json records it so, not a machine's path).
    parameters["results_root"] = str(root) if root is not None else ""
    run_name = parameters.get("run_name") or DEFAULT_RUN_NAME
    parameters["run_name"] = run_name
    run_dir = (root if root is not None else results_dir()) / run_name
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
        stdout_file=sys.stdout if stream_output else None,
        stderr_file=sys.stderr if stream_output else None,
        on_cell_start=log_section,
        coalesce_streams=True,
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
                     f"{format_rate(row.get('over_refusal_rate_benign')):>22s} "
                     f"{row.get('harmful', {}).get('n', 0):10d} {row.get('benign', {}).get('n', 0):9d}")  # fmt: skip
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
    """Command line: ``python -m scripts.run_notebook [--fast] [--config CONFIG_JSON] [--results-root DIR] [-p NAME VALUE ...]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fast", action="store_true", help="tiny sample sizes (CI configuration)")
    parser.add_argument("--results-root", default=None,
                        help="directory of run directories (default: the repository's results/)")
    parser.add_argument("--config", default=None, metavar="CONFIG_JSON",
                        help="run again with the parameters a run's config.json records (-p still overrides)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override a notebook parameter (VALUE parsed as JSON when possible)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parameters: dict[str, Any] = RunConfig.load(args.config).notebook_parameters() if args.config else {}
    parameters.update(FAST_PARAMETERS if args.fast else {})
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
