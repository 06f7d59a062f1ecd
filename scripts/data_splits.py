"""Deterministic splits of prompt records: stratified, duplicate-safe, leave-one-source-out, balanced.

All functions are pure over lists of :class:`PromptRecord`. Two prompts are the same prompt when
their :func:`normalize_text` forms are equal, so near-duplicates (case, spacing, punctuation) never
end up on both sides of a split. Records marked evaluation-only (``meta["split_role"] ==
"eval_only"``, e.g. the over-refusal set) never enter a training or validation side.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Iterable, Literal, Sequence

from scripts.records import PromptRecord

logger = logging.getLogger(__name__)

SPLIT_ROLE_KEY = "split_role"
SPLIT_ROLE_EVAL_ONLY = "eval_only"
STRATIFY_FIELDS: tuple[str, ...] = ("label", "category", "source")


def normalize_text(text: str) -> str:
    """Lower-case, punctuation turned to spaces, whitespace collapsed: the key for duplicate checks.

    >>> normalize_text("  How do I   bake Cookies?! ")
    'how do i bake cookies'
    """
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def is_eval_only(record: PromptRecord) -> bool:
    """Whether a record is reserved for evaluation and must never be trained on."""
    return record.meta.get(SPLIT_ROLE_KEY) == SPLIT_ROLE_EVAL_ONLY


def exclude_eval_only(records: Iterable[PromptRecord]) -> list[PromptRecord]:
    """The records that may be used for training (evaluation-only ones removed)."""
    return [record for record in records if not is_eval_only(record)]


def dedupe_records(records: Iterable[PromptRecord]) -> list[PromptRecord]:
    """Keep the first record of each normalised prompt text, in input order."""
    seen: set[str] = set()
    kept = []
    for record in records:
        key = normalize_text(record.prompt)
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept


def overlapping_texts(left: Iterable[PromptRecord], right: Iterable[PromptRecord]) -> set[str]:
    """Normalised prompt texts present on both sides (empty for a clean split)."""
    return {normalize_text(r.prompt) for r in left} & {normalize_text(r.prompt) for r in right}


@dataclass(frozen=True)
class Split:
    """A train/validation/test split; each side keeps the input order of its records."""

    train: list[PromptRecord]
    val: list[PromptRecord]
    test: list[PromptRecord]


def train_val_test_split(
    records: Sequence[PromptRecord],
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    stratify_by: Sequence[str] = ("label", "category"),
) -> Split:
    """Seeded split stratified by the given record fields, with near-duplicates kept together.

    Records are grouped by normalised text; each group goes to one side whole. Within each stratum
    (the values of ``stratify_by`` of a group's first record) the groups are shuffled with a seed
    derived from ``seed`` and the stratum, and ``round(n * fraction)`` groups go to test and to
    validation. Evaluation-only records always go to test. Each side keeps input order.

    Raises:
        ValueError: fractions outside ``[0, 1)`` or summing to 1 or more, or an unknown stratify field.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    unknown = [name for name in stratify_by if name not in STRATIFY_FIELDS]
    if unknown:
        raise ValueError(f"unknown stratify field(s) {unknown}; valid: {list(STRATIFY_FIELDS)}")

    groups: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        groups[normalize_text(record.prompt)].append(index)
    side_of_index: dict[int, str] = {}
    strata: dict[tuple[str, ...], list[list[int]]] = defaultdict(list)
    for members in groups.values():
        if any(is_eval_only(records[index]) for index in members):
            side_of_index.update({index: "test" for index in members})
            continue
        first = records[members[0]]
        strata[tuple(str(getattr(first, name)) for name in stratify_by)].append(members)

    for key in sorted(strata):
        stratum = strata[key]
        random.Random(f"{seed}|{'|'.join(key)}").shuffle(stratum)
        n_test = round(len(stratum) * test_fraction)
        n_val = min(round(len(stratum) * val_fraction), len(stratum) - n_test)
        for position, members in enumerate(stratum):
            side = "test" if position < n_test else "val" if position < n_test + n_val else "train"
            side_of_index.update({index: side for index in members})

    sides: dict[str, list[PromptRecord]] = {"train": [], "val": [], "test": []}
    for index, record in enumerate(records):
        sides[side_of_index[index]].append(record)
    return Split(train=sides["train"], val=sides["val"], test=sides["test"])


def train_test_split(
    records: Sequence[PromptRecord],
    test_fraction: float = 0.2,
    seed: int = 0,
    stratify_by: Sequence[str] = ("label", "category"),
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """:func:`train_val_test_split` without a validation side: ``(train, test)``."""
    split = train_val_test_split(
        records, val_fraction=0.0, test_fraction=test_fraction, seed=seed, stratify_by=stratify_by
    )
    return split.train, split.test


def subsample_per_category(
    records: Sequence[PromptRecord],
    per_category: int,
    seed: int = 0,
    by: Sequence[str] = ("label", "category"),
) -> list[PromptRecord]:
    """At most ``per_category`` records of each group (by the ``by`` fields), seeded, in input order.

    Raises:
        ValueError: ``per_category`` is negative or a ``by`` field is unknown.
    """
    if per_category < 0:
        raise ValueError(f"per_category must be >= 0, got {per_category}")
    unknown = [name for name in by if name not in STRATIFY_FIELDS]
    if unknown:
        raise ValueError(f"unknown group field(s) {unknown}; valid: {list(STRATIFY_FIELDS)}")
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        groups[tuple(str(getattr(record, name)) for name in by)].append(index)
    chosen: set[int] = set()
    for key in sorted(groups):
        members = groups[key]
        if len(members) > per_category:
            members = random.Random(f"{seed}|{'|'.join(key)}").sample(members, per_category)
        chosen.update(members)
    return [record for index, record in enumerate(records) if index in chosen]


def leave_one_source_out(
    records: Sequence[PromptRecord], held_out_source: str
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Train on every other source, test on ``held_out_source``.

    The train side drops evaluation-only records and any record whose normalised text also occurs
    in the held-out source, so nothing tested was trained on.

    Raises:
        ValueError: ``held_out_source`` has no record; the message lists the sources present.
    """
    sources = sorted({record.source for record in records})
    if held_out_source not in sources:
        raise ValueError(f"unknown source {held_out_source!r}; sources present: {sources}")
    test = [record for record in records if record.source == held_out_source]
    held_out_texts = {normalize_text(record.prompt) for record in test}
    train = [
        record
        for record in records
        if record.source != held_out_source
        and not is_eval_only(record)
        and normalize_text(record.prompt) not in held_out_texts
    ]
    return train, test


def oversample_benign(
    records: Sequence[PromptRecord],
    seed: int = 0,
    target: Literal["per_category", "max_category"] = "per_category",
) -> list[PromptRecord]:
    """Repeat benign records so that benign counts match harmful per-category counts (for fine-tuning).

    Args:
        records: Harmful and benign records.
        seed: Seed for which records are repeated beyond whole copies.
        target: ``"per_category"``: the benign look-alikes of each harmful category are repeated up
            to that category's harmful count (plain ``"benign"`` records are left as they are);
            ``"max_category"``: the whole benign pool is repeated up to the largest per-category
            harmful count, so that "respond" is as frequent as the most frequent refusal category.

    Returns:
        The input records followed by the added copies. Nothing is ever dropped.

    Raises:
        ValueError: unknown ``target``.
    """
    harmful_counts = Counter(record.category for record in records if record.label == "harmful")
    benign = [record for record in records if record.label == "benign"]
    if target == "per_category":
        pools = {category: [r for r in benign if r.category == category] for category in sorted(harmful_counts)}
        wanted = dict(harmful_counts)
    elif target == "max_category":
        pools = {"benign": benign}
        wanted = {"benign": max(harmful_counts.values(), default=0)}
    else:
        raise ValueError(f"unknown target {target!r}; valid: ['per_category', 'max_category']")
    extra: list[PromptRecord] = []
    for name, pool in pools.items():
        missing = wanted[name] - len(pool)
        if missing <= 0:
            continue
        if not pool:
            logger.warning("no benign records to oversample for %r", name)
            continue
        extra.extend(_repeat(pool, missing, random.Random(f"{seed}|{name}")))
    return list(records) + extra


def _repeat(pool: Sequence[PromptRecord], count: int, rng: random.Random) -> list[PromptRecord]:
    """``count`` records drawn from ``pool``: whole copies first, then a random distinct remainder."""
    whole, remainder = divmod(count, len(pool))
    return list(pool) * whole + rng.sample(list(pool), remainder)


def balanced_subsample(records: Sequence[PromptRecord], budget: int, seed: int) -> list[PromptRecord]:
    """At most ``budget`` records, as even as possible over ``(source, category)`` groups (seeded, input order).

    Groups are visited round-robin, in a seeded order, each yielding its records in a seeded
    order, so small groups (often the closest look-alikes) are kept whole and large ones are cut.
    """
    if budget >= len(records):
        return list(records)
    groups: dict[tuple[str, str], list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault((record.source, record.category), []).append(index)
    rng = random.Random(f"{seed}|balanced")
    keys = sorted(groups)
    for key in keys:
        rng.shuffle(groups[key])
    rng.shuffle(keys)
    chosen: set[int] = set()
    depth = 0
    while len(chosen) < budget:
        for key in keys:
            if depth < len(groups[key]) and len(chosen) < budget:
                chosen.add(groups[key][depth])
        depth += 1
    return [record for index, record in enumerate(records) if index in chosen]


LOOKALIKE_FRACTION = 0.5


def benign_with_lookalikes(
    benign: Sequence[PromptRecord], budget: int, seed: int = 0, lookalike_fraction: float = LOOKALIKE_FRACTION
) -> list[PromptRecord]:
    """At most ``budget`` benign records, ``lookalike_fraction`` of them benign look-alikes (seeded, input order).

    A look-alike is a benign record whose ``category`` names a harm category (the corpus tags benign
    prompts that touch a risk area, e.g. a BBQ question with ``discrimination_exclusion_toxicity``);
    plain benign records have category ``benign``. Each part is drawn with :func:`balanced_subsample`
    (even over source and category); a part with too few records is filled from the other. Why: with
    plain questions only, vectors and probe learn "sounds edgy → harmful". Look-alikes of other kinds
    are not enough on their own: on the offline model a probe with half look-alikes still called about
    a quarter of the over-refusal set harmful; look-alikes of that kind (:func:`calibration_split`)
    brought it to 3%.

    Raises:
        ValueError: ``budget`` is negative or ``lookalike_fraction`` is outside [0, 1].
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if not 0.0 <= lookalike_fraction <= 1.0:
        raise ValueError(f"lookalike_fraction must be in [0, 1], got {lookalike_fraction}")
    lookalikes = [record for record in benign if record.category != "benign"]
    plain = [record for record in benign if record.category == "benign"]
    n_lookalike = min(len(lookalikes), max(round(budget * lookalike_fraction), budget - len(plain)))
    chosen = {id(record) for record in balanced_subsample(lookalikes, n_lookalike, seed)}
    chosen |= {id(record) for record in balanced_subsample(plain, budget - n_lookalike, seed)}
    return [record for record in benign if id(record) in chosen]


def calibration_split(
    records: Sequence[PromptRecord], calibration_fraction: float = 0.5, seed: int = 0,
    stratify_by: Sequence[str] = ("category",),
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """``(calibration, evaluation)``: a seeded, stratified, near-duplicate-safe split of an evaluation set.

    Evaluation-only records (such as the over-refusal set) never enter the refusal-token fine-tune,
    and :func:`train_val_test_split` keeps them on its test side. The steering components (vectors
    and the routing probe) may still be calibrated on part of such a set, the way the paper's probe
    data include COCONot's contrast prompts, as long as the rates are reported on the other part.
    This split ignores the evaluation-only role and otherwise follows :func:`train_val_test_split`.

    Raises:
        ValueError: ``calibration_fraction`` outside ``(0, 1)``.
    """
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    unlabelled = [replace(record, meta={k: v for k, v in record.meta.items() if k != SPLIT_ROLE_KEY})
                  for record in records]  # fmt: skip
    split = train_val_test_split(unlabelled, val_fraction=0.0, test_fraction=calibration_fraction, seed=seed,
                                 stratify_by=stratify_by)  # fmt: skip
    calibration_ids = {record.id for record in split.test}
    return ([record for record in records if record.id in calibration_ids],
            [record for record in records if record.id not in calibration_ids])  # fmt: skip
