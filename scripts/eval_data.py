"""Evaluation benchmarks on the Hugging Face Hub, and the registry of every Hub dataset by name.

The specs are data (:class:`~scripts.training_data.HubDatasetSpec`): Hub id, config, split and the
column mapping. Safety benchmarks are marked evaluation-only so that no split helper lets them into
training. ``load_dataset_records(name, ...)`` loads any registered dataset, training or evaluation,
from the Hub or from a local file shaped like it.
"""

from __future__ import annotations

import os

from scripts.records import PromptRecord
from scripts.training_data import TRAINING_DATASETS, HubDatasetSpec, load_spec_records

EVAL_DATASETS: dict[str, HubDatasetSpec] = {
    spec.name: spec
    for spec in (
        HubDatasetSpec(
            name="coconot_contrast",
            hub_id="allenai/coconot",
            config="contrast",
            split="test",
            splits=("test",),
            prompt_column="prompt",
            label="benign",
            category_column="category",
            meta_columns=("id", "subcategory"),
            eval_only=True,
            licence="ODC-BY",
        ),
        HubDatasetSpec(
            name="wildguardmix_test",
            hub_id="allenai/wildguardmix",
            config="wildguardtest",
            split="test",
            splits=("test",),
            prompt_column="prompt",
            label_column="prompt_harm_label",
            label_values={"harmful": "harmful", "unharmful": "benign"},
            category_column="subcategory",
            meta_columns=("adversarial", "subcategory"),
            eval_only=True,
            licence="ODC-BY",
        ),
        HubDatasetSpec(
            name="or_bench_hard_1k",
            hub_id="bench-llm/or-bench",
            config="or-bench-hard-1k",
            split="train",
            splits=("train",),
            prompt_column="prompt",
            label="benign",
            category_column="category",
            eval_only=True,
            licence="CC-BY-4.0",
        ),
        HubDatasetSpec(
            name="or_bench_toxic",
            hub_id="bench-llm/or-bench",
            config="or-bench-toxic",
            split="train",
            splits=("train",),
            prompt_column="prompt",
            label="harmful",
            category_column="category",
            eval_only=True,
            licence="CC-BY-4.0",
        ),
        HubDatasetSpec(
            name="wildjailbreak_eval",
            hub_id="allenai/wildjailbreak",
            config="eval",
            split="train",
            splits=("train",),
            prompt_column="adversarial",
            label_column="label",
            label_values={"1": "harmful", "0": "benign"},
            meta_columns=("data_type",),
            # The Hub files are tab-separated with literal "None"-like strings that must stay text.
            load_kwargs={"delimiter": "\t", "keep_default_na": False},
            eval_only=True,
            licence="ODC-BY",
        ),
        HubDatasetSpec(
            name="xstest",
            hub_id="walledai/XSTest",
            config=None,
            split="test",
            splits=("test",),
            prompt_column="prompt",
            label_column="label",
            label_values={"unsafe": "harmful", "safe": "benign"},
            category_column="type",
            meta_columns=("focus", "type", "note"),
            eval_only=True,
            licence="CC-BY-4.0",
        ),
        HubDatasetSpec(
            name="harmbench",
            hub_id="walledai/HarmBench",
            config="standard",
            split="train",
            splits=("train",),
            prompt_column="prompt",
            label="harmful",
            category_column="category",
            eval_only=True,
            licence="MIT",
        ),
        HubDatasetSpec(
            name="jailbreakbench",
            hub_id="JailbreakBench/JBB-Behaviors",
            config="behaviors",
            split="harmful",
            splits=("harmful", "benign"),
            prompt_column="Goal",
            label_by_split={"harmful": "harmful", "benign": "benign"},
            category_column="Category",
            meta_columns=("Behavior", "Source"),
            eval_only=True,
            licence="MIT",
        ),
        HubDatasetSpec(
            name="truthfulqa",
            hub_id="truthfulqa/truthful_qa",
            config="generation",
            split="validation",
            splits=("validation",),
            prompt_column="question",
            label="benign",
            meta_columns=("category", "type"),
            licence="Apache-2.0",
        ),
        HubDatasetSpec(
            name="gsm8k",
            hub_id="openai/gsm8k",
            config="main",
            split="test",
            splits=("train", "test"),
            prompt_column="question",
            label="benign",
            licence="MIT",
        ),
        HubDatasetSpec(
            name="mmlu",
            hub_id="cais/mmlu",
            config="all",
            split="test",
            splits=("test", "validation", "dev", "auxiliary_train"),
            prompt_column="question",
            label="benign",
            formatter="mmlu_choices",
            meta_columns=("subject", "answer"),
            licence="MIT",
        ),
    )
}
"""Evaluation benchmarks: over-refusal (COCONot contrast, OR-Bench-Hard-1K, XSTest safe), harmful
refusal (HarmBench, JailbreakBench, OR-Bench-Toxic, WildGuardTest, WildJailbreak) and benign utility
(TruthfulQA, GSM8K, MMLU, whose categories are plain ``"benign"``)."""

ALL_DATASETS: dict[str, HubDatasetSpec] = {**TRAINING_DATASETS, **EVAL_DATASETS}


def dataset_names() -> list[str]:
    """Every registered dataset name, sorted."""
    return sorted(ALL_DATASETS)


def load_dataset_records(
    name: str,
    local_path: str | os.PathLike[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    per_category: int | None = None,
    seed: int = 0,
) -> list[PromptRecord]:
    """Load any registered dataset (training or evaluation) as records.

    Args:
        name: Registry name, e.g. ``"xstest"`` or ``"coconot_original"``.
        local_path: Local file shaped like the Hub split (JSON, JSONL, CSV, TSV or parquet).
        split: Split name (default: the dataset's default split).
        limit: Seeded random subset size.
        per_category: Seeded cap per (label, category).
        seed: Seed for the subsets.

    Raises:
        KeyError: unknown name; the message lists the valid names.
    """
    if name not in ALL_DATASETS:
        raise KeyError(f"unknown dataset {name!r}; valid names: {dataset_names()}")
    return load_spec_records(ALL_DATASETS[name], local_path, split, limit, per_category, seed)
