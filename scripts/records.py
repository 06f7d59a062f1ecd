"""The one record schema every data source is mapped to, and strict JSONL input/output.

Every prompt the library handles is a :class:`PromptRecord` (``prompt``, ``label``, ``category``,
``source``, plus a stable ``id``). Results files are JSONL whose rows carry the same ``id`` so that
resuming, judge caching and joins work by id.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

Label = Literal["harmful", "benign"]
LABELS: tuple[str, ...] = ("harmful", "benign")


class JSONLError(ValueError):
    """A JSONL file has a line that is not valid JSON or lacks a required field; names file and line."""

    def __init__(self, path: str | os.PathLike[str], line_number: int, reason: str) -> None:
        self.path = str(path)
        self.line_number = line_number
        self.reason = reason
        super().__init__(f"{self.path}:{line_number}: {reason}")


def stable_id(prompt: str, source: str) -> str:
    """Identifier of a prompt that is stable across reruns: a hash of its source and text.

    >>> stable_id("hi", "src") == stable_id("hi", "src")
    True
    """
    digest = hashlib.sha256(f"{source}\n{prompt}".encode("utf-8")).hexdigest()
    return digest[:16]


@dataclass(frozen=True)
class PromptRecord:
    """One labelled prompt.

    Attributes:
        prompt: The user turn, without any chat template.
        label: ``"harmful"`` (should be refused) or ``"benign"`` (should be answered).
        category: Refusal category name for harmful prompts; for benign prompts the category whose
            look-alike it is, or ``"benign"`` for plain benign prompts.
        source: Dataset or file the prompt came from (e.g. ``"donotanswer"``).
        id: Stable identifier (:func:`stable_id` of prompt and source) unless given.
        meta: Any further fields of the source row worth keeping.
    """

    prompt: str
    label: Label
    category: str
    source: str
    id: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {self.prompt!r}")
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")
        if not self.category:
            raise ValueError("category must be a non-empty string")
        if not self.id:
            object.__setattr__(self, "id", stable_id(self.prompt, self.source))

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-serialisable dict (``meta`` kept as a nested dict)."""
        row = asdict(self)
        row["meta"] = dict(self.meta)
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "PromptRecord":
        """Build a record from a dict with at least ``prompt``, ``label``, ``category``, ``source``."""
        missing = [key for key in ("prompt", "label", "category", "source") if key not in row]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        return cls(
            prompt=row["prompt"],
            label=row["label"],
            category=row["category"],
            source=row["source"],
            id=row.get("id", ""),
            meta=dict(row.get("meta", {})),
        )


def iter_numbered_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file (lines count from 1).

    Raises:
        JSONLError: a line is not valid JSON or not a JSON object; the error names file and line.
    """
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise JSONLError(path, line_number, f"invalid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise JSONLError(path, line_number, f"expected a JSON object, got {type(row).__name__}")
            yield line_number, row


def read_jsonl(path: str | os.PathLike[str], required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Read a whole JSONL file, checking that each row has the ``required`` fields.

    Raises:
        JSONLError: naming the file and line of the first malformed row.
    """
    required = tuple(required)
    rows = []
    for line_number, row in iter_numbered_jsonl(path):
        missing = [key for key in required if key not in row]
        if missing:
            raise JSONLError(path, line_number, f"missing field(s) {missing}")
        rows.append(row)
    return rows


def read_records(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """Read :class:`PromptRecord` rows from JSONL; a bad row raises :class:`JSONLError` with its line."""
    records = []
    for line_number, row in iter_numbered_jsonl(path):
        try:
            records.append(PromptRecord.from_dict(row))
        except (ValueError, TypeError) as error:
            raise JSONLError(path, line_number, str(error)) from error
    return records


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows to a JSONL file atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows to a JSONL file and flush them to disk, so a killed run loses nothing written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_records(path: str | os.PathLike[str], records: Iterable[PromptRecord]) -> None:
    """Write records as JSONL (atomically)."""
    write_jsonl(path, (record.to_dict() for record in records))
