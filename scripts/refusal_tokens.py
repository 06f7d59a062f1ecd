"""Refusal-token registry: a category set is data (name → token string, plus the compliance token).

Token ids are always resolved from the tokenizer; nothing here hard-codes an id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

RESPOND_TOKEN = "[respond]"


@dataclass(frozen=True)
class CategorySet:
    """The refusal categories of a refusal-token model.

    Attributes:
        name: Name of the category set (e.g. ``"coconot"``).
        tokens: Category name → refusal-token string, in a fixed order.
        respond_token: The compliance token emitted before an answer.
    """

    name: str
    tokens: Mapping[str, str]
    respond_token: str = RESPOND_TOKEN

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a category set needs at least one category")
        strings = list(self.tokens.values()) + [self.respond_token]
        if len(set(strings)) != len(strings):
            raise ValueError(f"refusal-token strings must be distinct, got {strings}")
        object.__setattr__(self, "tokens", dict(self.tokens))

    @property
    def categories(self) -> list[str]:
        """Category names in registry order."""
        return list(self.tokens)

    @property
    def all_token_strings(self) -> list[str]:
        """Every special token of the set: the category tokens, then the compliance token."""
        return [*self.tokens.values(), self.respond_token]

    def token_for(self, category: str) -> str:
        """The refusal-token string of ``category``; an unknown name raises with the valid ones."""
        self.check_category(category)
        return self.tokens[category]

    def check_category(self, category: str) -> None:
        """Raise ``KeyError`` naming the valid categories when ``category`` is not one of them."""
        if category not in self.tokens:
            raise KeyError(f"unknown category {category!r}; valid categories: {self.categories}")

    def token_ids(self, tokenizer) -> dict[str, int]:
        """Category name → token id, resolved from ``tokenizer``.

        Raises:
            KeyError: a token is not a single token of the tokenizer (call :func:`add_refusal_tokens`).
        """
        return {category: single_token_id(tokenizer, token) for category, token in self.tokens.items()}

    def respond_token_id(self, tokenizer) -> int:
        """Token id of the compliance token."""
        return single_token_id(tokenizer, self.respond_token)

    def category_of_token_id(self, tokenizer) -> dict[int, str]:
        """Token id → category name (the inverse of :meth:`token_ids`)."""
        return {token_id: category for category, token_id in self.token_ids(tokenizer).items()}


COCONOT_CATEGORIES = CategorySet(
    name="coconot",
    tokens={
        "incomplete_requests": "[Incomplete requests]",
        "indeterminate_requests": "[Indeterminate requests]",
        "humanizing_requests": "[Humanizing requests]",
        "requests_with_safety_concerns": "[Requests with safety concerns]",
        "unsupported_requests": "[Unsupported requests]",
    },
)
"""The five COCONot non-compliance categories of the paper's Llama-3-8B refusal-token model."""

DONOTANSWER_CATEGORIES = CategorySet(
    name="donotanswer",
    tokens={
        "discrimination_exclusion_toxicity": "[Discrimination, exclusion, toxicity, hateful, offensive]",
        "human_chatbot_interaction_harms": "[Human-chatbot interaction harms]",
        "information_hazards": "[Information hazards]",
        "malicious_uses": "[Malicious uses]",
        "misinformation_harms": "[Misinformation harms]",
    },
)
"""The five Do-Not-Answer risk areas: the category set of the offline refusal-token model."""

CATEGORY_SETS: dict[str, CategorySet] = {s.name: s for s in (COCONOT_CATEGORIES, DONOTANSWER_CATEGORIES)}


def get_category_set(name: str) -> CategorySet:
    """A registered category set by name; an unknown name raises with the valid ones."""
    if name not in CATEGORY_SETS:
        raise KeyError(f"unknown category set {name!r}; valid: {sorted(CATEGORY_SETS)}")
    return CATEGORY_SETS[name]


def single_token_id(tokenizer, token: str) -> int:
    """The id of ``token`` if the tokenizer has it as one token; else ``KeyError``."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise KeyError(
            f"{token!r} is not a single token of this tokenizer (encodes to {len(ids)} ids); "
            "add it with add_refusal_tokens()"
        )
    return int(ids[0])


def add_refusal_tokens(tokenizer, category_set: CategorySet, model=None) -> list[str]:
    """Add the set's refusal tokens to ``tokenizer`` (as special tokens) where missing.

    Args:
        tokenizer: A Hugging Face tokenizer, modified in place.
        category_set: The categories whose tokens to add.
        model: When given, its input (and tied output) embeddings are resized to the new
            vocabulary; new rows are initialised to the mean of the existing embeddings.

    Returns:
        The token strings that were actually added (empty when all were present).
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in category_set.all_token_strings if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if model is not None and len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
        old_rows = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings[old_rows:] = embeddings[:old_rows].mean(dim=0, keepdim=True)
            output = model.get_output_embeddings()
            if output is not None and output.weight.data_ptr() != embeddings.data_ptr():
                output.weight[old_rows:] = output.weight[:old_rows].mean(dim=0, keepdim=True)
    return missing


def detect_category(
    token_ids: Sequence[int] | torch.Tensor, tokenizer, category_set: CategorySet, first_only: bool = False
) -> str | None:
    """Which token of the set a generated sequence contains.

    Args:
        token_ids: Generated token ids, shape ``[seq]``.
        first_only: Look only at the first token (the refusal-token model's decision).

    Returns:
        The category name of the first category token found, ``"respond"`` if the compliance
        token comes first, or ``None`` when neither appears.
    """
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    if first_only:
        ids = ids[:1]
    by_id = category_set.category_of_token_id(tokenizer)
    respond_id = category_set.respond_token_id(tokenizer)
    for token_id in ids:
        if token_id in by_id:
            return by_id[token_id]
        if token_id == respond_id:
            return "respond"
    return None


def detect_category_in_text(text: str, category_set: CategorySet) -> str | None:
    """Like :func:`detect_category` on decoded text: the earliest token string found, or ``None``."""
    positions = {category: text.find(token) for category, token in category_set.tokens.items()}
    positions["respond"] = text.find(category_set.respond_token)
    found = {name: pos for name, pos in positions.items() if pos >= 0}
    return min(found, key=found.get) if found else None
