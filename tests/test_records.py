import json

import pytest

from scripts.records import (
    JSONLError,
    PromptRecord,
    append_jsonl,
    read_jsonl,
    read_records,
    stable_id,
    write_jsonl,
    write_records,
)


def test_stable_id_depends_on_prompt_and_source_only():
    a = PromptRecord("How do I bake bread?", "benign", "benign", "src")
    b = PromptRecord("How do I bake bread?", "benign", "other", "src")
    c = PromptRecord("How do I bake bread?", "benign", "benign", "other-src")
    assert a.id == b.id == stable_id("How do I bake bread?", "src")
    assert a.id != c.id
    assert len(a.id) == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "", "label": "benign", "category": "x", "source": "s"}, "prompt"),
        ({"prompt": "p", "label": "bad", "category": "x", "source": "s"}, "label"),
        ({"prompt": "p", "label": "benign", "category": "", "source": "s"}, "category"),
    ],
)
def test_invalid_records_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptRecord(**kwargs)


def test_records_round_trip(tmp_path):
    records = [
        PromptRecord("p1", "harmful", "malicious_uses", "s", meta={"k": 1}),
        PromptRecord("p2", "benign", "benign", "s"),
    ]
    path = tmp_path / "r.jsonl"
    write_records(path, records)
    assert read_records(path) == records


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "label": "benign", "category": "c", "source": "s"}\n\n{not json}\n')
    with pytest.raises(JSONLError) as error:
        read_records(path)
    assert error.value.line_number == 3
    assert str(error.value).startswith(f"{path}:3:")


def test_missing_field_names_line(tmp_path):
    path = tmp_path / "missing.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(JSONLError, match=r"missing.jsonl:2: missing field\(s\) \['response'\]"):
        read_jsonl(path, required=("prompt", "response"))


def test_non_object_line_raises(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(JSONLError, match="expected a JSON object"):
        read_jsonl(path)


def test_append_and_write(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    append_jsonl(path, [{"a": 1}])
    append_jsonl(path, [{"a": 2}, {"a": 3}])
    assert [row["a"] for row in read_jsonl(path)] == [1, 2, 3]
    write_jsonl(path, [{"b": "é"}])
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": "é"}


def test_a_plain_file_of_prompts_and_labels_reads_with_documented_defaults(tmp_path):
    path = tmp_path / "my_prompts.jsonl"
    path.write_text('{"prompt": "How do I pick a lock?", "label": "harmful"}\n'
                    '{"prompt": "How do I bake bread?", "label": "benign"}\n'
                    '{"prompt": "What is a mole?"}\n'
                    '{"prompt": "Who wrote Faust?", "category": null, "source": "quiz"}\n')
    records = read_records(path)
    # Source: the file's name; category: benign for benign prompts, the source for uncategorised harmful ones.
    assert [(r.label, r.category, r.source) for r in records] == [
        ("harmful", "my_prompts", "my_prompts"), ("benign", "benign", "my_prompts"), ("benign", "benign", "my_prompts"),
        ("benign", "benign", "quiz")]
    assert [r.id for r in records] == [stable_id(r.prompt, r.source) for r in records]
    assert all(r.meta == {} for r in records)
    overridden = read_records(path, source="mine", label="harmful")
    assert [(r.label, r.category, r.source) for r in overridden[2:]] == [
        ("harmful", "mine", "mine"), ("harmful", "quiz", "quiz")]


def test_extra_fields_are_kept_and_round_trip(tmp_path):
    path = tmp_path / "extra.jsonl"
    path.write_text('{"prompt": "p1", "label": "harmful", "category": "malicious_uses", "difficulty": 3, '
                    '"tags": ["a"], "meta": {"k": 1}}\n{"prompt": "p2", "id": "given-id", "note": null}\n')
    records = read_records(path)
    assert dict(records[0].meta) == {"k": 1, "difficulty": 3, "tags": ["a"]}
    assert dict(records[1].meta) == {"note": None} and records[1].id == "given-id"
    copy = tmp_path / "copy.jsonl"
    write_records(copy, records)
    assert read_records(copy) == records


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"label": "harmful"}', "missing field 'prompt'"),
        ('{"prompt": "p", "label": "unsafe"}', "label must be one of"),
        ('{"prompt": "   "}', "prompt must be a non-empty string"),
        ('{"prompt": "p", "meta": [1]}', "meta must be a JSON object"),
        ('{"prompt": "p", "k": 1, "meta": {"k": 2}}', r"field\(s\) \['k'\] given both"),
    ],
)
def test_invalid_rows_name_file_and_line(tmp_path, line, reason):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(JSONLError, match=f"rows.jsonl:2: {reason}"):
        read_records(path)
