"""Model diffing: compare the category directions of two models and test whether steering transfers between them.

Two questions, for a base model and its refusal-token fine-tune (or any two models of one architecture):

* Do they share category directions? :func:`vector_cosines` gives the per-category cosine between the
  two models' vectors, :func:`cross_model_cosine_matrix` every category pair, and
  :func:`similarity_structure` compares the within-model cosine matrices (meaningful even when the two
  residual bases differ).
* Does steering trained on one steer the other? :func:`steering_transfer` applies one condition (e.g.
  ``scripts.steering.low_rank_combination(operator, layer)`` with an operator trained on model A) to
  both models and measures the change in next-token refusal-token probabilities at the assistant's first
  position, by default with :func:`scripts.steering.refusal_token_probabilities`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from scripts.eval_steering_vectors import CategoryMatrix, cosine_similarity_matrix
from scripts.hooked_model import HookedModel
from scripts.model import BatchHookFactory, format_chat
from scripts.refusal_tokens import CategorySet
from scripts.steering import Condition, refusal_token_probabilities
from scripts.steering_vectors import check_categories

logger = logging.getLogger(__name__)

RESPOND_COLUMN = "respond"

ProbabilityFunction = Callable[[HookedModel, Sequence[str], "Condition | BatchHookFactory | None"], torch.Tensor]
"""``fn(hooked, texts, steering) -> [N, n_columns]`` next-token probabilities (steering ``None``: unsteered)."""


def _as_vectors(vectors: Any) -> dict[str, torch.Tensor]:
    """Category → ``[d_model]`` from a mapping or anything with a ``vectors`` mapping (``SteeringVectors``)."""
    return dict(getattr(vectors, "vectors", vectors))


def _check_pair(vectors_a: Any, vectors_b: Any, names: tuple[str, str]) -> tuple[dict, dict]:
    """Both vector sets as dicts after checking that their categories and widths match."""
    a, b = _as_vectors(vectors_a), _as_vectors(vectors_b)
    check_categories(list(b), list(a), what=f"{names[1]}'s vectors (vs {names[0]}'s)")
    widths = {names[0]: {int(v.shape[-1]) for v in a.values()}, names[1]: {int(v.shape[-1]) for v in b.values()}}
    if widths[names[0]] != widths[names[1]] or len(widths[names[0]]) != 1:
        raise ValueError(f"vector widths differ between the models: {widths}")
    for name, vectors in zip(names, (a, b)):
        zero = [category for category, vector in vectors.items() if not bool(vector.any())]
        if zero:
            raise ValueError(f"{name} has zero vector(s) {zero}; their direction is undefined")
    return a, b


def vector_cosines(vectors_a: Any, vectors_b: Any, names: tuple[str, str] = ("A", "B")) -> dict[str, float]:
    """Per-category cosine between model A's and model B's vector of that category.

    Args:
        vectors_a, vectors_b: Category → ``[d_model]`` (or ``SteeringVectors``), same categories and width.
        names: How the two models are named in error messages.

    Returns:
        Category → cosine, in A's category order.

    Raises:
        ValueError: the category sets differ (both are named) or the widths differ.
    """
    a, b = _check_pair(vectors_a, vectors_b, names)
    cosines = {}
    for category, vector in a.items():
        left, right = vector.detach().double().cpu(), b[category].detach().double().cpu()
        cosines[category] = float(left @ right / (left.norm() * right.norm()))
    return cosines


def cross_model_cosine_matrix(vectors_a: Any, vectors_b: Any, names: tuple[str, str] = ("A", "B")) -> CategoryMatrix:
    """Cosine of every model-A vector (rows) with every model-B vector (columns), both in A's category order.

    The diagonal is :func:`vector_cosines`; off-diagonal entries show whether a category of A lines up
    with a different category of B.
    """
    a, b = _check_pair(vectors_a, vectors_b, names)
    categories = list(a)
    left = torch.stack([a[c].detach().double().cpu() for c in categories])
    right = torch.stack([b[c].detach().double().cpu() for c in categories])
    left = left / left.norm(dim=1, keepdim=True)
    right = right / right.norm(dim=1, keepdim=True)
    return CategoryMatrix(categories, left @ right.T)


def similarity_structure(vectors_a: Any, vectors_b: Any, names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """Compare the within-model cosine matrices of two models (widths may differ; categories must match).

    Returns:
        ``{"cosine_a": {...}, "cosine_b": {...}, "max_abs_difference": float,
        "off_diagonal_correlation": float or None}`` — the correlation of the off-diagonal entries
        (``None`` with fewer than 3 categories or constant entries).
    """
    a, b = _as_vectors(vectors_a), _as_vectors(vectors_b)
    check_categories(list(b), list(a), what=f"{names[1]}'s vectors (vs {names[0]}'s)")
    matrix_a = cosine_similarity_matrix(a)
    matrix_b = cosine_similarity_matrix({c: b[c] for c in matrix_a.categories})
    off = ~torch.eye(len(matrix_a.categories), dtype=torch.bool)
    entries_a, entries_b = matrix_a.values[off], matrix_b.values[off]
    correlation = None
    if entries_a.numel() >= 2 and entries_a.std() > 0 and entries_b.std() > 0:
        correlation = float(torch.corrcoef(torch.stack([entries_a, entries_b]))[0, 1])
    return {
        "cosine_a": matrix_a.to_dict(),
        "cosine_b": matrix_b.to_dict(),
        "max_abs_difference": float((matrix_a.values - matrix_b.values).abs().max()),
        "off_diagonal_correlation": correlation,
    }


@dataclass(frozen=True)
class SteeringEffect:
    """Next-token refusal-token probabilities of one model with and without a steering condition.

    Attributes:
        model: The model's name.
        columns: Column names: the category names, then ``"respond"``.
        unsteered: ``[N, len(columns)]`` probabilities without steering.
        steered: ``[N, len(columns)]`` probabilities under the condition.
    """

    model: str
    columns: list[str]
    unsteered: torch.Tensor
    steered: torch.Tensor

    @property
    def delta(self) -> torch.Tensor:
        """``steered − unsteered``, ``[N, len(columns)]``."""
        return self.steered - self.unsteered

    @property
    def refusal_mass_change(self) -> float:
        """Mean over prompts of the change in total probability of the category (refusal) tokens."""
        categories = [index for index, name in enumerate(self.columns) if name != RESPOND_COLUMN]
        return float(self.delta[:, categories].sum(dim=1).mean())

    def mean_change(self) -> dict[str, float]:
        """Column → mean change in probability over prompts."""
        return {name: float(value) for name, value in zip(self.columns, self.delta.mean(dim=0))}

    def summary(self) -> dict[str, Any]:
        """JSON-able summary: model, prompt count, refusal-mass change and per-column mean change."""
        return {
            "model": self.model,
            "n_prompts": int(self.unsteered.shape[0]),
            "refusal_mass_change": self.refusal_mass_change,
            "mean_change": self.mean_change(),
        }


def steering_effect(
    hooked: HookedModel,
    condition: Condition,
    prompts: Sequence[str],
    category_set: CategorySet,
    system_prompt: str | None = None,
    probability_fn: ProbabilityFunction | None = None,
    batch_size: int = 16,
) -> SteeringEffect:
    """Refusal-token probabilities of ``hooked`` on ``prompts`` without and with ``condition``.

    Args:
        prompts: User messages; formatted with this model's own chat template.
        category_set: Names the columns (categories, then ``respond``).
        probability_fn: ``fn(hooked, texts, steering) -> [N, C + 1]``; default
            :func:`scripts.steering.refusal_token_probabilities` (the model's tokenizer must have the
            set's tokens). Pass another to measure a model without refusal tokens.
        batch_size: Batch size of the default probability function.

    Raises:
        ValueError: the probability function returns a wrongly shaped tensor.
    """
    if probability_fn is None:

        def probability_fn(model: HookedModel, texts: Sequence[str], steering) -> torch.Tensor:
            return refusal_token_probabilities(model, texts, category_set, steering=steering, batch_size=batch_size)

    texts = format_chat(hooked.tokenizer, list(prompts), system_prompt)
    columns = [*category_set.categories, RESPOND_COLUMN]
    unsteered = torch.as_tensor(probability_fn(hooked, texts, None)).detach().double().cpu()
    steered = torch.as_tensor(probability_fn(hooked, texts, condition)).detach().double().cpu()
    expected = (len(texts), len(columns))
    for name, table in (("unsteered", unsteered), ("steered", steered)):
        if tuple(table.shape) != expected:
            raise ValueError(f"{name} probabilities have shape {tuple(table.shape)}, expected {expected}")
    return SteeringEffect(hooked.name, columns, unsteered, steered)


@dataclass(frozen=True)
class TransferResult:
    """One condition's effect on the model it was made for (source) and on another model (target).

    Attributes:
        source: Effect on the source model.
        target: Effect on the target model.
    """

    source: SteeringEffect
    target: SteeringEffect

    @property
    def transfer_ratio(self) -> float | None:
        """Target refusal-mass change over source refusal-mass change (``None`` when the source did not move)."""
        if self.source.refusal_mass_change == 0:
            return None
        return self.target.refusal_mass_change / self.source.refusal_mass_change

    def summary(self) -> dict[str, Any]:
        """JSON-able: both effects' summaries and the transfer ratio."""
        return {"source": self.source.summary(), "target": self.target.summary(), "transfer_ratio": self.transfer_ratio}


def steering_transfer(
    source: HookedModel,
    target: HookedModel,
    condition: Condition,
    prompts: Sequence[str],
    category_set: CategorySet,
    system_prompt: str | None = None,
    probability_fn: ProbabilityFunction | None = None,
    batch_size: int = 16,
) -> TransferResult:
    """Apply the same condition (e.g. a low-rank operator trained on ``source``) to both models and measure it.

    The condition is planned separately on each model (routers then route by that model's own
    activations), while its vectors or operator stay those it was built with.

    Raises:
        ValueError: the two models' residual widths differ (an operator or vector cannot transfer).
    """
    if source.d_model != target.d_model:
        raise ValueError(
            f"residual widths differ: source {source.name!r} has d_model {source.d_model}, "
            f"target {target.name!r} has {target.d_model}"
        )
    effects = [
        steering_effect(model, condition, prompts, category_set, system_prompt, probability_fn, batch_size)
        for model in (source, target)
    ]
    result = TransferResult(*effects)
    logger.info(
        "steering transfer: refusal mass %+.4f on %s, %+.4f on %s",
        result.source.refusal_mass_change,
        source.name,
        result.target.refusal_mass_change,
        target.name,
    )
    return result


def compare_vectors(vectors_a: Any, vectors_b: Any, names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """JSON-able comparison of two models' category vectors.

    Returns:
        ``{"models": names, "cosine": {category: float}, "cross_cosine": {a_cat: {b_cat: float}},
        "structure": similarity_structure(...)}``.
    """
    return {
        "models": list(names),
        "cosine": vector_cosines(vectors_a, vectors_b, names),
        "cross_cosine": cross_model_cosine_matrix(vectors_a, vectors_b, names).to_dict(),
        "structure": similarity_structure(vectors_a, vectors_b, names),
    }
