"""Choose the steering layer and strengths with a cheap sweep: one forward pass per prompt batch, no generation.

A probe-routed condition steers a prompt the router calls harmful with ``+s`` along its category's vector
and a prompt it calls benign with ``−s'``. Both signs reach both kinds of prompt, because routers err.
For every layer and every signed strength ``t`` in ``+positive_strengths`` and ``−negative_strengths``,
all harmful and all benign validation prompts are steered with ``t`` in one batched pass with per-row
vectors, and the next-token distribution at the assistant's first position is read:

* ``harmful_refusal``: mean over harmful prompts of ``Σ_c p(refusal token c)``;
* ``benign_respond``: mean over benign prompts of ``p([respond])``.

With a router of true-positive rate ``TPR`` and false-positive rate ``FPR`` on harmful-vs-benign, the
expected first-token outcome of the pair ``(+s, −s')`` is

* ``P(refuse | harmful) = TPR · harmful_refusal(+s) + (1 − TPR) · harmful_refusal(−s')``;
* ``P(respond | benign) = (1 − FPR) · benign_respond(−s') + FPR · benign_respond(+s)``.

The objective (maximised) is their mean: the balanced accuracy of the routed pipeline at the first
token. It splits into a part that depends only on ``+s`` and one that depends only on ``−s'``, so each
sign's strength is chosen on its own (:func:`best_strengths`), and each layer's objective is the sum of
its two best parts. Pricing routing errors is what keeps the strengths finite: a large ``+s`` turns the
few benign prompts a probe mistakes for harmful into refusals, a large ``−s'`` makes the few harmful
prompts it misses comply. The two signs are free of each other because their effects are unlike. On
the offline model at layer 18 (measured once, to explain this design, on the demo's evaluation prompts,
which the sweep itself never sees): −6 already flipped all but one of 15 over-refused look-alikes to
answers, while on 40 HarmBench prompts, a source the fine-tune never saw, the refusals went from 24
unsteered to 29 at +8, 33 at +16 and 40 at +24; with the paper's +4/−6 ratio a sweep whose harmful
prompts all refuse already picked +4. The harmful validation prompts should therefore include such a
source, or the sweep cannot tell the strengths apart on the positive side.
Ties go to the earlier entry (layers as given, strengths as given): list smaller strengths first to
prefer them. A prompt's category is its label when given, else the category whose refusal token the
unsteered model finds most likely.
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
    Route,
    VectorSource,
    check_positions,
    per_row_batch_hook,
    refusal_token_probabilities,
    routed_token_probabilities,
)

logger = logging.getLogger(__name__)

VectorsByLayer = Mapping[int, VectorSource] | Callable[[int], VectorSource]
"""Category vectors per layer: a mapping layer → vectors, or a callable ``layer -> vectors``."""

DEFAULT_ROUTER_TPR = 0.95
DEFAULT_ROUTER_FPR = 0.05
"""Router error rates assumed by default: the notebook's probe threshold targets a false-positive rate of 5%."""


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
    positive_strengths: Sequence[float],
    negative_strengths: Sequence[float],
    vectors: VectorsByLayer,
    harmful_categories: Sequence[str | None] | None = None,
    benign_categories: Sequence[str | None] | None = None,
    router_tpr: float = DEFAULT_ROUTER_TPR,
    router_fpr: float = DEFAULT_ROUTER_FPR,
    kind: str = DEFAULT_KIND,
    positions: str = DEFAULT_POSITIONS,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every ``(layer, side, strength)`` entry (see the module docstring).

    Args:
        harmful_texts, benign_texts: Chat-formatted inputs ending with the assistant turn's opening.
        layers: Layers to try (negative counts from the end; the table holds the resolved index).
        positive_strengths: Magnitudes ``s >= 0`` toward refusal (entries with ``side="positive"``,
            ``strength = +s``).
        negative_strengths: Magnitudes ``s' >= 0`` away from refusal (``side="negative"``,
            ``strength = −s'``). 0 in either list is the unsteered model (computed once).
        vectors: Category vectors per layer (:data:`VectorsByLayer`), keyed by category name.
        harmful_categories, benign_categories: Optional category label per prompt (``None`` entries,
            or no list, use the unsteered model's most likely refusal token).
        router_tpr, router_fpr: The router's expected true- and false-positive rates (harmful is the
            positive class); they weigh each side's effect on the prompts it reaches.

    Returns:
        One dict per entry, layers in order, each layer's positive strengths then its negative ones:
        ``layer``, ``hook``, ``side``, ``strength`` (signed), ``harmful_refusal``, ``harmful_respond``,
        ``benign_respond``, ``benign_refusal`` (all prompts steered with ``strength``), the side's
        weights ``weight_harmful`` / ``weight_benign`` (``TPR`` / ``FPR`` on the positive side,
        ``1−TPR`` / ``1−FPR`` on the negative side), and ``contribution``, this entry's part of the
        objective: ``(weight_harmful·harmful_refusal + weight_benign·benign_respond) / 2``.
        :func:`best_strengths` makes the choice.
    """
    if not harmful_texts or not benign_texts:
        raise ValueError("the sweep needs harmful and benign texts")
    for what, magnitudes in (("positive_strengths", positive_strengths), ("negative_strengths", negative_strengths)):
        if not magnitudes or any(s < 0 for s in magnitudes):
            raise ValueError(f"{what} must be non-empty, non-negative magnitudes, got {list(magnitudes)}")
    for what, rate in (("router_tpr", router_tpr), ("router_fpr", router_fpr)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{what} must lie in [0, 1], got {rate}")
    check_positions(positions)
    resolved = [validate_layer(layer, hooked.n_layers) for layer in layers]
    n_harmful = len(harmful_texts)
    texts = list(harmful_texts) + list(benign_texts)
    unsteered = refusal_token_probabilities(hooked, texts, category_set, batch_size=batch_size)
    most_likely = unsteered[:, :-1].argmax(dim=-1)
    categories = _row_categories(harmful_categories, n_harmful, most_likely[:n_harmful], category_set, "harmful")
    categories += _row_categories(benign_categories, len(benign_texts), most_likely[n_harmful:], category_set, "benign")
    weights = {"positive": (router_tpr, router_fpr), "negative": (1.0 - router_tpr, 1.0 - router_fpr)}
    sides = [("positive", float(s)) for s in positive_strengths] + [("negative", -float(s)) for s in negative_strengths]
    entries = [(layer, requested, side, strength) for layer, requested in zip(resolved, layers) for side, strength in sides]
    steered = _steered_probabilities(hooked, texts, category_set, entries, vectors, categories, unsteered, kind,
                                     positions, batch_size, progress)  # fmt: skip
    table = []
    for (layer, requested, side, strength), probabilities in zip(entries, steered):
        harmful, benign = probabilities[:n_harmful], probabilities[n_harmful:]
        entry = {
            "layer": layer,
            "hook": hooked.hook_name(layer, kind),
            "side": side,
            "strength": strength,
            "harmful_refusal": float(harmful[:, :-1].sum(dim=-1).mean()),
            "harmful_respond": float(harmful[:, -1].mean()),
            "benign_respond": float(benign[:, -1].mean()),
            "benign_refusal": float(benign[:, :-1].sum(dim=-1).mean()),
        }
        entry["weight_harmful"], entry["weight_benign"] = weights[side]
        entry["contribution"] = 0.5 * (entry["weight_harmful"] * entry["harmful_refusal"]
                                       + entry["weight_benign"] * entry["benign_respond"])
        table.append(entry)
    best = best_strengths(table)
    logger.info("best: layer %d, strengths %+g / %+g (objective %.4f)", best["layer"], best["positive_strength"],
                best["negative_strength"], best["objective"])
    return table


def _steered_probabilities(
    hooked: HookedModel,
    texts: Sequence[str],
    category_set: CategorySet,
    entries: Sequence[tuple[int, int, str, float]],
    vectors: VectorsByLayer,
    categories: Sequence[int],
    unsteered: torch.Tensor,
    kind: str,
    positions: str,
    batch_size: int,
    progress: bool,
) -> list[torch.Tensor]:
    """``[N, C + 1]`` first-token probabilities of ``texts`` under each ``(layer, requested, side, strength)``
    entry, every row steered along its category's vector; a strength-0 entry is ``unsteered`` itself.

    Steering only the last prompt position (the first generated one is never reached) touches nothing
    before it, so every entry shares one unsteered prefix pass per batch
    (:func:`scripts.steering.routed_token_probabilities`); other position modes run each entry in full.
    """
    from tqdm.auto import tqdm

    stacked = [_vectors_at(vectors, layer, requested, category_set) for layer, requested, _, _ in entries]
    if positions != DEFAULT_POSITIONS:
        results = []
        for (layer, _, _, strength), table in tqdm(list(zip(entries, stacked)), desc="layer sweep",
                                                   disable=not progress):  # fmt: skip
            if strength == 0:
                results.append(unsteered)
                continue
            hook = per_row_batch_hook(hooked, layer, table[list(categories)], torch.full((len(texts),), strength),
                                      kind, positions)  # fmt: skip
            results.append(refusal_token_probabilities(hooked, texts, category_set, hook, batch_size=batch_size))
        return results
    conditions, layers = {}, {}
    for index, ((layer, _, side, strength), table) in enumerate(zip(entries, stacked)):
        route = "harmful" if side == "positive" else "benign"
        routes = [Route(route, category_set.categories[category], strength) for category in categories]
        conditions[str(index)] = (dict(zip(category_set.categories, table)), routes)
        layers[str(index)] = layer
    _, steered = routed_token_probabilities(hooked, texts, category_set, conditions, layers, kind,
                                            batch_size=batch_size, progress=progress)  # fmt: skip
    return [unsteered if entries[index][3] == 0 else steered[str(index)] for index in range(len(entries))]


def best_strengths(table: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The layer and the pair of strengths with the highest objective (see the module docstring).

    Each layer's objective is its best positive entry's ``contribution`` plus its best negative entry's;
    within a side and across layers the first entry wins ties.

    Returns:
        ``layer``, ``hook``, ``positive_strength`` (>= 0), ``negative_strength`` (<= 0), ``objective``,
        and the expected first-token rates of the routed pipeline, ``harmful_refusal`` (``P(refuse |
        harmful)``) and ``benign_respond`` (``P(respond | benign)``), which the objective averages.

    Raises:
        ValueError: an empty table, or a layer lacking entries of one side.
    """
    if not table:
        raise ValueError("empty sweep table")
    per_layer: dict[int, dict[str, Mapping[str, Any]]] = {}
    for entry in table:
        best_of_side = per_layer.setdefault(entry["layer"], {})
        side = entry["side"]
        if side not in best_of_side or entry["contribution"] > best_of_side[side]["contribution"]:
            best_of_side[side] = entry
    choices = []
    for layer, best_of_side in per_layer.items():
        missing = {"positive", "negative"} - set(best_of_side)
        if missing:
            raise ValueError(f"layer {layer} has no {sorted(missing)} entries")
        positive, negative = best_of_side["positive"], best_of_side["negative"]
        choices.append({
            "layer": layer,
            "hook": positive["hook"],
            "positive_strength": positive["strength"],
            "negative_strength": negative["strength"],
            "objective": positive["contribution"] + negative["contribution"],
            "harmful_refusal": _expected(positive, negative, "harmful_refusal"),
            "benign_respond": _expected(positive, negative, "benign_respond"),
        })
    return max(choices, key=lambda choice: choice["objective"])


def _expected(positive: Mapping[str, Any], negative: Mapping[str, Any], key: str) -> float:
    """``P(refuse | harmful)`` (``key="harmful_refusal"``) or ``P(respond | benign)`` of the routed pipeline."""
    weight = "weight_harmful" if key.startswith("harmful") else "weight_benign"
    return positive[weight] * positive[key] + negative[weight] * negative[key]
