"""The published results, written from a run's ``summary.json``: the README's results block and ``docs/results.md``.

No figure in either page is typed by hand. ``python -m scripts.results_doc results/default/summary.json``
rewrites the README between its two marker lines, writes ``docs/results.md`` (every table of the run)
and copies the run's figures into ``docs/``, so what is published is always one run file, with the set,
n and interval of every rate, the model build and the machine it was measured on.

A cell resting on fewer than :data:`SMALL_CELL` prompts is marked, and the page says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from scripts.report import DO_NO_HARM_MAX_OVER_REFUSAL_RISE, do_no_harm, paired_difference

logger = logging.getLogger(__name__)

README_BEGIN = "<!-- results:begin (written by python -m scripts.results_doc; do not edit by hand) -->"
README_END = "<!-- results:end -->"
SMALL_CELL = 60
"""Cells with fewer prompts than this are marked: too few to tell conditions apart on their own."""
SMALL_MARK = "†"
CONDITION_LABELS: dict[str, str] = {
    "base": "base (unsteered)",
    "categorical_steering": "categorical steering (own token routes)",
    "probe_routed_steering": "probe-routed steering",
    "probe_routed_binary": "probe-routed, binary (the paper's policy)",
    "probe_routed_abstain": "probe-routed, abstain band",
    "probe_routed_graded": "probe-routed, graded strength",
    "low_rank_combination": "low-rank combination",
    "logit_bias": "logit bias on the refusal tokens (baseline)",
}
FIGURES: tuple[tuple[str, str], ...] = (
    ("refusal_tradeoff.png", "refusal_tradeoff.png"),
    ("figures/layer_sweep.png", "layer_sweep.png"),
    ("figures/generalization_auc.png", "generalization_auc.png"),
    ("figures/data_curve.png", "data_curve.png"),
    ("figures/policy_table.png", "policy_table.png"),
)
"""``(path in the run directory, name in docs/)`` of the figures the results page shows."""


def format_cell(rate: float | None, interval: Sequence[float | None] | None, n: int | None) -> str:
    """``0.840 [0.756, 0.899] (84/100)``, marked with :data:`SMALL_MARK` when ``n`` < :data:`SMALL_CELL`."""
    if rate is None or not n:
        return "–"
    k = round(rate * n)
    text = f"{rate:.3f}"
    if interval and interval[0] is not None and interval[1] is not None:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    text += f" ({k}/{n})"
    return text + (f" {SMALL_MARK}" if n < SMALL_CELL else "")


def _rate_cell(rate: Mapping[str, Any]) -> str:
    """:func:`format_cell` of a rate record ``{"rate", "ci", "n", ...}`` (:func:`scripts.report.rate_summary`)."""
    return format_cell(rate.get("rate"), rate.get("ci"), rate.get("n"))


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ordered_conditions(summary: Mapping[str, Any]) -> list[str]:
    names = [name for name in CONDITION_LABELS if name in summary]
    return names + [name for name in summary.get("conditions", []) if name not in names and name in summary]


def format_paired(paired: Mapping[str, Any] | None) -> str:
    """``+0.040 [-0.010, 0.090], p 0.22``: a paired difference from the unsteered model (``–`` where there is none)."""
    if not paired or paired.get("difference") is None:
        return "–"
    low, high = paired["ci"]
    return f"{paired['difference']:+.3f} [{low:+.3f}, {high:+.3f}], p {paired['p_value']:.2g}"


def condition_table(summary: Mapping[str, Any]) -> str:
    """The main table: each condition's refusal rate on harmful prompts and over-refusal on benign look-alikes.

    Where the summary holds ``paired_vs_base``, two columns give each condition's paired difference from
    the unsteered model on the same prompts (Newcombe interval, exact McNemar p-value), and a third
    whether it does no harm (:func:`scripts.report.do_no_harm`).
    """
    paired = summary.get("paired_vs_base") or {}
    policy = (summary.get("routing") or {}).get("policy", {}).get("name")
    rows = []
    for name in _ordered_conditions(summary):
        cells = [_rate_cell(summary[name].get(label, {})) for label in ("harmful", "benign")]
        if paired:
            cells += [format_paired(paired.get(name, {}).get(label)) for label in ("harmful", "benign")]
            verdict = do_no_harm(paired[name]) if name in paired else None
            cells.append("–" if verdict is None else ("yes" if verdict else "no"))
        label = CONDITION_LABELS.get(name, name)
        if name == "probe_routed_steering" and policy:
            label += f", {policy} policy"
        rows.append([label + f" (`{name}`)", *cells])
    header = ["condition", "refusal on harmful [95% CI] (k/n)", "over-refusal on benign look-alikes [95% CI] (k/n)"]
    if paired:
        header += ["Δ refusal vs unsteered, paired [95% CI], McNemar p",
                   "Δ over-refusal vs unsteered, paired [95% CI], McNemar p", "does no harm"]
    return _markdown_table(header, rows)


def _policy_conditions(summary: Mapping[str, Any]) -> dict[str, str]:
    """Routing policy → the main-table condition steered with it (the run's own policy first)."""
    run_policy = (summary.get("routing") or {}).get("policy", {}).get("name")
    conditions = {run_policy: "probe_routed_steering"} if run_policy and "probe_routed_steering" in summary else {}
    for name in summary.get("conditions", []):
        if name.startswith("probe_routed_") and name != "probe_routed_steering" and name in summary:
            conditions.setdefault(name.removeprefix("probe_routed_"), name)
    return conditions


def _verdict(value: bool | None, missing: str = "undecided") -> str:
    return missing if value is None else ("yes" if value else "no")


def tradeoff_statement(summary: Mapping[str, Any]) -> str:
    """One paragraph: each routing policy's in-distribution paired differences and do-no-harm verdicts.

    In-distribution figures are the main table's paired differences from the unsteered model; the
    held-out verdict is the routing-policy table's (every held-out source and seed). Empty where the
    summary has no paired differences or no probe-routed condition.
    """
    paired = summary.get("paired_vs_base") or {}
    held_out = ((summary.get("generalization") or {}).get("policy_table") or {}).get("do_no_harm", {})
    policy_conditions = _policy_conditions(summary)
    clauses, harmless = [], []
    for policy, name in policy_conditions.items():
        if name not in paired:
            continue
        in_distribution = do_no_harm(paired[name])
        away = held_out.get(policy)
        benign, harmful = paired[name].get("benign"), paired[name].get("harmful")
        clauses.append(f"`{policy}` (`{name}`): over-refusal {format_paired(benign)}, harmful refusal "
                       f"{format_paired(harmful)}; does no harm in the main table: {_verdict(in_distribution)}, on "
                       f"every held-out source and seed: {_verdict(away, 'not measured')}")  # fmt: skip
        if in_distribution and away:
            harmless.append(((benign or {}).get("difference") or 0.0, policy))
    if not clauses:
        return ""
    text = "Routing policies against the unsteered model on the same prompts: " + "; ".join(clauses) + "."
    if harmless:
        best = min(harmless)[1]
        text += f" Of the policies that do no harm in both, `{best}` lowers over-refusal most in distribution."
    else:
        text += " No policy does no harm both in the main table and on every held-out source and seed."
    benign_n = [paired[name]["benign"]["n"] for name in policy_conditions.values()
                if paired.get(name, {}).get("benign", {}).get("n")]  # fmt: skip
    if benign_n:
        text += " In the main table, even " + certifiable_note(min(benign_n))
    return text


def run_description(summary: Mapping[str, Any]) -> str:
    """One paragraph: model, build, layer, strengths, judge, probe AUC and machine of the run."""
    strengths = summary.get("strengths", {})
    probe = summary.get("probe", {})
    routing = summary.get("routing", {})
    parts = [f"Model `{summary.get('model')}`"]
    if summary.get("base_model"):
        parts[0] += f" (built from `{summary['base_model']}`)"
    build = summary.get("model_build") or {}
    if build:
        parts.append("refusal-token build: " + ", ".join(f"{key} {value}" for key, value in build.items()))
    parts.append(f"layer {summary.get('layer')} (`{summary.get('hook')}`)")
    if strengths:
        parts.append(f"strengths +{strengths.get('positive'):g} / {strengths.get('negative'):g} on unit vectors")
    if routing.get("router"):
        parts.append(f"router `{routing['router']}`")
    parts.append(f"judge `{summary.get('judge')}`")
    for pair in summary.get("judge_agreement") or []:
        if pair.get("kappa") is not None:
            parts.append(f"Cohen's κ {pair['judges'][0]} vs {pair['judges'][1]} {pair['kappa']:.2f} (n = {pair['n']})")
    if probe.get("auc") is not None:
        parts.append(f"probe held-out ROC-AUC {probe['auc']:.3f}")
    machine = summary.get("machine") or {}
    if machine:
        parts.append("measured on " + ", ".join(f"{key} {value}" for key, value in machine.items()))
    return "; ".join(parts) + "."


EXECUTED_NOTEBOOK = "refusal_tokens.executed.ipynb"


def notebook_seconds(run_dir: str | Path) -> float | None:
    """Wall seconds of the run's last notebook execution, as papermill recorded it in the executed notebook."""
    path = Path(run_dir) / EXECUTED_NOTEBOOK
    if not path.exists():
        return None
    duration = json.loads(path.read_text(encoding="utf-8")).get("metadata", {}).get("papermill", {}).get("duration")
    return float(duration) if duration is not None else None


def build_metrics(summary: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``metrics.json`` of the refusal-token build the run loaded, where its model is such a local build."""
    from scripts.model import REFUSAL_TOKEN_MODEL_ALIAS
    from scripts.paths import models_dir

    model = str(summary.get("model") or "")
    directory = models_dir() / REFUSAL_TOKEN_MODEL_ALIAS if model == REFUSAL_TOKEN_MODEL_ALIAS else Path(model)
    path = directory / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if model and path.is_file() else None


def timing_description(summary: Mapping[str, Any], run_dir: str | Path) -> str:
    """One sentence: how long the model build and the notebook took, and on which CPU and precision.

    The build's phases come from its ``metrics.json``; the notebook's time is papermill's record of its last
    execution (shorter when that execution resumed saved generations). Empty where neither is recorded.
    """
    parts = []
    metrics = build_metrics(summary)
    if metrics and metrics.get("timings", {}).get("total_s") is not None:
        timings = metrics["timings"]
        phases = ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {seconds / 60:.1f}"
                           for name, seconds in timings.items() if name != "total_s")  # fmt: skip
        precision = (metrics.get("precision") or {}).get("resolved", "unrecorded precision")
        parts.append(f"the refusal-token build {timings['total_s'] / 60:.1f} min ({phases}; {precision}, "
                     f"{metrics.get('torch_threads', '?')} threads on {metrics.get('cpu', 'an unrecorded CPU')}, "
                     f"capability {metrics.get('cpu_capability', '?')})")  # fmt: skip
    seconds = notebook_seconds(run_dir)
    if seconds is not None:
        machine = summary.get("machine") or {}
        parts.append(f"the notebook {seconds / 60:.1f} min ({machine.get('torch_threads', '?')} threads on "
                     f"{machine.get('cpu', 'an unrecorded CPU')}, capability {machine.get('cpu_capability', '?')}; "
                     "its last execution, as papermill recorded it)")  # fmt: skip
    return ("Time: " + "; ".join(parts) + ".") if parts else ""


def _small_note(text: str) -> str:
    if SMALL_MARK not in text:
        return ""
    return (f"\n\n{SMALL_MARK} fewer than {SMALL_CELL} prompts in the cell: one run of one seed; the interval, not the "
            "point, says what the cell can tell.")


def generalization_table(generalization: Mapping[str, Any]) -> str:
    """Leave-one-source-out: per held-out source, router AUCs, routing share and base → steered rate."""
    router = generalization["best_probe_router"]
    steering = generalization.get("steering_router") or router
    rows = []
    for source, entry in generalization["sources"].items():
        own = "harmful" if entry["label"] == "harmful" else "benign"
        routing = entry["routing"].get(steering, {})
        if own == "harmful":
            toward = routing.get("harmful_routed_harmful")
        else:
            kept = routing.get("benign_routed_benign")
            toward = None if kept is None else 1.0 - kept
        auc = entry["probe_auc"][router]
        conditions = entry.get("conditions", {})
        base = conditions.get("base", {}).get(own, {})
        steered = conditions.get("probe_routed_steering", {}).get(own, {})
        token = entry["probe_auc"].get("token", {}).get("auc")
        steering_auc = entry["probe_auc"].get(steering, {}).get("auc")
        rows.append([
            source, entry["label"], str(entry.get("model_saw_source", "?")),
            f"{auc['auc']:.3f} [{auc['ci'][0]:.2f}, {auc['ci'][1]:.2f}]",
            "–" if token is None else f"{token:.3f}",
            "–" if steering_auc is None else f"{steering_auc:.3f}",
            "–" if toward is None else f"{toward:.2f}",
            _rate_cell(base),
            _rate_cell(steered),
        ])  # fmt: skip
    header = ["held-out source", "label", "fine-tune saw it", f"{router} AUC [95% CI]", "token AUC",
              f"{steering} AUC", "routed toward refusal", "base rate",
              f"probe-routed rate ({generalization['protocol']['policy']} policy)"]
    means = ", ".join(f"`{name}` {value:.3f}" for name, value in generalization["router_mean_auc"].items())
    return _markdown_table(header, rows) + f"\n\nMean held-out AUC: {means}."


def data_curve_table(curve: Mapping[str, Any]) -> str:
    """The look-alike data curve: rates on the held-out source after ``k`` of its prompts join the fold."""
    labels = sorted(curve["base"])
    rows = [["unsteered", "–"] + [_rate_cell(curve["base"][label]) for label in labels] + ["–"]]
    for point in curve["points"]:
        share = point.get("routed_toward_refusal")
        rows.append([point["routing"], str(point["shots"])]
                    + [_rate_cell(point["rates"].get(label, {})) for label in labels]
                    + ["–" if share is None else f"{share:.2f}"])
    header = ["routing", "shots k"] + [f"{label} refused [95% CI] (k/n)" for label in labels] + ["routed toward refusal"]
    policies = sorted({point["policy"] for point in curve["points"]})
    return (f"Held-out source `{curve['source']}`; routing policy {', '.join(policies)}.\n\n"
            + _markdown_table(header, rows))


def policy_table_markdown(policy_table: Mapping[str, Any]) -> str:
    """Routing policies on held-out sources: mean rate over seeds (range), paired difference and do-no-harm verdict."""
    rows = []
    for source, entry in policy_table["sources"].items():
        for policy, cell in entry["policies"].items():
            for label in entry["unsteered"]:
                base = entry["unsteered"][label]
                rate, diff = cell["rate"][label], cell["paired_difference"][label]
                low, high = cell["paired_lower"][label], cell["paired_upper"][label]
                own = label == entry["label"] or entry["label"] == "mixed"
                rows.append([
                    source, policy, label, str(base["n"]),
                    "–" if base["rate"] is None else f"{base['rate']:.3f}",
                    "–" if rate["mean"] is None else f"{rate['mean']:.3f} ({rate['min']:.3f}–{rate['max']:.3f})",
                    "–" if diff["mean"] is None else f"{diff['mean']:+.3f} [{low['min']:+.3f}, {high['max']:+.3f}]",
                    str(cell["do_no_harm_every_seed"]) if own else "",
                ])  # fmt: skip
    header = ["held-out source", "policy", "prompts", "n", "unsteered", "steered, mean (range)",
              "paired difference, mean [widest 95% CI]", "does no harm, every seed"]
    verdicts = ", ".join(f"`{policy}` {verdict}" for policy, verdict in policy_table["do_no_harm"].items())
    text = _markdown_table(header, rows) + f"\n\nDoes no harm on every held-out source and seed: {verdicts}."
    benign_n = [entry["unsteered"]["benign"]["n"] for entry in policy_table["sources"].values()
                if entry["unsteered"].get("benign", {}).get("n")]  # fmt: skip
    bound = policy_table["protocol"].get("max_over_refusal_rise")
    if benign_n and bound is not None:
        text += " Even " + certifiable_note(min(benign_n), bound)
    return text


def certifiable_note(n: int, bound: float = DO_NO_HARM_MAX_OVER_REFUSAL_RISE) -> str:
    """What ``n`` paired benign prompts can certify: ``with no verdict changed, ...``, a clause to open a sentence with.

    It gives the paired interval's upper end when no verdict changes, and the fewest prompts that bring it to ``bound``.
    """
    upper = paired_difference([False] * n, [False] * n)["ci"][1]
    needed = next(m for m in range(n, 100 * n) if paired_difference([False] * m, [False] * m)["ci"][1] <= bound)
    return (f"with no verdict changed, {n} benign prompts give a paired interval up to {upper:+.3f}; "
            f"an upper end of {bound:+.2f} or less needs at least {needed} prompts with none changed.")


def readme_block(summary: Mapping[str, Any], timing: str = "") -> str:
    """The README's results block: the run description, the main table and the run's timing sentence."""
    table = condition_table(summary)
    parts = [run_description(summary), table + _small_note(table), tradeoff_statement(summary), timing,
             "All tables of the run, with leave-one-source-out and the data curve: [docs/results.md](docs/results.md)."]
    return "\n\n".join(part for part in parts if part)


def results_page(summary: Mapping[str, Any], figures: Sequence[str] = (), timing: str = "") -> str:
    """``docs/results.md``: every table of the run and the figures copied beside it."""
    table = condition_table(summary)
    sections = ["# Results of one run", "Written by `python -m scripts.results_doc` from the run's `summary.json`; "
                "nothing here is typed by hand.", run_description(summary)]
    sections += [timing] if timing else []
    sections += ["## Conditions", table + _small_note(table)]
    statement = tradeoff_statement(summary)
    if statement:
        sections.append(statement)
    if "refusal_tradeoff.png" in figures:
        sections.append("![refusal vs over-refusal](refusal_tradeoff.png)")
    if "layer_sweep.png" in figures:
        sections += ["## Layer and strength sweep", "![layer and strength sweep](layer_sweep.png)"]
    generalization = summary.get("generalization")
    if generalization:
        protocol = generalization.get("protocol", {})
        generalization_text = generalization_table(generalization)
        sections += ["## Leave-one-source-out",
                     "Probes, router and vectors refitted without the source; the refusal-token model is fixed. "
                     f"Protocol: `{json.dumps(protocol, sort_keys=True)}`.",
                     generalization_text + _small_note(generalization_text)]
        if "generalization_auc.png" in figures:
            sections.append("![held-out AUC by layer](generalization_auc.png)")
        policy_table = generalization.get("policy_table")
        if policy_table:
            protocol = policy_table["protocol"]
            sections += ["## Routing policies on held-out sources",
                         f"Every pool prompt of each held-out source, judged by the first token (a refusal token or "
                         f"`[respond]`); vectors, probe, router and policy refitted without the source on each of "
                         f"seeds {protocol['seeds']}; paired with the unsteered model on the same prompts. Does no "
                         f"harm: the over-refusal difference's upper 95% end at most +{protocol['max_over_refusal_rise']}"
                         f" and harmful refusal down by at most {protocol['max_refusal_drop']}, on every seed.",
                         policy_table_markdown(policy_table)]
            if "policy_table.png" in figures:
                sections.append("![routing policies on held-out sources](policy_table.png)")
        curve = generalization.get("data_curve")
        if curve:
            curve_text = data_curve_table(curve)
            sections += ["## Look-alike data curve", curve_text + _small_note(curve_text)]
            if "data_curve.png" in figures:
                sections.append("![data curve](data_curve.png)")
    return "\n\n".join(sections) + "\n"


def replace_block(text: str, block: str, begin: str = README_BEGIN, end: str = README_END) -> str:
    """``text`` with what lies between the ``begin`` and ``end`` lines replaced by ``block``.

    Raises:
        ValueError: a marker is missing, or they are out of order.
    """
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < 0 or stop < start:
        raise ValueError(f"the results markers are missing or out of order; expected the lines\n{begin}\n{end}")
    return text[: start + len(begin)] + "\n" + block.strip() + "\n" + text[stop:]


def publish(summary_path: str | Path, readme: str | Path, docs: str | Path) -> list[Path]:
    """Write the README block, ``docs/results.md`` and the figures of the run holding ``summary_path``.

    Returns:
        The paths written.
    """
    summary_path = Path(summary_path)
    summary = json.loads(summary_path.read_text())
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    written, figures = [], []
    for source, name in FIGURES:
        path = summary_path.parent / source
        if path.exists():
            shutil.copyfile(path, docs / name)
            written.append(docs / name)
            figures.append(name)
    timing = timing_description(summary, summary_path.parent)
    page = docs / "results.md"
    page.write_text(results_page(summary, figures, timing))
    readme = Path(readme)
    readme.write_text(replace_block(readme.read_text(), readme_block(summary, timing)))
    written += [page, readme]
    for path in written:
        logger.info("wrote %s", path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m scripts.results_doc SUMMARY [--readme README.md] [--docs docs]``."""
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", help="a run's summary.json (e.g. results/default/summary.json)")
    parser.add_argument("--readme", default=str(root / "README.md"))
    parser.add_argument("--docs", default=str(root / "docs"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    publish(args.summary, args.readme, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
