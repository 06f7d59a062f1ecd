"""The run's prompt sets on a small synthetic corpus: disjoint sides, counts, row indices, seeded."""

from __future__ import annotations

import pytest

from scripts import run_data as run_data_module
from scripts.data_splits import normalize_text
from scripts.records import PromptRecord
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES
from scripts.run_data import assemble_run_data

CATEGORIES = DONOTANSWER_CATEGORIES.categories


def make(prompt: str, label: str, category: str, source: str) -> PromptRecord:
    return PromptRecord(prompt=prompt, label=label, category=category, source=source)


def synthetic_sources() -> dict:
    train_harmful = [make(f"harmful {c} {i}", "harmful", c, "dna") for c in CATEGORIES for i in range(10)]
    train_harmful += train_harmful[:3]  # the fine-tune's balancing repeats prompts
    train_benign = ([make(f"plain question {i}", "benign", "benign", "plain") for i in range(40)]
                    + [make(f"edgy question {i}", "benign", CATEGORIES[i % 5], "lookalike") for i in range(40)])
    eval_harmful = [make(f"held-out {c} {i}", "harmful", c, "dna") for c in CATEGORIES for i in range(6)]
    eval_benign = [make(f"over-refusal {i}", "benign", CATEGORIES[i % 5], "rho_overrefusal") for i in range(30)]
    unseen = [make(f"harmbench {i}", "harmful", "harmbench", "harmbench") for i in range(9)]
    other = [make(f"advbench {i}", "harmful", "advbench", "advbench") for i in range(9)]
    pool = train_harmful + train_benign + eval_harmful + eval_benign + unseen + other
    return {"train_harmful": train_harmful, "train_benign": train_benign, "eval_harmful": eval_harmful,
            "eval_benign": eval_benign, "unseen_harmful": unseen, "other_harmful": other, "pool": pool,
            "contrast": eval_harmful + eval_benign, "model_counts": {"dna": 50}}  # fmt: skip


SIZES = dict(n_train_per_category=4, n_probe_extra_harmful=5, n_eval_per_category=2, n_eval_unseen_harmful=3,
             n_eval_overrefusal=8, overrefusal_calibration_fraction=0.5, probe_validation_fraction=0.25)


@pytest.fixture
def synthetic(monkeypatch):
    monkeypatch.setattr(run_data_module, "_load_sources", lambda data, category_set, seed: synthetic_sources())


def test_sets_are_disjoint_and_sized_as_asked(synthetic) -> None:
    data = assemble_run_data("offline", DONOTANSWER_CATEGORIES, seed=0, **SIZES)
    sides = {"fit": data.fit_records, "validation": data.validation_records, "evaluation": data.eval_records}
    texts = {name: {normalize_text(r.prompt) for r in records} for name, records in sides.items()}
    assert not texts["fit"] & texts["validation"] and not texts["fit"] & texts["evaluation"]
    assert not texts["validation"] & texts["evaluation"]
    # 4 per category + 5 AdvBench; benign: 15 calibration prompts + 20 - 15 look-alikes/plain.
    assert sum(r.label == "harmful" for r in data.train_harmful) == 4 * 5 + 5
    assert data.n_calibration == 15 and len(data.train_benign) == 20
    assert sum(r.source == "rho_overrefusal" for r in data.train_benign) == 15
    assert len(data.eval_harmful) == 2 * 5 + 3 and len(data.eval_benign) == 8
    assert len(data.fit_records) + len(data.validation_records) == len(data.train_harmful) + len(data.train_benign)
    # No calibration prompt is evaluated.
    assert not {r.id for r in data.eval_benign} & {r.id for r in data.train_benign}
    assert data.generalization_model_counts == {"dna": 50}


def test_row_indices_address_the_training_rows(synthetic) -> None:
    data = assemble_run_data("offline", DONOTANSWER_CATEGORIES, seed=0, **SIZES)
    rows = data.train_records
    assert [rows[i] for i in data.fit_rows] == data.fit_records
    assert [rows[i] for i in data.validation_rows] == data.validation_records
    assert data.train_labels.tolist() == [int(r.label == "harmful") for r in rows]
    assert data.eval_records == data.eval_harmful + data.eval_benign
    lines = data.describe().splitlines()
    assert len(lines) == 5 and lines[-1].startswith(f"fit rows {len(data.fit_records)}, validation rows")


def test_assembly_is_seeded(synthetic) -> None:
    first = assemble_run_data("offline", DONOTANSWER_CATEGORIES, seed=3, **SIZES)
    again = assemble_run_data("offline", DONOTANSWER_CATEGORIES, seed=3, **SIZES)
    assert first == again


def test_unknown_data_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown data 'nowhere'"):
        assemble_run_data("nowhere", DONOTANSWER_CATEGORIES, seed=0, **SIZES)
