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
    summary = json.loads(summary_path.read_text())
    print(json.dumps(summary, indent=2))
    print(f"\nsummary: {summary_path}\nexecuted notebook: {run_dir / 'refusal_tokens.executed.ipynb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
