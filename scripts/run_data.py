"""The run's prompt sets: what fits the vectors and the probe, what validates them, what is evaluated, and the
pool section 12's leave-one-source-out folds draw from (:func:`assemble_run_data`).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from scripts.data_splits import benign_with_lookalikes, calibration_split, dedupe_records, subsample_per_category
from scripts.generalization import model_training_counts
from scripts.pipeline import check_disjoint, split_fit_rows
from scripts.records import PromptRecord
from scripts.refusal_tokens import CategorySet


@dataclass(frozen=True)
class RunData:
    """The prompt sets of one run; fit, validation and evaluation rows share no normalised prompt.

    Attributes:
        fit_records: Rows that fit the vectors and the probe.
        validation_records: Rows that choose thresholds, layer and strengths.
        eval_harmful: Held-out harmful prompts generated under each condition (held-out split, then an
            unseen source).
        eval_benign: Benign look-alikes generated under each condition (the over-refusal set's evaluation part).
        train_harmful: Harmful side of fit + validation, before the split (categorised, then other-source rows).
        train_benign: Benign side of fit + validation, before the split (look-alikes, plain, calibration).
        n_calibration: How many over-refusal prompts calibrate vectors and probe (the end of ``train_benign``).
        generalization_pool: Every prompt the leave-one-source-out folds may draw from.
        generalization_contrast: The held-out contrast prompts, never trained on in any fold.
        generalization_model_counts: Source → prompts the refusal-token fine-tune saw (``None``: unknown).
    """

    fit_records: list[PromptRecord]
    validation_records: list[PromptRecord]
    eval_harmful: list[PromptRecord]
    eval_benign: list[PromptRecord]
    train_harmful: list[PromptRecord]
    train_benign: list[PromptRecord]
    n_calibration: int
    generalization_pool: list[PromptRecord]
    generalization_contrast: list[PromptRecord]
    generalization_model_counts: dict[str, int] | None

    @property
    def train_records(self) -> list[PromptRecord]:
        """Fit rows, then validation rows: the rows of the training activations."""
        return self.fit_records + self.validation_records

    @property
    def fit_rows(self) -> list[int]:
        """Indices of the fit rows in :attr:`train_records`."""
        return list(range(len(self.fit_records)))

    @property
    def validation_rows(self) -> list[int]:
        """Indices of the validation rows in :attr:`train_records`."""
        return list(range(len(self.fit_records), len(self.fit_records) + len(self.validation_records)))

    @property
    def train_labels(self) -> torch.Tensor:
        """``[N_train]`` 1 for harmful, 0 for benign, aligned with :attr:`train_records`."""
        return torch.tensor([1 if r.label == "harmful" else 0 for r in self.train_records])

    @property
    def eval_records(self) -> list[PromptRecord]:
        """Harmful, then benign evaluation prompts (the rows every condition generates on)."""
        return self.eval_harmful + self.eval_benign

    def describe(self) -> str:
        """The counts of each set, one line each."""
        benign_sources = dict(Counter(r.source for r in self.train_benign))
        lookalikes = sum(r.category != "benign" for r in self.train_benign)
        return "\n".join([
            f"train harmful: {dict(Counter(r.category for r in self.train_harmful))}",
            f"train benign: {len(self.train_benign)} {benign_sources} look-alikes: {lookalikes} "
            f"of which over-refusal calibration: {self.n_calibration}",
            f"eval harmful: {dict(Counter(r.category for r in self.eval_harmful))}",
            f"eval benign (over-refusal set): {len(self.eval_benign)}",
            f"fit rows {len(self.fit_records)}, validation rows {len(self.validation_records)} "
            "(no prompt on two sides)",
        ])  # fmt: skip


def _sample(records: Sequence[PromptRecord], n: int, seed: int) -> list[PromptRecord]:
    return random.Random(seed).sample(list(records), min(len(records), n))


def _load_sources(data: str, category_set: CategorySet, seed: int) -> dict:
    """The raw sets of ``data`` (``"offline"`` or ``"hub"``), by role."""
    if data == "offline":
        from scripts.offline_corpus import load_offline_corpus
        from scripts.refusal_token_finetune import select_offline_data

        corpus = load_offline_corpus()
        splits = select_offline_data(corpus, category_set, seed=seed)
        return {
            "train_harmful": splits.train_harmful, "train_benign": splits.train_benign,
            "eval_harmful": splits.test_harmful, "eval_benign": splits.overrefusal,
            "unseen_harmful": splits.extra_harmful["harmbench"],
            "other_harmful": [r for r in corpus if r.source == "advbench"],
            # The whole corpus; the contrast sets are never trained on in any fold.
            "pool": corpus, "contrast": splits.test_harmful + splits.overrefusal,
            "model_counts": model_training_counts(splits.train_harmful + splits.train_benign),
        }  # fmt: skip
    if data == "hub":
        from scripts.eval_data import load_dataset_records
        from scripts.training_data import load_training_records

        corpus = load_training_records("coconot_original") + load_training_records("coconot_pref")
        eval_harmful = load_dataset_records("coconot_original", split="test")
        eval_benign = load_dataset_records("coconot_contrast")
        return {
            "train_harmful": [r for r in corpus if r.label == "harmful"],
            "train_benign": [r for r in corpus if r.label == "benign"],
            "eval_harmful": eval_harmful, "eval_benign": eval_benign, "unseen_harmful": [], "other_harmful": [],
            "pool": corpus + eval_harmful + eval_benign, "contrast": eval_harmful + eval_benign, "model_counts": None,
        }  # fmt: skip
    raise ValueError(f"unknown data {data!r}; valid: ['offline', 'hub']")


def assemble_run_data(
    data: str,
    category_set: CategorySet,
    *,
    n_train_per_category: int,
    n_probe_extra_harmful: int,
    n_eval_per_category: int,
    n_eval_unseen_harmful: int,
    n_eval_overrefusal: int,
    overrefusal_calibration_fraction: float,
    probe_validation_fraction: float,
    seed: int = 0,
) -> RunData:
    """Load ``data`` and split it into the run's sets, all seeded by ``seed``.

    Training prompts are de-duplicated; part of the over-refusal set (``overrefusal_calibration_fraction``)
    joins the benign training side, the rest is evaluated. The harmful training side is
    ``n_train_per_category`` per category plus ``n_probe_extra_harmful`` uncategorised prompts of another
    source (offline: AdvBench); the benign side is half look-alikes, half plain, plus the calibration part.
    The training rows are then split into fit and validation rows (:func:`scripts.pipeline.split_fit_rows`).

    Raises:
        ValueError: an unknown ``data``, or a prompt on two of the fit, validation and evaluation sides
            (:func:`scripts.pipeline.check_disjoint`).
    """
    raw = _load_sources(data, category_set, seed)
    # The fine-tune's balancing repeats prompts of small risk areas: each prompt counts once from here on.
    train_harmful, train_benign = dedupe_records(raw["train_harmful"]), dedupe_records(raw["train_benign"])
    eval_benign = dedupe_records(raw["eval_benign"])
    calibration_benign, eval_benign = (calibration_split(eval_benign, overrefusal_calibration_fraction, seed=seed)
                                       if overrefusal_calibration_fraction > 0 else ([], eval_benign))  # fmt: skip
    train_harmful = subsample_per_category(train_harmful, n_train_per_category, seed=seed)
    # Harmful prompts of another source, phrased differently (no category: the vectors skip them).
    train_harmful += _sample(raw["other_harmful"], n_probe_extra_harmful, seed)
    n_train_benign = n_train_per_category * len(category_set.categories)
    train_benign = benign_with_lookalikes(train_benign, max(n_train_benign - len(calibration_benign), 0), seed=seed)
    train_benign += calibration_benign
    eval_harmful = (subsample_per_category(raw["eval_harmful"], n_eval_per_category, seed=seed)
                    + _sample(raw["unseen_harmful"], n_eval_unseen_harmful, seed))  # fmt: skip
    eval_benign = _sample(eval_benign, n_eval_overrefusal, seed)
    fit_records, validation_records = split_fit_rows(train_harmful + train_benign, probe_validation_fraction, seed=seed)
    check_disjoint({"fit": fit_records, "validation": validation_records, "evaluation": eval_harmful + eval_benign})
    return RunData(
        fit_records=fit_records, validation_records=validation_records, eval_harmful=eval_harmful,
        eval_benign=eval_benign, train_harmful=train_harmful, train_benign=train_benign,
        n_calibration=len(calibration_benign), generalization_pool=list(raw["pool"]),
        generalization_contrast=list(raw["contrast"]), generalization_model_counts=raw["model_counts"],
    )  # fmt: skip
