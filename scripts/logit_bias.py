"""The logit-bias baseline: add a constant to the refusal tokens' logits instead of steering activations.

A :class:`LogitBias` is a steering condition (``name`` and ``plan(hooked, prompts, texts)`` returning a
:class:`scripts.steering.SteeringPlan`), so it runs through :func:`scripts.eval.run_condition` and
:func:`scripts.steering.refusal_token_probabilities` like any other condition. The bias is added by a
TransformerLens hook on the unembedding output (``unembed.hook_out``, logits ``[batch, pos, vocab]``),
which fires inside ``model.generate``: every decoding step sees the biased logits, so a positive bias
makes the biased tokens more likely at every position and a negative one suppresses them.

Adding ``b`` to the logits of a token set ``S`` changes a token's log-probability by exactly
``b·[t ∈ S] − log(1 − P(S) + P(S)·e^b)``, where ``P(S)`` is the unbiased probability of the set.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from scripts.hooked_model import HookedModel, HookFunction
from scripts.refusal_tokens import CategorySet
from scripts.steering import SteeringPlan

LOGITS_HOOK = "unembed.hook_out"
"""TransformerLens hook point of the unembedding output (the logits) on the bridge."""


def logit_bias_hook(token_ids: Sequence[int], bias: float) -> HookFunction:
    """A hook function adding ``bias`` to the logits of ``token_ids`` at every position.

    Args:
        token_ids: Vocabulary indices to bias.
        bias: Added to each of those logits (any finite number; negative suppresses).

    Returns:
        ``fn(logits [batch, pos, vocab], hook) -> logits`` (out of place).
    """
    if not math.isfinite(bias):
        raise ValueError(f"bias must be finite, got {bias}")
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("no token ids to bias")

    def hook_fn(logits: torch.Tensor, hook: object) -> torch.Tensor:
        offset = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        offset[ids.to(logits.device)] = bias
        return logits + offset

    return hook_fn


@dataclass(frozen=True)
class LogitBias:
    """A condition adding ``bias`` to the logits of some refusal tokens for every row.

    Attributes:
        name: Condition name (file name of its generations).
        category_set: The refusal-token registry.
        bias: Added to each chosen token's logit.
        categories: The categories whose tokens are biased (all of the set's by default).
        include_respond: Also bias the compliance token ``[respond]``.
    """

    name: str
    category_set: CategorySet
    bias: float
    categories: tuple[str, ...]
    include_respond: bool = False

    def token_ids(self, tokenizer) -> list[int]:
        """Ids of the biased tokens (categories in registry order, then ``[respond]`` if included)."""
        by_category = self.category_set.token_ids(tokenizer)
        ids = [by_category[category] for category in self.categories]
        if self.include_respond:
            ids.append(self.category_set.respond_token_id(tokenizer))
        return ids

    def plan(self, hooked: HookedModel, prompts: Sequence[str], texts: Sequence[str]) -> SteeringPlan:
        """The same bias for every row; decisions record it as ``logit_bias`` and ``biased_categories``."""
        if len(prompts) != len(texts):
            raise ValueError(f"{len(prompts)} prompts but {len(texts)} texts")
        token_ids = self.token_ids(hooked.tokenizer)
        hook = logit_bias_hook(token_ids, self.bias)

        def batch_hook(batch_indices: Sequence[int]) -> contextlib.AbstractContextManager[HookedModel]:
            return hooked.hooks([(LOGITS_HOOK, hook)])

        decision = {"logit_bias": self.bias, "biased_categories": list(self.categories)}
        metadata = {
            "condition": self.name,
            "steering": "logit_bias",
            "bias": self.bias,
            "categories": list(self.categories),
            "include_respond": self.include_respond,
            "token_ids": token_ids,
            "hook": LOGITS_HOOK,
        }
        # The bias acts on the logits only: the prompt's hidden states and cache stay the unsteered ones.
        return SteeringPlan(batch_hook, [dict(decision) for _ in texts], metadata, prompt_prefix_unchanged=True)


def logit_bias(
    category_set: CategorySet,
    bias: float,
    category: str | None = None,
    include_respond: bool = False,
    name: str | None = None,
) -> LogitBias:
    """The logit-bias baseline condition.

    Args:
        category_set: The refusal-token registry.
        bias: Added to the chosen tokens' logits (positive: more refusal tokens; negative: fewer).
        category: Bias only this category's token; ``None`` biases every category token.
        include_respond: Also bias ``[respond]`` (e.g. a negative bias on all special tokens).
        name: Condition name; default ``logit_bias_<category or all>_<bias>``.

    Raises:
        KeyError: ``category`` is not in the set (the message names the valid ones).
        ValueError: ``bias`` is not finite.
    """
    if category is not None:
        category_set.check_category(category)
    if not math.isfinite(bias):
        raise ValueError(f"bias must be finite, got {bias}")
    categories = (category,) if category is not None else tuple(category_set.categories)
    default_name = f"logit_bias_{category or 'all'}_{bias:+g}"
    return LogitBias(name or default_name, category_set, float(bias), categories, include_respond)
