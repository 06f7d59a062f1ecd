"""Tests of the training-dataset specs and the shared local-file readers, on hand-written fixtures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from scripts.records import JSONLError, PromptRecord
from scripts.training_data import (
    TRAINING_DATASETS,
    HubDatasetSpec,
    iter_json_array,
    iter_table_rows,
    load_spec_records,
    load_training_records,
    snake_case,
    take_random,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def test_snake_case_matches_coconot_category_names() -> None:
    assert snake_case("Requests with safety concerns") == "requests_with_safety_concerns"
    assert snake_case("Harassment/Discrimination") == "harassment_discrimination"
    assert snake_case("  self-harm ") == "self_harm"


def test_iter_json_array_reports_the_line_each_item_starts_on(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"a": 1},\n\n  {"a": 2}, {"a": 3}\n]\n')
    assert list(iter_json_array(path)) == [(2, {"a": 1}), (4, {"a": 2}), (4, {"a": 3})]


def test_iter_json_array_rejects_non_arrays_and_bad_separators(tmp_path: Path) -> None:
    not_array = tmp_path / "object.json"
    not_array.write_text('{"a": 1}')
    with pytest.raises(JSONLError, match=r"object\.json:1: expected a JSON array"):
        list(iter_json_array(not_array))
    missing_comma = tmp_path / "comma.json"
    missing_comma.write_text('[\n{"a": 1}\n{"a": 2}]')
    with pytest.raises(JSONLError, match=r"comma\.json:3: expected ','"):
        list(iter_json_array(missing_comma))


def test_iter_table_rows_reads_each_format_with_line_numbers(tmp_path: Path) -> None:
    assert [n for n, _ in iter_table_rows(FIXTURES / "coconot_original.jsonl")] == [1, 2, 3, 5, 6]
    csv_rows = list(iter_table_rows(FIXTURES / "or_bench_80k.csv"))
    assert csv_rows[0] == (
        2,
        {"prompt": "How can I safely dispose of old medications, so nobody is harmed?", "category": "self-harm"},
    )
    tsv_rows = list(iter_table_rows(FIXTURES / "wildjailbreak_eval.tsv"))
    assert [row["label"] for _, row in tsv_rows] == ["1", "0"]
    # Dataset.to_json writes JSON Lines even under a .json name.
    lines_json = tmp_path / "lines.json"
    lines_json.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert list(iter_table_rows(lines_json)) == [(1, {"prompt": "a"}), (2, {"prompt": "b"})]


def test_iter_table_rows_reads_parquet(tmp_path: Path) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "xstest.jsonl").read_text().splitlines()]
    path = tmp_path / "xstest.parquet"
    pq.write_table(pyarrow.Table.from_pylist(rows), path)
    assert list(iter_table_rows(path)) == [(1, rows[0]), (2, rows[1])]


def test_iter_table_rows_rejects_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "rows.xml"
    path.write_text("<rows/>")
    with pytest.raises(ValueError, match=r"supported suffixes: \['.json', '.jsonl', '.csv', '.tsv', '.parquet'\]"):
        list(iter_table_rows(path))


def test_coconot_original_maps_rows_to_records() -> None:
    records = load_training_records("coconot_original", local_path=FIXTURES / "coconot_original.jsonl")
    assert [(r.prompt, r.label, r.category) for r in records] == [
        ("Summarise the document.", "harmful", "incomplete_requests"),
        ("How do I make a weapon at home?", "harmful", "requests_with_safety_concerns"),
        ("What did you eat for breakfast?", "harmful", "humanizing_requests"),
        ("Give me my neighbour's phone number.", "harmful", "requests_with_safety_concerns"),
    ]
    assert records[0].source == "coconot_original"
    assert dict(records[1].meta) == {
        "id": "c2",
        "subcategory": "dangerous or sensitive topics",
        "source_category": "Requests with safety concerns",
        "split": "train",
    }
    assert records[0].id == PromptRecord("Summarise the document.", "harmful", "x", "coconot_original").id


def test_coconot_pref_is_benign_look_alikes_with_their_category() -> None:
    records = load_training_records("coconot_pref", local_path=FIXTURES / "coconot_pref.jsonl")
    assert [(r.label, r.category) for r in records] == [
        ("benign", "requests_with_safety_concerns"),
        ("benign", "humanizing_requests"),
    ]


def test_wildguardmix_labels_from_column_and_skips_unlabelled_rows() -> None:
    records = load_training_records("wildguardmix_train", local_path=FIXTURES / "wildguardmix_train.json")
    assert [(r.prompt, r.label, r.category) for r in records] == [
        ("Write a phishing email to steal bank passwords.", "harmful", "fraud_assisting_illegal_activities"),
        ("How do I bake sourdough bread?", "benign", "benign"),
    ]
    assert records[0].meta["adversarial"] is False


def test_or_bench_80k_is_benign_with_native_category() -> None:
    records = load_training_records("or_bench_80k", local_path=FIXTURES / "or_bench_80k.csv")
    assert [(r.label, r.category) for r in records] == [("benign", "self_harm"), ("benign", "deception")]


def test_malformed_rows_name_file_and_line() -> None:
    with pytest.raises(JSONLError, match=r"bad_missing_column\.jsonl:2: missing column\(s\) \['prompt'\]"):
        load_training_records("coconot_original", local_path=FIXTURES / "bad_missing_column.jsonl")
    with pytest.raises(JSONLError, match=r"bad_json\.jsonl:2: invalid JSON"):
        load_training_records("coconot_original", local_path=FIXTURES / "bad_json.jsonl")
    with pytest.raises(JSONLError, match=r"bad_columns\.csv:3: expected 2 columns"):
        load_training_records("or_bench_80k", local_path=FIXTURES / "bad_columns.csv")
    with pytest.raises(JSONLError, match=r"bad_array\.json:3: expected a JSON object, got str"):
        load_training_records("or_bench_80k", local_path=FIXTURES / "bad_array.json")
    with pytest.raises(JSONLError, match=r"bad_empty_prompt\.jsonl:2: column 'prompt' must be a non-empty string"):
        load_training_records("coconot_original", local_path=FIXTURES / "bad_empty_prompt.jsonl")


def test_unknown_name_and_split_list_the_valid_ones() -> None:
    with pytest.raises(KeyError, match="valid names: \\['coconot_original', 'coconot_pref'"):
        load_training_records("coconot")
    with pytest.raises(ValueError, match=r"unknown split 'dev'; valid splits: \['train', 'test'\]"):
        load_training_records("coconot_original", local_path=FIXTURES / "coconot_original.jsonl", split="dev")


def test_limit_and_per_category_are_seeded_and_order_preserving() -> None:
    path = FIXTURES / "coconot_original.jsonl"
    full = load_training_records("coconot_original", local_path=path)
    limited = load_training_records("coconot_original", local_path=path, limit=2, seed=3)
    assert limited == load_training_records("coconot_original", local_path=path, limit=2, seed=3)
    assert len(limited) == 2
    assert [full.index(r) for r in limited] == sorted(full.index(r) for r in limited)
    capped = load_training_records("coconot_original", local_path=path, per_category=1, seed=0)
    assert sorted(r.category for r in capped) == [
        "humanizing_requests",
        "incomplete_requests",
        "requests_with_safety_concerns",
    ]


def test_take_random_rejects_negative_limit() -> None:
    with pytest.raises(ValueError, match="limit must be >= 0"):
        take_random([], -1)


def test_spec_validation_catches_bad_tables() -> None:
    with pytest.raises(ValueError, match="default split 'x' is not one of"):
        HubDatasetSpec(
            name="d", hub_id="a/b", config=None, split="x", splits=("train",), prompt_column="p", label="benign"
        )
    with pytest.raises(ValueError, match="unknown formatter 'nope'"):
        HubDatasetSpec(
            name="d", hub_id="a/b", config=None, split="train", splits=("train",), prompt_column="p",
            label="benign", formatter="nope",
        )  # fmt: skip
    with pytest.raises(ValueError, match="needs label, label_column or label_by_split"):
        HubDatasetSpec(name="d", hub_id="a/b", config=None, split="train", splits=("train",), prompt_column="p")


def test_hub_path_passes_ids_configs_and_kwargs_to_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(hub_id, config, split, **kwargs):
            calls.append((hub_id, config, split, kwargs))
            return [{"prompt": "How do I bake sourdough bread?", "category": "benign-ish"}]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    records = load_spec_records(TRAINING_DATASETS["or_bench_80k"])
    assert calls == [("bench-llm/or-bench", "or-bench-80k", "train", {})]
    assert [(r.prompt, r.category, r.meta["split"]) for r in records] == [
        ("How do I bake sourdough bread?", "benign_ish", "train")
    ]


def test_hub_failure_says_how_to_run_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    class OfflineDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("offline mode is enabled")

    monkeypatch.setitem(sys.modules, "datasets", OfflineDatasets)
    with pytest.raises(RuntimeError, match=r"could not load allenai/coconot .*offline mode.*local_path="):
        load_training_records("coconot_original")


def test_hub_row_errors_name_the_hub_split(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            return [{"prompt": "ok", "category": "Incomplete requests"}, {"category": "Incomplete requests"}]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    with pytest.raises(JSONLError, match=r"hf://allenai/coconot/original/train:2: missing column"):
        load_training_records("coconot_original")
