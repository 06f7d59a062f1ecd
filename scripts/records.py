"""The one record schema every data source is mapped to, and JSONL input/output.

Every prompt the library handles is a :class:`PromptRecord` (``prompt``, ``label``, ``category``,
``source``, plus a stable ``id`` and a ``meta`` dict of any further fields). A JSONL file of records
needs only ``prompt`` on each line; the other fields have defaults (:meth:`PromptRecord.from_dict`),
and a malformed line raises an error naming the file and line. Results files are JSONL whose rows carry
the same ``id`` so that resuming, judge caching and joins work by id.
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
DEFAULT_LABEL: Label = "benign"
"""Label of a row that has none (:meth:`PromptRecord.from_dict`)."""
SCHEMA_FIELDS: tuple[str, ...] = ("prompt", "label", "category", "source", "id", "meta")
"""The fields of :class:`PromptRecord`; any other field of a row is kept in ``meta``."""


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
    def from_dict(
        cls, row: Mapping[str, Any], default_source: str = "", default_label: Label = DEFAULT_LABEL
    ) -> "PromptRecord":
        """Build a record from a dict that has at least ``prompt``.

        Missing (or null) optional fields take these defaults:

        * ``label``: ``default_label`` (``"benign"`` unless given: a prompt nobody labelled is one to answer);
        * ``source``: ``default_source`` (:func:`read_records` passes the file's name without extension);
        * ``category``: ``"benign"`` for a benign prompt; for a harmful one its source, as for the
          corpus's uncategorised harmful sources (steering vectors skip categories they do not know);
        * ``id``: :func:`stable_id` of prompt and source.

        Fields outside the schema are kept in ``meta`` (next to the row's own ``meta`` dict, if any), so
        :meth:`to_dict` writes them back.

        Raises:
            ValueError: ``prompt`` is missing, a field is invalid, ``meta`` is not an object, or an extra
                field is also a key of ``meta``.
        """
        if "prompt" not in row:
            raise ValueError(f"missing field 'prompt' (fields: {sorted(row)})")
        meta = row.get("meta")
        if meta is None:
            meta = {}
        if not isinstance(meta, Mapping):
            raise ValueError(f"meta must be a JSON object, got {type(meta).__name__}")
        extra = {key: value for key, value in row.items() if key not in SCHEMA_FIELDS}
        clashing = sorted(set(extra) & set(meta))
        if clashing:
            raise ValueError(f"field(s) {clashing} given both at top level and in meta")
        label = row.get("label")
        label = default_label if label is None else label
        source = row.get("source")
        source = default_source if source is None else source
        category = row.get("category")
        if category is None:
            category = "benign" if label == "benign" else source
        return cls(
            prompt=row["prompt"],
            label=label,
            category=category,
            source=source,
            id=row.get("id") or "",
            meta={**meta, **extra},
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


def read_records(
    path: str | os.PathLike[str], source: str | None = None, label: Label = DEFAULT_LABEL
) -> list[PromptRecord]:
    """Read :class:`PromptRecord` rows from JSONL; only ``prompt`` is required.

    Args:
        path: A JSONL file of objects, e.g. ``{"prompt": ..., "label": "harmful"}``.
        source: Source of rows that name none; default the file's name without extension.
        label: Label of rows that have none.

    Other defaults and the handling of extra fields are those of :meth:`PromptRecord.from_dict`.

    Raises:
        JSONLError: a row is not valid JSON or not a valid record; the message names file and line.
    """
    default_source = Path(path).stem if source is None else source
    records = []
    for line_number, row in iter_numbered_jsonl(path):
        try:
            records.append(PromptRecord.from_dict(row, default_source=default_source, default_label=label))
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
