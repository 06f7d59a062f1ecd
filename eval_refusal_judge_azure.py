"""Judge the responses of one or more results files for refusal, and report refusal rates.

Usage::

    python eval_refusal_judge_azure.py RESULTS.jsonl [MORE.jsonl ...] --judge azure [--judge phrase ...] \\
        --out DIR [--model NAME] [--endpoint URL] [--concurrency N] [--threshold 0.5]

Writes ``DIR/verdicts.jsonl`` (one row per input row and judge: the input fields, ``is_refusal``
true/false/null, ``refusal_score``, ``judge``, ``error``), ``DIR/report.json`` (refusal rates with
95% Wilson intervals per judge, condition, label and category; Cohen's kappa between judges) and
prints a table. ``azure`` verdicts are cached in ``DIR/judge_cache.jsonl`` (or ``--cache``), so a
rerun judges only what is missing. The ``azure`` judge reads ``AZURE_INFERENCE_ENDPOINT`` and
``AZURE_INFERENCE_CREDENTIAL`` from the environment or a ``.env`` file; ``--endpoint`` points it at
another compatible server (e.g. a local vLLM), which gets no key. ``--judge trained`` is the trained
offline judge (its verdicts are cached too); ``--judge auto`` picks ``azure`` when an endpoint is
configured, else ``trained``, else ``phrase`` (see :func:`scripts.judge.resolve_judge_name`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from scripts.judge import (
    AUTO_JUDGE,
    DEFAULT_AZURE_MODEL,
    DEFAULT_THRESHOLD,
    JUDGE_NAMES,
    VerdictCache,
    build_judge,
    load_result_rows,
    resolve_judge_name,
    run_judge,
)
from scripts.records import JSONLError, write_jsonl
from scripts.refusal_tokens import CATEGORY_SETS, get_category_set
from scripts.report import format_table, summarise_verdicts

logger = logging.getLogger("eval_refusal_judge_azure")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSONL files (rows with prompt and response)")
    parser.add_argument(
        "--judge",
        action="append",
        choices=(AUTO_JUDGE, *JUDGE_NAMES),
        required=True,
        help="judge to run; repeat to run several (kappa is reported between them)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--model", default=DEFAULT_AZURE_MODEL, help="LLM judge model (deployment) name")
    parser.add_argument(
        "--endpoint", default=None, help="chat-completions endpoint overriding AZURE_INFERENCE_ENDPOINT"
    )
    parser.add_argument(
        "--env-file", type=Path, default=None, help=".env file to read (default: found from the working directory)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="parallel requests of the azure judge")
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="refusal_score at or above which a verdict is a refusal",
    )
    parser.add_argument("--max-retries", type=int, default=5, help="retries after transient endpoint failures")
    parser.add_argument("--max-reasks", type=int, default=2, help="re-asks after a reply with no valid verdict")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    parser.add_argument(
        "--category-set", choices=sorted(CATEGORY_SETS), default="donotanswer", help="refusal tokens of the token judge"
    )
    parser.add_argument("--cache", type=Path, default=None, help="verdict cache (default: OUT/judge_cache.jsonl)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the judges, write verdicts and report, print the table; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rows = load_result_rows(args.results)
    except (JSONLError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2
    logger.info("loaded %d rows from %d file(s)", len(rows), len(args.results))
    args.out.mkdir(parents=True, exist_ok=True)
    cache = VerdictCache(args.cache or args.out / "judge_cache.jsonl")
    verdict_rows = []
    for name in dict.fromkeys(resolve_judge_name(name) for name in args.judge):
        try:
            judge = build_judge(
                name,
                model=args.model,
                endpoint=args.endpoint,
                env_file=args.env_file,
                category_set=get_category_set(args.category_set),
                **(
                    {"max_retries": args.max_retries, "max_reasks": args.max_reasks, "timeout": args.timeout}
                    if name == "azure"
                    else {}
                ),
            )
        except (ValueError, RuntimeError, FileNotFoundError) as error:
            # ValueError covers a trained head that does not fit the installed encoder, RuntimeError its missing package
            logger.error("%s", error)
            return 2
        concurrency = args.concurrency if name == "azure" else 1
        verdict_rows += run_judge(
            rows, judge, cache=cache, concurrency=concurrency, threshold=args.threshold, progress=not args.quiet
        )
    write_jsonl(args.out / "verdicts.jsonl", verdict_rows)
    report = summarise_verdicts(verdict_rows)
    report["threshold"] = args.threshold
    report["inputs"] = [str(path) for path in args.results]
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s and %s", args.out / "verdicts.jsonl", args.out / "report.json")
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
