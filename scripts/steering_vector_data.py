"""Prompt sets for steering-vector extraction: harmful prompts per refusal category and a benign set.

Three views of the same records:

* :func:`build_steering_data` — ``{category: [harmful records]}`` in the category set's order, plus
  the benign records (difference-in-means vectors contrast each category with the benign set);
* :func:`refusal_token_targets` — each prompt with the assistant-turn text that starts with its
  refusal token (or the compliance token for benign prompts), the upstream "data with refusal
  category tokens appended"; tokenisation and chat templating are left to the caller;
* :func:`contrastive_pairs` — (harmful, benign look-alike) pairs where a source provides them
  (records sharing ``meta["pair_id"]`` within one source).

Evaluation-only records are left out unless asked for.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from scripts.data_splits import exclude_eval_only, subsample_per_category
from scripts.records import PromptRecord
from scripts.refusal_tokens import CategorySet
from scripts.training_data import take_random

logger = logging.getLogger(__name__)

PAIR_ID_KEY = "pair_id"


@dataclass(frozen=True)
class SteeringData:
    """Harmful prompts grouped by refusal category, and the benign prompts to contrast them with."""

    harmful_by_category: dict[str, list[PromptRecord]]
    benign: list[PromptRecord]

    @property
    def categories(self) -> list[str]:
        """Category names in the category set's order."""
        return list(self.harmful_by_category)


def build_steering_data(
    records: Iterable[PromptRecord],
    category_set: CategorySet,
    per_category: int | None = None,
    n_benign: int | None = None,
    seed: int = 0,
    include_eval_only: bool = False,
) -> SteeringData:
    """Group harmful records by the set's categories and collect the benign records.

    Harmful records whose category is not in ``category_set`` (e.g. ``"harmbench"``) are ignored.

    Args:
        records: Harmful and benign records.
        category_set: The refusal categories to extract vectors for.
        per_category: Seeded cap on harmful records per category.
        n_benign: Seeded cap on benign records.
        seed: Seed for the caps.
        include_eval_only: Keep evaluation-only records (off by default: they must not shape vectors).

    Raises:
        ValueError: a category of the set has no harmful record (the message names the empty ones).
    """
    pool = list(records) if include_eval_only else exclude_eval_only(records)
    harmful = [r for r in pool if r.label == "harmful" and r.category in category_set.tokens]
    if per_category is not None:
        harmful = subsample_per_category(harmful, per_category, seed=seed)
    grouped: dict[str, list[PromptRecord]] = {category: [] for category in category_set.categories}
    for record in harmful:
        grouped[record.category].append(record)
    empty = [category for category, members in grouped.items() if not members]
    if empty:
        raise ValueError(f"no harmful records for categories {empty} of set {category_set.name!r}")
    benign = [r for r in pool if r.label == "benign"]
    if n_benign is not None:
        benign = take_random(benign, n_benign, seed=seed)
    logger.info(
        "steering data: %s harmful per category, %d benign",
        {category: len(members) for category, members in grouped.items()},
        len(benign),
    )
    return SteeringData(harmful_by_category=grouped, benign=benign)


@dataclass(frozen=True)
class TokenTarget:
    """A prompt and the text its assistant turn starts with (a refusal or compliance token)."""

    prompt: str
    target: str
    category: str
    record_id: str


def refusal_token_targets(records: Iterable[PromptRecord], category_set: CategorySet) -> list[TokenTarget]:
    """Each record with its refusal token (harmful) or the compliance token (benign) as the target.

    Raises:
        KeyError: a harmful record's category is not in the set (the message lists the valid ones).
    """
    targets = []
    for record in records:
        if record.label == "harmful":
            token = category_set.token_for(record.category)
            category = record.category
        else:
            token = category_set.respond_token
            category = "respond"
        targets.append(TokenTarget(prompt=record.prompt, target=token, category=category, record_id=record.id))
    return targets


def contrastive_pairs(records: Sequence[PromptRecord]) -> list[tuple[PromptRecord, PromptRecord]]:
    """(harmful, benign) pairs of records sharing ``meta["pair_id"]`` within the same source.

    A pair id with several records on one side pairs its first harmful with its first benign
    record; ids with only one side are skipped. Pairs come in the order their harmful side appears.
    """
    sides: dict[tuple[str, str], dict[str, PromptRecord]] = defaultdict(dict)
    order: list[tuple[str, str]] = []
    for record in records:
        pair_id = record.meta.get(PAIR_ID_KEY)
        if pair_id in (None, ""):
            continue
        key = (record.source, str(pair_id))
        if key not in sides:
            order.append(key)
        sides[key].setdefault(record.label, record)
    pairs = [(sides[key]["harmful"], sides[key]["benign"]) for key in order if len(sides[key]) == 2]
    unpaired = len(order) - len(pairs)
    if unpaired:
        logger.info("%d pair ids have only one side and were skipped", unpaired)
    return pairs
