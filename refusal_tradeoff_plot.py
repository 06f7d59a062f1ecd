"""Refusal on harmful prompts against over-refusal on benign prompts, from the judge's result files.

Two views:

* :func:`plot_tradeoff`: one point per condition, x = over-refusal rate on benign prompts,
  y = refusal rate on harmful prompts, 95% Wilson intervals as error bars, the desired region (low
  over-refusal, high refusal) shaded.
* :func:`plot_strength_sweep`: the one-dimensional knob: for every condition whose rows carry a
  ``strength``, the two rates against strength, and the path the condition traces in the trade-off
  plane as its strength grows.

Both read what ``eval_refusal_judge_azure.py`` writes (``report.json`` or ``verdicts.jsonl``), write a
PNG and a PDF, and a ``.points.json`` next to them listing exactly what was plotted.

Usage::

    python refusal_tradeoff_plot.py OUT/report.json --out figures/tradeoff.png [--judge azure]
    python refusal_tradeoff_plot.py OUT/verdicts.jsonl --out figures/tradeoff.png --sweep-out figures/sweep.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402

from scripts.records import read_jsonl  # noqa: E402
from scripts.report import summarise_verdicts  # noqa: E402

logger = logging.getLogger("refusal_tradeoff_plot")

JUDGE_PREFERENCE: tuple[str, ...] = ("azure", "trained", "phrase", "token")
DEFAULT_GOOD_REGION = (0.2, 0.8)
"""(highest over-refusal, lowest refusal) of the shaded desired region."""


@dataclass(frozen=True)
class TradeoffPoint:
    """One condition in the trade-off plane (rates in ``[0, 1]``, intervals as ``(low, high)``)."""

    condition: str
    over_refusal_rate: float
    over_refusal_ci: tuple[float, float]
    refusal_rate: float
    refusal_ci: tuple[float, float]
    n_benign: int
    n_harmful: int
    strength: float | None = None


def _as_report(report_or_rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    if isinstance(report_or_rows, Mapping):
        if "judges" not in report_or_rows:
            raise ValueError("a report must have a 'judges' entry (the output of summarise_verdicts)")
        return report_or_rows
    return summarise_verdicts(report_or_rows)


def choose_judge(report: Mapping[str, Any], judge: str | None = None) -> str:
    """The judge whose verdicts to plot: ``judge`` if given, else the only one, else the preferred one."""
    available = list(report["judges"])
    if not available:
        raise ValueError("the report holds no judge")
    if judge is not None:
        if judge not in available:
            raise ValueError(f"judge {judge!r} not in the results; available: {available}")
        return judge
    if len(available) == 1:
        return available[0]
    chosen = next((name for name in JUDGE_PREFERENCE if name in available), sorted(available)[0])
    logger.info("several judges in the results (%s); plotting %s (choose with judge=...)", available, chosen)
    return chosen


def _points_from_groups(groups: Sequence[Mapping[str, Any]], with_strength: bool) -> list[TradeoffPoint]:
    by_key: dict[tuple[str, float | None], dict[str, Mapping[str, Any]]] = {}
    for group in groups:
        key = (group["condition"], group.get("strength") if with_strength else None)
        by_key.setdefault(key, {})[group["label"]] = group
    points = []
    for (condition, strength), labels in by_key.items():
        harmful, benign = labels.get("harmful"), labels.get("benign")
        if harmful is None or benign is None or harmful["rate"] is None or benign["rate"] is None:
            logger.warning(
                "condition %s%s lacks judged harmful or benign rows; not plotted",
                condition,
                "" if strength is None else f" at strength {strength}",
            )
            continue
        points.append(
            TradeoffPoint(
                condition=condition,
                over_refusal_rate=benign["rate"],
                over_refusal_ci=tuple(benign["ci"]),
                refusal_rate=harmful["rate"],
                refusal_ci=tuple(harmful["ci"]),
                n_benign=benign["n"],
                n_harmful=harmful["n"],
                strength=strength,
            )
        )
    return points


def tradeoff_points(
    report_or_rows: Mapping[str, Any] | Sequence[Mapping[str, Any]], judge: str | None = None
) -> list[TradeoffPoint]:
    """One :class:`TradeoffPoint` per condition that has judged harmful and benign rows."""
    report = _as_report(report_or_rows)
    return _points_from_groups(report["judges"][choose_judge(report, judge)]["groups"], with_strength=False)


def sweep_points(
    report_or_rows: Mapping[str, Any] | Sequence[Mapping[str, Any]], judge: str | None = None
) -> dict[str, list[TradeoffPoint]]:
    """Condition → its points across strengths (ascending), from rows that carry ``strength``.

    Raises:
        ValueError: no judged row carries a ``strength``.
    """
    report = _as_report(report_or_rows)
    points = _points_from_groups(report["judges"][choose_judge(report, judge)]["strength_groups"], with_strength=True)
    if not points:
        raise ValueError("no judged rows with a 'strength' field and both harmful and benign labels")
    curves: dict[str, list[TradeoffPoint]] = {}
    for point in sorted(points, key=lambda p: (p.condition, p.strength)):
        curves.setdefault(point.condition, []).append(point)
    return curves


def _errors(rate: float, ci: tuple[float, float]) -> list[list[float]]:
    return [[rate - ci[0]], [ci[1] - rate]]


def _shade_good_region(ax: Axes, good_region: tuple[float, float], label: str | None = None) -> None:
    max_over_refusal, min_refusal = good_region
    ax.fill_between([0.0, max_over_refusal], min_refusal, 1.0, color="tab:green", alpha=0.12, lw=0, label=label)


def point_labels(
    points: Sequence[TradeoffPoint], gap: float = 0.045, margin: float = 0.03
) -> list[tuple[str, tuple[float, float]] | None]:
    """Label text and position (data coordinates) per point, in a column right of every point's interval.

    Points at the same rates share one label (``"base = categorical_steering"``: the later ones get
    ``None``). Labels sit at ``margin`` right of the rightmost interval end, at their point's height, moved
    down where needed so that consecutive labels are at least ``gap`` apart (a leader line joins each
    label to its point).
    """
    labels: list[tuple[str, tuple[float, float]] | None] = [None] * len(points)
    texts: dict[int, str] = {}
    for index, point in enumerate(points):
        twin = next((other for other in texts if (points[other].over_refusal_rate, points[other].refusal_rate)
                     == (point.over_refusal_rate, point.refusal_rate)), None)  # fmt: skip
        if twin is None:
            texts[index] = point.condition
        else:
            texts[twin] = f"{texts[twin]} = {point.condition}"
    if not texts:
        return labels
    x_text = max(points[index].over_refusal_ci[1] for index in texts) + margin
    y_text = float("inf")
    for index in sorted(texts, key=lambda position: -points[position].refusal_rate):
        y_text = min(points[index].refusal_rate, y_text - gap)
        labels[index] = (texts[index], (x_text, y_text))
    return labels


def draw_tradeoff(
    ax: Axes, points: Sequence[TradeoffPoint], good_region: tuple[float, float] = DEFAULT_GOOD_REGION
) -> list[ErrorbarContainer]:
    """Draw the trade-off plane on ``ax``: shaded desired region and one labelled point per condition.

    Returns:
        The error-bar containers, one per point.
    """
    _shade_good_region(ax, good_region, label="desired: low over-refusal, high refusal")
    colours = plt.get_cmap("tab10")
    containers = []
    labels = point_labels(points)
    for index, (point, label) in enumerate(zip(points, labels)):
        container = ax.errorbar(
            point.over_refusal_rate,
            point.refusal_rate,
            xerr=_errors(point.over_refusal_rate, point.over_refusal_ci),
            yerr=_errors(point.refusal_rate, point.refusal_ci),
            fmt="o",
            color=colours(index % 10),
            capsize=3,
            markersize=7,
            label=point.condition,
        )
        if label is not None:
            text, position = label
            ax.annotate(
                text, (point.over_refusal_rate, point.refusal_rate), xytext=position, fontsize=8, va="center",
                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6},
            )  # fmt: skip
        containers.append(container)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("over-refusal rate on benign prompts")
    ax.set_ylabel("refusal rate on harmful prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return containers


def _save(fig: plt.Figure, out_path: str | os.PathLike[str], metadata: Mapping[str, Any]) -> Path:
    png = Path(out_path).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(png.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    png.with_suffix(".points.json").write_text(json.dumps(metadata, indent=2) + "\n")
    logger.info("wrote %s, %s and %s", png, png.with_suffix(".pdf"), png.with_suffix(".points.json"))
    return png


def plot_tradeoff(
    report_or_rows: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    out_path: str | os.PathLike[str],
    judge: str | None = None,
    good_region: tuple[float, float] = DEFAULT_GOOD_REGION,
    title: str | None = None,
) -> Path:
    """Plot refusal (harmful) against over-refusal (benign), one point per condition.

    Args:
        report_or_rows: A ``report.json`` dict or verdict rows (``verdicts.jsonl``).
        out_path: Where the PNG goes; the PDF and ``.points.json`` go next to it.
        judge: Which judge's verdicts to plot (default: the only or the preferred one).
        good_region: ``(highest over-refusal, lowest refusal)`` of the shaded desired region.
        title: Figure title (default names the judge).

    Returns:
        The PNG path.

    Raises:
        ValueError: no condition has judged harmful and benign rows, or ``judge`` is absent.
    """
    report = _as_report(report_or_rows)
    judge = choose_judge(report, judge)
    points = tradeoff_points(report, judge)
    if not points:
        raise ValueError("no condition has judged harmful and benign rows to plot")
    fig, ax = plt.subplots(figsize=(6, 5))
    draw_tradeoff(ax, points, good_region)
    ax.set_title(title or f"Refusal trade-off ({judge} judge, 95% Wilson intervals)")
    return _save(
        fig, out_path, {"judge": judge, "good_region": list(good_region), "points": [asdict(p) for p in points]}
    )


def plot_strength_sweep(
    report_or_rows: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    out_path: str | os.PathLike[str],
    judge: str | None = None,
    good_region: tuple[float, float] = DEFAULT_GOOD_REGION,
) -> Path:
    """Plot each condition's rates across steering strengths (rows carry a ``strength`` field).

    Left panel: refusal (harmful, solid) and over-refusal (benign, dashed) against strength, with
    95% Wilson bands. Right panel: the path of each condition through the trade-off plane as its
    strength grows, points labelled by strength.

    Returns:
        The PNG path (the PDF and ``.points.json`` go next to it).

    Raises:
        ValueError: no judged rows carry a ``strength``.
    """
    report = _as_report(report_or_rows)
    judge = choose_judge(report, judge)
    curves = sweep_points(report, judge)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    colours = plt.get_cmap("tab10")
    for index, (condition, points) in enumerate(curves.items()):
        colour = colours(index % 10)
        strengths = [p.strength for p in points]
        left.plot(
            strengths, [p.refusal_rate for p in points], "-o", color=colour, label=f"{condition}: refusal (harmful)"
        )
        left.fill_between(
            strengths, [p.refusal_ci[0] for p in points], [p.refusal_ci[1] for p in points], color=colour, alpha=0.15
        )
        left.plot(
            strengths,
            [p.over_refusal_rate for p in points],
            "--s",
            color=colour,
            label=f"{condition}: over-refusal (benign)",
        )
        left.fill_between(
            strengths,
            [p.over_refusal_ci[0] for p in points],
            [p.over_refusal_ci[1] for p in points],
            color=colour,
            alpha=0.08,
        )
        right.plot(
            [p.over_refusal_rate for p in points], [p.refusal_rate for p in points], "-o", color=colour, label=condition
        )
        for point in points:
            right.annotate(
                f"{point.strength:g}",
                (point.over_refusal_rate, point.refusal_rate),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=colour,
            )
    left.set_xlabel("steering strength")
    left.set_ylabel("rate")
    left.set_ylim(-0.02, 1.02)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    left.set_title("Rates across strength (95% Wilson bands)")
    _shade_good_region(right, good_region)
    right.set_xlim(-0.02, 1.02)
    right.set_ylim(-0.02, 1.02)
    right.set_xlabel("over-refusal rate on benign prompts")
    right.set_ylabel("refusal rate on harmful prompts")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="lower right")
    right.set_title(f"Trade-off path as strength grows ({judge} judge)")
    metadata = {"judge": judge, "curves": {c: [asdict(p) for p in pts] for c, pts in curves.items()}}
    return _save(fig, out_path, metadata)


def load_plot_input(paths: Sequence[str | os.PathLike[str]]) -> Mapping[str, Any] | list[dict[str, Any]]:
    """One ``report.json`` (a dict) or the concatenated rows of one or more ``verdicts.jsonl`` files.

    Raises:
        ValueError: several reports, or reports mixed with verdict files.
    """
    reports = [Path(p) for p in paths if Path(p).suffix == ".json"]
    verdict_files = [Path(p) for p in paths if Path(p).suffix != ".json"]
    if reports and (len(reports) > 1 or verdict_files):
        raise ValueError("give one report.json, or one or more verdicts.jsonl files (rows merge; reports do not)")
    if reports:
        return json.loads(reports[0].read_text())
    rows: list[dict[str, Any]] = []
    for path in verdict_files:
        rows += read_jsonl(path, required=("judge", "is_refusal"))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: plot the trade-off (and optionally the strength sweep) of judged results."""
    parser = argparse.ArgumentParser(description="Plot refusal vs over-refusal from judged results.")
    parser.add_argument("inputs", nargs="+", type=Path, help="report.json, or verdicts.jsonl file(s)")
    parser.add_argument("--out", type=Path, required=True, help="trade-off PNG path (a PDF is written next to it)")
    parser.add_argument("--sweep-out", type=Path, default=None, help="also plot the strength sweep here")
    parser.add_argument("--judge", default=None, help="judge whose verdicts to plot")
    parser.add_argument(
        "--max-over-refusal", type=float, default=DEFAULT_GOOD_REGION[0], help="edge of the shaded region"
    )
    parser.add_argument("--min-refusal", type=float, default=DEFAULT_GOOD_REGION[1], help="edge of the shaded region")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    good_region = (args.max_over_refusal, args.min_refusal)
    try:
        data = load_plot_input(args.inputs)
        plot_tradeoff(data, args.out, judge=args.judge, good_region=good_region)
        if args.sweep_out is not None:
            plot_strength_sweep(data, args.sweep_out, judge=args.judge, good_region=good_region)
    except (ValueError, OSError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
