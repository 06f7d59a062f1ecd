"""Hub datasets used for training (refusal-token fine-tuning, steering vectors, probes), mapped to records.

Each dataset is described by a :class:`HubDatasetSpec` — Hub id, config, split and a column mapping —
so adding or fixing a dataset is a change of data, not of code. :func:`load_spec_records` reads
either the Hub (through ``datasets``, which honours ``HF_HUB_OFFLINE`` itself) or a local file shaped
like the Hub dataset (JSON, JSONL, CSV, TSV or parquet), which is how tests and offline users run it.

This module also holds the small readers of local table files that the other data modules share.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from scripts.data_splits import SPLIT_ROLE_EVAL_ONLY, SPLIT_ROLE_KEY, subsample_per_category
from scripts.records import JSONLError, PromptRecord, iter_numbered_jsonl

logger = logging.getLogger(__name__)

BENIGN_CATEGORY = "benign"
TABLE_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".csv", ".tsv", ".parquet")


def snake_case(value: str) -> str:
    """A category label as a snake_case name (``"Requests with safety concerns"`` → ``requests_with_safety_concerns``).

    >>> snake_case("Harassment/Discrimination")
    'harassment_discrimination'
    """
    return re.sub(r"[^0-9a-z]+", "_", str(value).strip().lower()).strip("_")


# ---------------------------------------------------------------------------------------------------
# Local table files
# ---------------------------------------------------------------------------------------------------


def iter_json_array(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, item)`` for each element of a JSON array file.

    Line numbers are those where each element starts, so an error about an item can name its line.

    Raises:
        JSONLError: the file is not a JSON array or an element is not valid JSON.
    """
    text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if position >= len(text) or text[position] != "[":
        raise JSONLError(path, _line_of(text, position), "expected a JSON array")
    position = _skip_space(text, position + 1)
    if position < len(text) and text[position] == "]":
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise JSONLError(path, error.lineno, f"invalid JSON ({error.msg})") from error
        yield _line_of(text, position), item
        position = _skip_space(text, end)
        if position < len(text) and text[position] == ",":
            position = _skip_space(text, position + 1)
            continue
        if position < len(text) and text[position] == "]":
            return
        raise JSONLError(path, _line_of(text, position), "expected ',' or ']' between array elements")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def iter_table_rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_or_row_number, row)`` from a local dataset file.

    Supported: ``.jsonl``; ``.json`` (a JSON array of objects, or JSON Lines as ``Dataset.to_json``
    writes them); ``.csv`` and ``.tsv`` (header row; the number is the file line where the row ends);
    ``.parquet`` (the number is the 1-based row index).

    Raises:
        JSONLError: a malformed line or an element that is not an object, naming file and line.
        ValueError: an unsupported suffix (the message lists the supported ones).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not _starts_with_bracket(path)):
        yield from iter_numbered_jsonl(path)
    elif suffix == ".json":
        for line_number, item in iter_json_array(path):
            if not isinstance(item, dict):
                raise JSONLError(path, line_number, f"expected a JSON object, got {type(item).__name__}")
            yield line_number, item
    elif suffix in (".csv", ".tsv"):
        yield from _iter_delimited(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # optional heavy dependency, only for parquet files

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
    else:
        raise ValueError(f"unsupported dataset file {str(path)!r}; supported suffixes: {list(TABLE_SUFFIXES)}")


def _starts_with_bracket(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                return line.lstrip().startswith("[")
    return False


def _iter_delimited(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                raise JSONLError(path, reader.line_num, f"expected {len(header)} columns {header}, got {len(cells)}")
            yield reader.line_num, dict(zip(header, cells, strict=True))


# ---------------------------------------------------------------------------------------------------
# Dataset specs
# ---------------------------------------------------------------------------------------------------


def _format_mmlu_choices(row: Mapping[str, Any], prompt: str) -> str:
    choices = row.get("choices")
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ValueError(f"column 'choices' must be a non-empty list, got {choices!r}")
    letters = "ABCDEFGHIJ"
    lines = [f"{letters[index]}. {choice}" for index, choice in enumerate(choices)]
    return prompt.rstrip() + "\n" + "\n".join(lines)


PROMPT_FORMATTERS: dict[str, Callable[[Mapping[str, Any], str], str]] = {
    "mmlu_choices": _format_mmlu_choices,
}
"""Named ways to build the prompt from a row when the prompt column alone is not the whole question."""


@dataclass(frozen=True)
class HubDatasetSpec:
    """Where a dataset lives on the Hub and how its rows map to :class:`PromptRecord` fields.

    The label of a row comes from, in order: ``label_by_split[split]``; ``label_column`` looked up in
    ``label_values`` (values compared as lower-case strings; rows with an unmapped value are skipped);
    else the fixed ``label``. The category is ``snake_case`` of ``category_column`` when that is set
    and non-empty, else ``"benign"`` for benign rows and the dataset ``name`` for harmful rows.

    Attributes:
        name: Registry name (also the records' ``source``).
        hub_id: Hub dataset id.
        config: Hub config name, or ``None`` for the default config.
        split: Default split.
        splits: The splits the dataset has (for error messages and validation).
        prompt_column: Column holding the user prompt.
        label: Fixed label when no other rule applies.
        label_column: Column whose values map to labels through ``label_values``.
        label_values: Raw value (lower-case string) → ``"harmful"`` / ``"benign"``.
        label_by_split: Split name → label, for datasets whose splits are the labels.
        category_column: Column holding the dataset's own category.
        meta_columns: Further columns kept in ``meta``.
        formatter: Name in :data:`PROMPT_FORMATTERS` to build the prompt from the row.
        load_kwargs: Extra keyword arguments for ``datasets.load_dataset``.
        eval_only: Mark records as evaluation-only (never used for training).
        licence: Licence stated by the dataset card.
    """

    name: str
    hub_id: str
    config: str | None
    split: str
    splits: tuple[str, ...]
    prompt_column: str
    label: str | None = None
    label_column: str | None = None
    label_values: Mapping[str, str] = field(default_factory=dict)
    label_by_split: Mapping[str, str] = field(default_factory=dict)
    category_column: str | None = None
    meta_columns: tuple[str, ...] = ()
    formatter: str | None = None
    load_kwargs: Mapping[str, Any] = field(default_factory=dict)
    eval_only: bool = False
    licence: str = ""

    def __post_init__(self) -> None:
        if self.split not in self.splits:
            raise ValueError(f"{self.name}: default split {self.split!r} is not one of {list(self.splits)}")
        if self.formatter is not None and self.formatter not in PROMPT_FORMATTERS:
            raise ValueError(f"{self.name}: unknown formatter {self.formatter!r}; known: {sorted(PROMPT_FORMATTERS)}")
        if self.label is None and self.label_column is None and not self.label_by_split:
            raise ValueError(f"{self.name}: needs label, label_column or label_by_split")

    def required_columns(self) -> list[str]:
        """Columns every row must have."""
        columns = [self.prompt_column]
        if self.label_column:
            columns.append(self.label_column)
        return columns


TRAINING_DATASETS: dict[str, HubDatasetSpec] = {
    spec.name: spec
    for spec in (
        HubDatasetSpec(
            name="coconot_original",
            hub_id="allenai/coconot",
            config="original",
            split="train",
            splits=("train", "test"),
            prompt_column="prompt",
            label="harmful",
            category_column="category",
            meta_columns=("id", "subcategory"),
            licence="ODC-BY",
        ),
        HubDatasetSpec(
            name="coconot_pref",
            hub_id="allenai/coconot",
            config="pref",
            split="train",
            splits=("train",),
            prompt_column="prompt",
            label="benign",
            category_column="category",
            meta_columns=("id", "subcategory"),
            licence="ODC-BY",
        ),
        HubDatasetSpec(
            name="wildguardmix_train",
            hub_id="allenai/wildguardmix",
            config="wildguardtrain",
            split="train",
            splits=("train",),
            prompt_column="prompt",
            label_column="prompt_harm_label",
            label_values={"harmful": "harmful", "unharmful": "benign"},
            category_column="subcategory",
            meta_columns=("adversarial", "subcategory"),
            licence="ODC-BY",
        ),
        HubDatasetSpec(
            name="or_bench_80k",
            hub_id="bench-llm/or-bench",
            config="or-bench-80k",
            split="train",
            splits=("train",),
            prompt_column="prompt",
            label="benign",
            category_column="category",
            licence="CC-BY-4.0",
        ),
    )
}
"""Training sources: COCONot original (non-compliance prompts, harmful) and its contrastive ``pref``
prompts (benign look-alikes), WildGuardTrain, and OR-Bench-80K (seemingly-toxic benign prompts)."""


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def load_spec_records(
    spec: HubDatasetSpec,
    local_path: str | os.PathLike[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    per_category: int | None = None,
    seed: int = 0,
) -> list[PromptRecord]:
    """Load one dataset as records, from ``local_path`` when given, else from the Hub.

    Args:
        spec: The dataset description.
        local_path: A local JSON/JSONL/CSV/TSV/parquet file shaped like the Hub split.
        split: Split to load (default ``spec.split``); for local files it only selects the label
            where the split is the label (``label_by_split``).
        limit: Keep a seeded random subset of at most this many records (in file order).
        per_category: Keep at most this many records per (label, category), seeded.
        seed: Seed for the subsets.

    Raises:
        ValueError: unknown split (lists the valid ones), or a malformed row — :class:`JSONLError`,
            naming the file and line (``hf://id/config/split:row`` for Hub rows).
    """
    split = split or spec.split
    if split not in spec.splits:
        raise ValueError(f"{spec.name}: unknown split {split!r}; valid splits: {list(spec.splits)}")
    if local_path is not None:
        origin: str | os.PathLike[str] = local_path
        rows: Iterable[tuple[int, Mapping[str, Any]]] = iter_table_rows(local_path)
    else:
        origin = f"hf://{spec.hub_id}/{spec.config or 'default'}/{split}"
        rows = _iter_hub_rows(spec, split)
    records = map_rows(spec, rows, split=split, origin=origin)
    if per_category is not None:
        records = subsample_per_category(records, per_category, seed=seed)
    if limit is not None:
        records = take_random(records, limit, seed=seed)
    logger.info("%s/%s: %d records", spec.name, split, len(records))
    return records


def _iter_hub_rows(spec: HubDatasetSpec, split: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    import datasets  # heavy optional client, only for the Hub path

    try:
        dataset = datasets.load_dataset(spec.hub_id, spec.config, split=split, **dict(spec.load_kwargs))
    except Exception as error:  # the Hub client raises many types (offline, gated, missing)
        raise RuntimeError(
            f"could not load {spec.hub_id} (config {spec.config!r}, split {split!r}) from the Hub: {error}; "
            "pass local_path= to read a local copy"
        ) from error
    yield from enumerate(dataset, start=1)


def map_rows(
    spec: HubDatasetSpec,
    rows: Iterable[tuple[int, Mapping[str, Any]]],
    split: str,
    origin: str | os.PathLike[str],
) -> list[PromptRecord]:
    """Map numbered rows to records with the spec's column mapping; exact duplicate prompts are dropped.

    Raises:
        JSONLError: a row lacks a required column, has an empty prompt, or cannot be formatted;
            the error names ``origin`` and the row's line.
    """
    records: list[PromptRecord] = []
    seen: set[str] = set()
    skipped_label = duplicates = 0
    for line_number, row in rows:
        missing = [column for column in spec.required_columns() if column not in row]
        if missing:
            raise JSONLError(origin, line_number, f"missing column(s) {missing}; row has {sorted(row)}")
        label = _row_label(spec, row, split)
        if label is None:
            skipped_label += 1
            continue
        prompt = row[spec.prompt_column]
        if not isinstance(prompt, str) or not prompt.strip():
            raise JSONLError(origin, line_number, f"column {spec.prompt_column!r} must be a non-empty string")
        if spec.formatter is not None:
            try:
                prompt = PROMPT_FORMATTERS[spec.formatter](row, prompt)
            except ValueError as error:
                raise JSONLError(origin, line_number, str(error)) from error
        if prompt in seen:
            duplicates += 1
            continue
        seen.add(prompt)
        meta: dict[str, Any] = {column: row[column] for column in spec.meta_columns if column in row}
        if spec.category_column and row.get(spec.category_column) not in (None, ""):
            meta["source_category"] = row[spec.category_column]
            category = snake_case(row[spec.category_column])
        else:
            category = BENIGN_CATEGORY if label == "benign" else spec.name
        meta["split"] = split
        if spec.eval_only:
            meta[SPLIT_ROLE_KEY] = SPLIT_ROLE_EVAL_ONLY
        records.append(PromptRecord(prompt=prompt, label=label, category=category, source=spec.name, meta=meta))
    if skipped_label:
        logger.info("%s: skipped %d rows without a usable label", spec.name, skipped_label)
    if duplicates:
        logger.info("%s: dropped %d duplicate prompts", spec.name, duplicates)
    return records


def _row_label(spec: HubDatasetSpec, row: Mapping[str, Any], split: str) -> str | None:
    if split in spec.label_by_split:
        return spec.label_by_split[split]
    if spec.label_column is not None:
        raw = row.get(spec.label_column)
        return spec.label_values.get(str(raw).strip().lower()) if raw is not None else None
    return spec.label


def take_random(records: Sequence[PromptRecord], limit: int, seed: int = 0) -> list[PromptRecord]:
    """A seeded random subset of at most ``limit`` records, kept in their original order."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit >= len(records):
        return list(records)
    chosen = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[index] for index in chosen]


def load_training_records(
    name: str,
    local_path: str | os.PathLike[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    per_category: int | None = None,
    seed: int = 0,
) -> list[PromptRecord]:
    """Load a training dataset by registry name (see :data:`TRAINING_DATASETS`).

    Raises:
        KeyError: unknown name; the message lists the valid names.
    """
    if name not in TRAINING_DATASETS:
        raise KeyError(f"unknown training dataset {name!r}; valid names: {sorted(TRAINING_DATASETS)}")
    return load_spec_records(TRAINING_DATASETS[name], local_path, split, limit, per_category, seed)
