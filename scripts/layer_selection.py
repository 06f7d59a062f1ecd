"""Choose the steering layer and strength with a cheap sweep: one forward pass per prompt batch, no generation.

For every cell ``(layer, strength s >= 0)`` harmful prompts are steered toward refusal (``+s`` along
their category's vector) and benign prompts away from it (``−benign_strength_ratio · s``); harmful
prompts are also steered away, as a router that mistakes them for benign would. All in one batched pass
with per-row vectors; the next-token distribution at the assistant's first position is read:

* ``harmful_refusal``: mean over harmful prompts steered toward refusal of ``Σ_c p(refusal token c)``;
* ``benign_respond``: mean over benign prompts of ``p([respond])``;
* ``misrouted_harmful_refusal``: mean over harmful prompts steered *away* of ``Σ_c p(refusal token c)``.

Objective (maximised): the mean of the three. The first two are the refusal-token analogue of balanced
accuracy under perfect routing; the third prices routing errors: a probe misses some harmful prompts,
and a strength that only just flips benign look-alikes to ``[respond]`` leaves a clearly harmful prompt
refusing, where a larger one makes it comply (on the offline model at layer 18, steering every
held-out Do-Not-Answer prompt away with −6 kept 97% of them refusing, with −12 92%, while −6 already
flipped 64% of the over-refused look-alikes). Ties go to the earlier cell in sweep order (layers as
given, strengths as given), so list smaller strengths first to prefer them. A prompt's category is its
label when given, else the category whose refusal token the unsteered model finds most likely.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch

from scripts.hooked_model import HookedModel, validate_layer
from scripts.refusal_tokens import CategorySet
from scripts.steering import (
    DEFAULT_KIND,
    DEFAULT_POSITIONS,
    VectorSource,
    check_positions,
    per_row_batch_hook,
    refusal_token_probabilities,
)

logger = logging.getLogger(__name__)

VectorsByLayer = Mapping[int, VectorSource] | Callable[[int], VectorSource]
"""Category vectors per layer: a mapping layer → vectors, or a callable ``layer -> vectors``."""


def objective(harmful_refusal: float, benign_respond: float, misrouted_harmful_refusal: float) -> float:
    """``(harmful_refusal + benign_respond + misrouted_harmful_refusal) / 3`` (see the module docstring)."""
    return (harmful_refusal + benign_respond + misrouted_harmful_refusal) / 3.0


def _vectors_at(vectors: VectorsByLayer, layer: int, requested: int, category_set: CategorySet) -> torch.Tensor:
    """Stacked ``[n_categories, d_model]`` vectors of ``layer`` in the category set's order."""
    if callable(vectors):
        source = vectors(requested)
    else:
        key = layer if layer in vectors else requested
        if key not in vectors:
            raise KeyError(f"no steering vectors for layer {requested}; layers with vectors: {sorted(vectors)}")
        source = vectors[key]
    mapping = getattr(source, "vectors", source)
    if set(mapping) != set(category_set.categories):
        raise KeyError(f"vectors of layer {requested} cover {sorted(mapping)}, expected {category_set.categories}")
    return torch.stack([torch.as_tensor(mapping[c]).float() for c in category_set.categories])


def _row_categories(
    given: Sequence[str | None] | None, n: int, fallback: torch.Tensor, category_set: CategorySet, what: str
) -> list[int]:
    """Category index per prompt: the given label, or (for ``None``) the unsteered model's most likely category."""
    if given is None:
        return fallback.tolist()
    if len(given) != n:
        raise ValueError(f"{len(given)} {what} categories for {n} {what} prompts")
    indices = []
    for name, default in zip(given, fallback.tolist()):
        if name is None:
            indices.append(default)
        else:
            category_set.check_category(name)
            indices.append(category_set.categories.index(name))
    return indices


def sweep_layers(
    hooked: HookedModel,
    harmful_texts: Sequence[str],
    benign_texts: Sequence[str],
    category_set: CategorySet,
    layers: Sequence[int],
    strengths: Sequence[float],
    vectors: VectorsByLayer,
    harmful_categories: Sequence[str | None] | None = None,
    benign_categories: Sequence[str | None] | None = None,
    benign_strength_ratio: float = 1.0,
    kind: str = DEFAULT_KIND,
    positions: str = DEFAULT_POSITIONS,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every ``(layer, strength)`` cell (see the module docstring).

    Args:
        harmful_texts, benign_texts: Chat-formatted inputs ending with the assistant turn's opening.
        layers: Layers to try (negative counts from the end; the table holds the resolved index).
        strengths: Non-negative magnitudes; 0 is the unsteered model (computed once).
        vectors: Category vectors per layer (:data:`VectorsByLayer`), keyed by category name.
        harmful_categories, benign_categories: Optional category label per prompt (``None`` entries,
            or no list, use the unsteered model's most likely refusal token).
        benign_strength_ratio: Benign prompts are steered with ``−ratio · s`` (the paper's +4/−6 is 1.5).

    Returns:
        One dict per cell, in sweep order: ``layer``, ``hook``, ``strength``, ``benign_strength``,
        ``harmful_refusal``, ``harmful_respond``, ``benign_respond``, ``benign_refusal``,
        ``misrouted_harmful_refusal``, ``objective``.
    """
    from tqdm.auto import tqdm

    if not harmful_texts or not benign_texts:
        raise ValueError("the sweep needs harmful and benign texts")
    if any(s < 0 for s in strengths) or not strengths:
        raise ValueError(f"strengths must be non-negative magnitudes, got {list(strengths)}")
    if benign_strength_ratio < 0:
        raise ValueError(f"benign_strength_ratio must be >= 0, got {benign_strength_ratio}")
    check_positions(positions)
    resolved = [validate_layer(layer, hooked.n_layers) for layer in layers]
    n_harmful, n_benign = len(harmful_texts), len(benign_texts)
    unsteered = refusal_token_probabilities(hooked, list(harmful_texts) + list(benign_texts), category_set,
                                            batch_size=batch_size)  # fmt: skip
    most_likely = unsteered[:, :-1].argmax(dim=-1)
    harmful_rows = _row_categories(harmful_categories, n_harmful, most_likely[:n_harmful], category_set, "harmful")
    benign_rows = _row_categories(benign_categories, n_benign, most_likely[n_harmful:], category_set, "benign")
    # Rows: harmful toward refusal, benign away, harmful away (misrouted).
    texts = list(harmful_texts) + list(benign_texts) + list(harmful_texts)
    categories = harmful_rows + benign_rows + harmful_rows
    direction = torch.tensor([1.0] * n_harmful + [-benign_strength_ratio] * (n_benign + n_harmful))
    unsteered = torch.cat([unsteered, unsteered[:n_harmful]])
    table = []
    cells = [(layer, requested, float(s)) for layer, requested in zip(resolved, layers) for s in strengths]
    for layer, requested, strength in tqdm(cells, desc="layer sweep", disable=not progress):
        if strength == 0:
            probabilities = unsteered
        else:
            rows = _vectors_at(vectors, layer, requested, category_set)[categories]
            hook = per_row_batch_hook(hooked, layer, rows, strength * direction, kind, positions)
            probabilities = refusal_token_probabilities(hooked, texts, category_set, hook, batch_size=batch_size)
        harmful, benign = probabilities[:n_harmful], probabilities[n_harmful : n_harmful + n_benign]
        misrouted = probabilities[n_harmful + n_benign :]
        cell = {
            "layer": layer,
            "hook": hooked.hook_name(layer, kind),
            "strength": strength,
            "benign_strength": -benign_strength_ratio * strength,
            "harmful_refusal": float(harmful[:, :-1].sum(dim=-1).mean()),
            "harmful_respond": float(harmful[:, -1].mean()),
            "benign_respond": float(benign[:, -1].mean()),
            "benign_refusal": float(benign[:, :-1].sum(dim=-1).mean()),
            "misrouted_harmful_refusal": float(misrouted[:, :-1].sum(dim=-1).mean()),
        }
        cell["objective"] = objective(cell["harmful_refusal"], cell["benign_respond"], cell["misrouted_harmful_refusal"])
        table.append(cell)
    best = best_cell(table)
    logger.info("best cell: layer %d, strength %g (objective %.4f)", best["layer"], best["strength"], best["objective"])
    return table


def best_cell(table: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The cell with the highest ``objective`` (the first one on ties)."""
    if not table:
        raise ValueError("empty sweep table")
    return dict(max(table, key=lambda cell: cell["objective"]))
