"""Fine-tune recipe study: over-refusal of the refusal-token model on look-alike sources its fine-tune never saw.

Routing can only undo over-refusal the router recognises; what the fine-tuned model refuses on its own
is set by its recipe. This experiment builds the model under several recipes (the share of benign
training prompts per harmful one), each with the same look-alike sources left out of the fine-tune
altogether (:func:`scripts.refusal_token_finetune.select_offline_data`, ``exclude_sources``), and
measures the first-token decision (a category token, or ``[respond]``) on:

* every prompt of each left-out source (both labels where it has them: the refusal pairs are safe and
  dangerous requests on the same topics);
* the over-refusal set and HarmBench, which no fine-tune sees;
* the Do-Not-Answer prompts held out by every build (in-distribution harmful).

A reference build (the default model, trained on every source) is measured where it too never
trained. Each recipe is compared with the first on the same prompts (:func:`scripts.report.paired_difference`),
and the build's own category-token figures are reported beside it. Builds are cached under
``models_dir()/recipe_study`` (a rerun reuses them); each takes a fine-tune, so this runs outside the
notebook. To fit several builds on a CPU, the study's recipes freeze the lowest third of the decoder
layers by default (``--frozen-layer-fraction``; the default model trains every layer): they are
compared with each other, and the default model only on prompts none of the builds trained on:

``python -m scripts.recipe_study [--benign-ratios 0.6 1.2] [--exclude-sources rho_refusal_pairs rho_bbq]``

It writes ``<out>/recipe_study.json`` and ``docs/recipe_study.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.paths import models_dir, results_dir
from scripts.records import PromptRecord
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES, CategorySet
from scripts.report import paired_difference, rate_summary

logger = logging.getLogger(__name__)

DEFAULT_BENIGN_RATIOS: tuple[float, ...] = (0.6, 1.2)
DEFAULT_EXCLUDED_SOURCES: tuple[str, ...] = ("rho_refusal_pairs", "rho_bbq")
DEFAULT_STUDY_FROZEN_FRACTION = 1 / 3
"""Lower decoder layers the study's builds leave untrained (a cheaper step; the default model trains all)."""
NEVER_TRAINED_SOURCES: tuple[str, ...] = ("rho_overrefusal", "harmbench")
"""Sources no fine-tune sees (evaluation-only in the corpus)."""

IN_DISTRIBUTION_SET = "donotanswer_test"
REFERENCE = "default (every source)"


def recipe_name(benign_ratio: float, exclude_sources: Sequence[str]) -> str:
    """``benign0.6_without_rho_bbq+rho_refusal_pairs``: a recipe's directory and table name."""
    return f"benign{benign_ratio:g}" + (f"_without_{'+'.join(sorted(exclude_sources))}" if exclude_sources else "")


def training_ids(metrics: Mapping[str, Any], corpus: Sequence[PromptRecord], category_set: CategorySet) -> set[str]:
    """Record ids a build trained on, recomputed from its recorded split settings (seeded, so exact)."""
    from scripts.refusal_token_finetune import select_offline_data

    split = metrics["split"]
    data = select_offline_data(corpus, category_set, seed=split["seed"], benign_ratio=split["benign_ratio"],
                               limit=split["limit"], harmful_sources=split["harmful_sources"],
                               exclude_sources=split.get("exclude_sources", []))  # fmt: skip
    return {record.id for record in data.train_harmful + data.train_benign}


def evaluation_sets(
    corpus: Sequence[PromptRecord], held_out_test: Sequence[PromptRecord], exclude_sources: Sequence[str]
) -> dict[str, list[PromptRecord]]:
    """Set name → prompts: each left-out source, the never-trained sources, and the held-out Do-Not-Answer prompts."""
    sets = {source: [r for r in corpus if r.source == source] for source in [*exclude_sources, *NEVER_TRAINED_SOURCES]}
    sets[IN_DISTRIBUTION_SET] = list(held_out_test)
    empty = sorted(name for name, records in sets.items() if not records)
    if empty:
        raise ValueError(f"no prompts for {empty}; the corpus has sources {sorted({r.source for r in corpus})}")
    return sets


def first_token_refused(model_dir: Path, records: Sequence[PromptRecord], category_set: CategorySet) -> dict[str, bool]:
    """Record id → whether the model at ``model_dir`` opens its answer with a category token."""
    import torch

    from scripts.model import load_model
    from scripts.refusal_token_finetune import first_token_ids

    model, tokenizer = load_model(str(model_dir), dtype=torch.float32)
    model.eval()
    by_token = category_set.category_of_token_id(tokenizer)
    with torch.no_grad():
        ids = first_token_ids(model, tokenizer, [r.prompt for r in records], progress=True)
    return {record.id: token_id in by_token for record, token_id in zip(records, ids)}


def study_table(
    decisions: Mapping[str, Mapping[str, bool]],
    trained: Mapping[str, set[str]],
    sets: Mapping[str, Sequence[PromptRecord]],
    reference: str,
) -> dict[str, Any]:
    """Rates per recipe, set and label on the prompts it never trained on, and paired differences from ``reference``.

    Args:
        decisions: Recipe → record id → refused (first token a category token).
        trained: Recipe → ids of its training prompts (left out of its cells).
        sets: Set name → its prompts.
        reference: The recipe every other one is compared with, on the prompts both never trained on.

    Returns:
        ``{set: {label: {recipe: {"rate", "ci", "n", "k", "paired": paired difference or None}}}}``.
    """
    if reference not in decisions:
        raise KeyError(f"unknown reference recipe {reference!r}; recipes: {list(decisions)}")
    table: dict[str, Any] = {}
    for name, records in sets.items():
        for label in sorted({r.label for r in records}):
            members = [r for r in records if r.label == label]
            cells = {}
            for recipe, refused in decisions.items():
                unseen = [r for r in members if r.id not in trained[recipe] and r.id in refused]
                if not unseen:
                    continue
                summary = rate_summary([refused[r.id] for r in unseen])
                paired = None
                if recipe != reference:
                    both = [r for r in unseen if r.id not in trained[reference] and r.id in decisions[reference]]
                    if both:
                        paired = paired_difference([decisions[reference][r.id] for r in both],
                                                   [refused[r.id] for r in both])  # fmt: skip
                cells[recipe] = {**{k: summary[k] for k in ("rate", "ci", "n", "k")}, "paired": paired}
            table.setdefault(name, {})[label] = cells
    return table


def study_markdown(study: Mapping[str, Any]) -> str:
    """``docs/recipe_study.md``: the build figures and the rate table, from ``recipe_study.json``."""
    reference = study["reference"]
    lines = ["# Fine-tune recipe study", "",
             "Written by `python -m scripts.recipe_study` from its `recipe_study.json`; nothing here is typed by hand.",
             "", f"Left out of the fine-tune of every recipe below except `{REFERENCE}`: "
             + ", ".join(f"`{s}`" for s in study["exclude_sources"]) + ". Refusal = the first generated token is a "
             "category token. Each cell counts only prompts that recipe never trained on; Δ is the paired difference "
             f"from `{reference}` on the prompts both never trained on (Newcombe 95% interval, exact McNemar p). "
             f"One build per recipe, seed {study['seed']}; machine: {study['machine']}.", "",
             "| recipe | training prompts (harmful + benign) | category token first | right category | "
             "[respond] first | frozen layers | build min |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for recipe, build in study["builds"].items():
        figures = build["figures"]
        lines.append(f"| `{recipe}` | {build['train_harmful']} + {build['train_benign']} | "
                     f"{figures['harmful_category_token_first']:.3f} | {figures['harmful_right_category']:.3f} | "
                     f"{figures['benign_respond_first']:.3f} | {build.get('frozen_layers')} | "
                     f"{build['minutes']:.1f} |")  # fmt: skip
    lines += ["", "| prompts | label | recipe | refused [95% CI] (k/n) | Δ vs reference [95% CI], p |",
              "| --- | --- | --- | --- | --- |"]
    for name, by_label in study["table"].items():
        for label, cells in by_label.items():
            for recipe, cell in cells.items():
                paired = cell["paired"]
                delta = "–" if not paired or paired["difference"] is None else (
                    f"{paired['difference']:+.3f} [{paired['ci'][0]:+.3f}, {paired['ci'][1]:+.3f}], "
                    f"p {paired['p_value']:.2g} (n {paired['n']})")
                lines.append(f"| `{name}` | {label} | `{recipe}` | {cell['rate']:.3f} [{cell['ci'][0]:.3f}, "
                             f"{cell['ci'][1]:.3f}] ({cell['k']}/{cell['n']}) | {delta} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_study(
    benign_ratios: Sequence[float] = DEFAULT_BENIGN_RATIOS,
    exclude_sources: Sequence[str] = DEFAULT_EXCLUDED_SOURCES,
    out_dir: str | Path | None = None,
    include_reference: bool = True,
    category_set: CategorySet = DONOTANSWER_CATEGORIES,
    frozen_layer_fraction: float = DEFAULT_STUDY_FROZEN_FRACTION,
) -> dict[str, Any]:
    """Build (or reuse) each recipe's model, evaluate it, and return the study record (also written as JSON).

    Args:
        benign_ratios: One recipe per ratio, each without ``exclude_sources``; the first is the reference.
        include_reference: Also measure the default model (built on every source) where it never trained.
        frozen_layer_fraction: The study builds' ``FinetuneConfig.frozen_layer_fraction``.
    """
    from scripts.offline_corpus import load_offline_corpus
    from scripts.precision import cpu_description
    from scripts.refusal_token_finetune import (
        DEFAULT_BENIGN_RATIO,
        FinetuneConfig,
        build_offline_refusal_model,
        read_metrics,
        select_offline_data,
    )

    if not benign_ratios:
        raise ValueError("the study needs at least one benign ratio")
    corpus = load_offline_corpus()
    out = Path(out_dir) if out_dir is not None else results_dir() / "recipe_study"
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, Path] = {}
    for ratio in benign_ratios:
        name = recipe_name(ratio, exclude_sources)
        models[name] = build_offline_refusal_model(
            config=FinetuneConfig(frozen_layer_fraction=frozen_layer_fraction),
            out=models_dir() / "recipe_study" / name, benign_ratio=ratio, exclude_sources=exclude_sources,
        )  # fmt: skip
    if include_reference:
        models[REFERENCE] = build_offline_refusal_model()
    metrics = {name: read_metrics(path) for name, path in models.items()}
    trained = {name: training_ids(m, corpus, category_set) for name, m in metrics.items()}
    # Held-out Do-Not-Answer prompts: those no build trained on.
    default_split = select_offline_data(corpus, category_set, benign_ratio=DEFAULT_BENIGN_RATIO)
    ever_trained = set().union(*trained.values())
    held_out_test = [r for r in default_split.test_harmful if r.id not in ever_trained]
    sets = evaluation_sets(corpus, held_out_test, exclude_sources)
    every = {r.id: r for records in sets.values() for r in records}
    decisions = {name: first_token_refused(path, list(every.values()), category_set) for name, path in models.items()}
    reference = recipe_name(benign_ratios[0], exclude_sources)
    study = {
        "exclude_sources": list(exclude_sources),
        "benign_ratios": list(benign_ratios),
        "reference": reference,
        "seed": metrics[reference]["split"]["seed"],
        "machine": "{cpu} ({cpu_capability})".format(**cpu_description()),
        "builds": {name: {"figures": m["figures"], "train_harmful": m["split"]["train_harmful_distinct"],
                          "train_benign": sum(m["split"]["train_benign_by_source"].values()),
                          "minutes": m["timings"]["total_s"] / 60, "precision": m["precision"]["resolved"],
                          "frozen_layers": m["training"].get("frozen_layers")}
                   for name, m in metrics.items()},  # fmt: skip
        "table": study_table(decisions, trained, sets, reference),
    }
    (out / "recipe_study.json").write_text(json.dumps(study, indent=1) + "\n")
    return study


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m scripts.recipe_study``: run the study; write its JSON and ``docs/recipe_study.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benign-ratios", type=float, nargs="+", default=list(DEFAULT_BENIGN_RATIOS))
    parser.add_argument("--exclude-sources", nargs="+", default=list(DEFAULT_EXCLUDED_SOURCES))
    parser.add_argument("--out", default=None, help="directory of recipe_study.json (default: results/recipe_study)")
    parser.add_argument("--docs", default=str(Path(__file__).resolve().parent.parent / "docs" / "recipe_study.md"))
    parser.add_argument("--no-reference", action="store_true", help="leave out the default model")
    parser.add_argument("--frozen-layer-fraction", type=float, default=DEFAULT_STUDY_FROZEN_FRACTION,
                        help="lower decoder layers the study's builds leave untrained")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    study = run_study(args.benign_ratios, args.exclude_sources, args.out, include_reference=not args.no_reference,
                      frozen_layer_fraction=args.frozen_layer_fraction)
    Path(args.docs).write_text(study_markdown(study))
    logger.info("wrote %s", args.docs)


if __name__ == "__main__":
    main()
