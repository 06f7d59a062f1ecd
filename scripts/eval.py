"""Generate under a steering condition over a prompt set and write one JSONL row per prompt, resumably.

Rows are appended chunk by chunk (flushed and fsynced), keyed by the prompt's stable ``id``. A run
that is killed resumes where it stopped: finished ids are skipped, no row is ever written twice, and a
half-written last line left by a kill is cut off (with a warning) and regenerated.

Each row holds ``id``, ``prompt``, ``category``, ``label``, ``source``, ``condition``, ``response``,
``first_token_category`` (the category of the first generated token, ``"respond"`` or ``None``), the
condition's per-row decision fields (e.g. ``strength``, ``routed_category``) and the run metadata
(``model``, ``condition_metadata``, ``generation``, ``seed``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from scripts.hooked_model import HookedModel
from scripts.model import format_chat, generate_ids
from scripts.paths import RunConfig
from scripts.records import JSONLError, PromptRecord, append_jsonl, iter_numbered_jsonl
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES, CategorySet
from scripts.steering import Condition, SteeringPlan

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 64

RESERVED_FIELDS: tuple[str, ...] = (
    "id",
    "prompt",
    "category",
    "label",
    "source",
    "condition",
    "response",
    "first_token_category",
    "model",
    "condition_metadata",
    "generation",
    "seed",
)
"""Row fields written by this module; a condition's per-row decision may not reuse these names."""


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings recorded in every row (``generation`` field)."""

    batch_size: int
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    system_prompt: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "system_prompt": self.system_prompt,
        }


def repair_truncated_tail(path: str | os.PathLike[str]) -> bool:
    """Cut a half-written last line (no trailing newline) off a JSONL file, as a kill mid-append leaves it.

    Only the final line can be a casualty of a kill, so only it is removed; a complete line that merely
    lacks its newline is removed too, because appending after it would merge two rows into one line.

    Returns:
        Whether anything was cut off.
    """
    path = Path(path)
    if not path.exists():
        return False
    with open(path, "rb+") as handle:
        data = handle.read()
        if not data or data.endswith(b"\n"):
            return False
        keep = data.rfind(b"\n") + 1
        dropped = data[keep:]
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    line_number = data[:keep].count(b"\n") + 1
    logger.warning(
        "%s:%d: dropped an unfinished last line (%d bytes, left by an interrupted write); it will be regenerated",
        path,
        line_number,
        len(dropped),
    )
    return True


def _nested_field(row: Mapping[str, Any], dotted: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``; ``None`` where a level is missing."""
    value: Any = row
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def completed_ids(
    path: str | os.PathLike[str], condition_name: str, expected: Mapping[str, Any] | None = None
) -> set[str]:
    """Ids already written to a generations file (after repairing a truncated tail).

    Args:
        path: Generations JSONL file (missing: nothing done yet).
        condition_name: The condition every row must belong to.
        expected: Field → value every existing row must carry (e.g. ``model``, ``seed``; a dotted name
            such as ``generation.max_new_tokens`` reads a nested field), so a resumed run never mixes
            rows made with other settings into one file.

    Raises:
        JSONLError: a row lacks ``id``, belongs to another condition, repeats an id, or differs from
            ``expected``; the message names file, line, field and both values.
    """
    path = Path(path)
    repair_truncated_tail(path)
    done: set[str] = set()
    if not path.exists():
        return done
    for line_number, row in iter_numbered_jsonl(path):
        if "id" not in row:
            raise JSONLError(path, line_number, "row has no 'id'")
        if row.get("condition") != condition_name:
            raise JSONLError(
                path,
                line_number,
                f"row belongs to condition {row.get('condition')!r}, not {condition_name!r}; "
                "use one file per condition",
            )
        if row["id"] in done:
            raise JSONLError(path, line_number, f"duplicate id {row['id']!r}")
        for key, value in (expected or {}).items():
            found = _nested_field(row, key)
            if found != value:
                raise JSONLError(
                    path,
                    line_number,
                    f"row was made with {key}={found!r} but this run has {key}={value!r}; "
                    "write to another file or delete this one",
                )
        done.add(row["id"])
    return done


def first_token_category(
    token_ids: Sequence[int], category_ids: Mapping[int, str], respond_id: int | None
) -> str | None:
    """Category of the first generated token: a category name, ``"respond"``, or ``None`` for any other token."""
    if not token_ids:
        return None
    first = int(token_ids[0])
    if first in category_ids:
        return category_ids[first]
    if respond_id is not None and first == respond_id:
        return "respond"
    return None


def _refusal_token_lookup(tokenizer, category_set: CategorySet) -> tuple[dict[int, str], int | None]:
    """Token id → category and the compliance token id; empty when the tokenizer lacks the refusal tokens."""
    try:
        return category_set.category_of_token_id(tokenizer), category_set.respond_token_id(tokenizer)
    except KeyError:
        logger.warning(
            "the tokenizer lacks the %r refusal tokens; first_token_category will be None for every row",
            category_set.name,
        )
        return {}, None


def _check_unique_ids(records: Sequence[PromptRecord]) -> None:
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise ValueError(f"duplicate record id {record.id!r} (prompt {record.prompt[:60]!r}); ids must be unique")
        seen.add(record.id)


def _build_rows(
    records: Sequence[PromptRecord],
    responses: Sequence[list[int]],
    plan: SteeringPlan,
    condition_name: str,
    tokenizer,
    lookup: tuple[dict[int, str], int | None],
    run_metadata: Mapping[str, Any],
) -> list[dict[str, Any]]:
    if len(plan.decisions) != len(records):
        raise ValueError(
            f"condition {condition_name!r} returned {len(plan.decisions)} decisions for {len(records)} prompts"
        )
    rows = []
    for record, ids, decision in zip(records, responses, plan.decisions):
        clashes = sorted(set(decision) & set(RESERVED_FIELDS))
        if clashes:
            raise ValueError(f"condition {condition_name!r} decision uses reserved field name(s) {clashes}")
        row: dict[str, Any] = {
            "id": record.id,
            "prompt": record.prompt,
            "category": record.category,
            "label": record.label,
            "source": record.source,
            "condition": condition_name,
            "response": tokenizer.decode(ids, skip_special_tokens=False).strip(),
            "first_token_category": first_token_category(ids, *lookup),
        }
        row.update(decision)
        row.update(run_metadata)
        try:
            json.dumps(row)
        except (TypeError, ValueError) as error:
            # Checked before appending, so a bad row never leaves a half-written chunk behind.
            message = f"condition {condition_name!r}: row {record.id!r} is not JSON-serialisable: {error}"
            raise TypeError(message) from error
        rows.append(row)
    return rows


def run_condition(
    hooked: HookedModel,
    records: Sequence[PromptRecord],
    condition: Condition,
    out_path: str | os.PathLike[str],
    batch_size: int = 16,
    max_new_tokens: int = 64,
    system_prompt: str | None = None,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    category_set: CategorySet = DONOTANSWER_CATEGORIES,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    progress: bool = True,
) -> Path:
    """Generate a response to every record under ``condition`` and append the rows to ``out_path``.

    Records are cut into fixed chunks of ``chunk_size`` by position; each chunk's unfinished records are
    planned (``condition.plan``), generated with ``generate_ids(..., batch_hook=plan.batch_hook)`` and
    appended in one fsynced write. Ids already in ``out_path`` are skipped, so rerunning after a kill
    completes the file without duplicates; for greedy decoding the result equals an uninterrupted run.
    Chunk ``i`` is seeded with ``seed + i`` so sampled runs resume reproducibly too.

    Args:
        hooked: The model to generate with.
        records: Prompts; their ids must be unique.
        condition: Steering condition (``name`` and ``plan(hooked, prompts, texts)``).
        out_path: Generations JSONL file (created, or completed when it exists).
        batch_size: Rows per generation batch.
        max_new_tokens: Generation length limit.
        system_prompt: Optional system message for the chat template.
        seed: Base seed (recorded in each row).
        chunk_size: Records per appended chunk (the amount of work a kill can lose).
        category_set: Refusal tokens that ``first_token_category`` recognises.
        do_sample, temperature, top_p: Decoding settings (greedy by default).
        progress: Show a progress bar over records.

    Returns:
        ``out_path`` as a ``Path``.

    Raises:
        ValueError: duplicate record ids, a bad ``chunk_size``, or a plan whose decisions do not match.
        JSONLError: ``out_path`` holds rows of another condition, rows without id, or duplicate ids.
    """
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_unique_ids(records)
    out_path = Path(out_path)
    settings = GenerationSettings(batch_size, max_new_tokens, do_sample, temperature, top_p, system_prompt)
    # Batch size only changes padding, so a run may resume with another one.
    resume_check = {"model": hooked.name, "seed": seed}
    resume_check.update({f"generation.{k}": v for k, v in settings.to_dict().items() if k != "batch_size"})
    if records and out_path.exists() and out_path.stat().st_size:
        # Rows made with other vectors, probe, strengths or operator must not be resumed: plan one
        # record (one forward pass at most) to learn what this condition steers with now.
        first = records[0].prompt
        metadata = condition.plan(hooked, [first], format_chat(hooked.tokenizer, [first], system_prompt)).metadata
        resume_check["condition_metadata"] = json.loads(json.dumps(dict(metadata), ensure_ascii=False))
    done = completed_ids(out_path, condition.name, resume_check)
    unknown = done - {record.id for record in records}
    if unknown:
        logger.warning("%s holds %d ids that are not among the given records; they are kept", out_path, len(unknown))
    lookup = _refusal_token_lookup(hooked.tokenizer, category_set)
    remaining = sum(record.id not in done for record in records)
    if done:
        logger.info("%s: resuming, %d rows done, %d to go", out_path, len(records) - remaining, remaining)
    bar = tqdm(total=remaining, desc=f"eval {condition.name}", disable=not progress)
    for chunk_index, start in enumerate(range(0, len(records), chunk_size)):
        pending = [record for record in records[start : start + chunk_size] if record.id not in done]
        if not pending:
            continue
        prompts = [record.prompt for record in pending]
        texts = format_chat(hooked.tokenizer, prompts, system_prompt)
        plan = condition.plan(hooked, prompts, texts)
        responses = generate_ids(
            hooked.model,
            hooked.tokenizer,
            texts,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            batch_hook=plan.batch_hook,
            reuse_prefix=plan.prompt_prefix_unchanged,
            seed=seed + chunk_index,
            progress=False,
        )
        run_metadata = {
            "model": hooked.name,
            "condition_metadata": dict(plan.metadata),
            "generation": settings.to_dict(),
            "seed": seed,
        }
        rows = _build_rows(pending, responses, plan, condition.name, hooked.tokenizer, lookup, run_metadata)
        append_jsonl(out_path, rows)
        done.update(record.id for record in pending)
        bar.update(len(pending))
    bar.close()
    return out_path


def run_conditions(
    hooked: HookedModel,
    records: Sequence[PromptRecord],
    conditions: Sequence[Condition],
    run_config: RunConfig,
    **kwargs: Any,
) -> dict[str, Path]:
    """:func:`run_condition` for each condition, into ``run_config.artifact_path("generations", name)``.

    Args:
        conditions: Conditions with distinct names.
        **kwargs: Passed to :func:`run_condition` (``seed`` defaults to ``run_config.seed``).

    Returns:
        Condition name → generations file.
    """
    names = [condition.name for condition in conditions]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"condition names must be distinct; repeated: {duplicates}")
    kwargs.setdefault("seed", run_config.seed)
    paths = {}
    for condition in conditions:
        path = run_config.artifact_path("generations", condition.name)
        paths[condition.name] = run_condition(hooked, records, condition, path, **kwargs)
        logger.info("condition %s written to %s", condition.name, path)
    return paths


def first_responses(paths: Mapping[str, str | os.PathLike[str]], prompt_chars: int = 50, response_chars: int = 80) -> str:
    """One line per condition: the first row's prompt and response (truncated), to eyeball a run."""
    lines = []
    for name, path in paths.items():
        first = json.loads(Path(path).read_text().splitlines()[0])
        lines.append(f"{name:24s} {first['prompt'][:prompt_chars]!r} -> {first['response'][:response_chars]!r}")
    return "\n".join(lines)
