"""Benchmark: training the trained refusal judge's head, and judging 1,000 responses with it.

* training: the shipped recipe (``scripts.trained_judge.train_main``: features of every training
  response, cross-validated strength, Platt calibration) into a temporary directory; on XSTest's five
  files + own cases when the cache has them, else on the own cases alone (the output says which).
  Target: 10 minutes or less on 2 CPU cores.
* judging: :func:`scripts.judge.run_judge` with the shipped head on ``--n`` responses (no cache, so
  every one is encoded), each the concatenation of 1 to 4 own labelled completions (seeded), so that
  lengths vary from one sentence to several paragraphs. Target: 1,000 responses in 60 s or less.

The last line is ``ratio: X`` (60 s / the judging time for 1,000 responses; 1 or more meets the target).

Run: ``HF_HUB_OFFLINE=1 python bench/trained_judge.py [--n 1000] [--skip-train]``.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from scripts.judge import TrainedJudge, run_judge
from scripts.precision import cpu_description
from scripts.refusal_phrases import load_own_cases
from scripts.trained_judge import HEAD_DIR, load_xstest_files, train_main

JUDGE_BUDGET_S = 60.0
TRAIN_BUDGET_S = 600.0


def bench_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` result rows whose responses join 1 to 4 own labelled completions (deterministic for ``seed``)."""
    cases = load_own_cases()
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        parts = rng.sample(cases, rng.randint(1, 4))
        rows.append(
            {"id": f"bench-{index}", "prompt": parts[0].prompt, "response": "\n\n".join(p.completion for p in parts)}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="responses to judge")
    parser.add_argument("--skip-train", action="store_true", help="time judging only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cpu = cpu_description()
    print(f"CPU: {cpu['cpu']} ({cpu['machine']}); torch {torch.__version__}, capability {cpu['cpu_capability']}, "
          f"{torch.get_num_threads()} threads")
    if not args.skip_train:
        try:
            load_xstest_files()
            use_xstest = True
        except FileNotFoundError:
            use_xstest = False
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            manifest = train_main(Path(tmp), use_xstest=use_xstest)
            train_s = time.perf_counter() - started
        rows = sum(entry["rows"] for entry in manifest["training_sets"])
        sets = "XSTest five files + own cases" if use_xstest else "own cases only (no XSTest files in the cache)"
        print(f"training: {train_s:.1f} s on {rows} rows ({sets}); budget {TRAIN_BUDGET_S:.0f} s")
    rows = bench_rows(args.n)
    judge = TrainedJudge(HEAD_DIR)
    judge.judge_batch(rows[:2])  # loads the encoder: a one-off cost, not a per-response one
    started, cpu_started = time.perf_counter(), time.process_time()
    verdicts = run_judge(rows, judge, cache=None, progress=False)
    judge_s = time.perf_counter() - started
    # On a shared machine wall time overstates the cost; CPU time over the threads used bounds it.
    judge_cpu_s = time.process_time() - cpu_started
    n_refusals = sum(1 for row in verdicts if row["is_refusal"])
    words = sum(len(row["response"].split()) for row in rows) / len(rows)
    print(
        f"judging: {judge_s:.1f} s for {len(rows)} responses ({words:.0f} words each on average; "
        f"{n_refusals} judged refusals); budget {JUDGE_BUDGET_S:.0f} s per 1000"
    )
    print(
        f"judging CPU time: {judge_cpu_s:.1f} s over {torch.get_num_threads()} threads "
        f"(wall time on idle cores is at least {judge_cpu_s / torch.get_num_threads():.1f} s)"
    )
    per_thousand = judge_s * 1000 / len(rows)
    print(f"ratio: {JUDGE_BUDGET_S / per_thousand:.2f}")


if __name__ == "__main__":
    main()
