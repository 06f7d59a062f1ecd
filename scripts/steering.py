"""Activation steering: hooks that add ``strength · v`` to the residual stream, routers that pick ``v``
and the strength per prompt, and conditions that turn both into a plan for batched generation.

Positions. The default mode, ``"last_and_generated"``, adds the steering delta at the last position of
every forward call. Under ``model.generate`` (KV cache on, the default) the first call sees the whole
left-padded prompt and each later call sees only the newest token, so this steers exactly the last
prompt position and every generated position, as in the paper's reference code. Mode ``"all"`` steers
every position of every call (prompt included). Steering is a pure function of the current call, so one
hook serves any number of forward calls (single forward passes, generation, training).

Per-row steering. Every hook takes one vector and one strength per batch row (``[batch, d_model]`` and
``[batch]``); a row with strength 0 is left bit-for-bit unchanged. :func:`per_row_batch_hook` turns
``[N, d_model]`` / ``[N]`` tensors over all inputs into the ``batch_hook`` factory that
:func:`scripts.model.generate_ids` enters around each batch (it is told the batch's input indices).

Conditions. A :class:`Condition` has a ``name`` and ``plan(hooked, prompts, texts)`` returning a
:class:`SteeringPlan`: the batch hook, one JSON-serialisable decision per row and condition metadata.
Factories: :func:`baseline`, :func:`fixed_category`, :func:`categorical` (per-row category and strength
from a router) and :func:`low_rank_combination` (a learned operator ``delta = f(z)``). Routers:
:func:`token_router` (the model's own first refusal token, the paper's "fixed" steering) and
:func:`probe_router` (a harmful-vs-benign probe, the paper's probe steering) and :func:`probe_token_router`
(a probe averaged with the model's own refusal-token score, which ranks prompt sources neither was tuned
on better than either). Routing needs one batched forward pass over all prompts, without generation.
A probe router's :class:`RoutingPolicy` turns its decision score into the route and strength: the
paper's binary one (full strength toward or away from refusal), one that abstains between two
thresholds, or one that scales the strength by a calibrated harmful probability.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Protocol, Sequence, Union

import torch
from torch import nn

from scripts.activation_caching import CachedActivations, cache_activations, position_ids_from_mask, texts_hash
from scripts.hooked_model import HookedModel, HookFunction, validate_layer
from scripts.model import MAX_BATCH_TOKENS, BatchHookFactory, length_sorted_batches, prepare_tokenizer, resolve_device
from scripts.refusal_tokens import CategorySet

if TYPE_CHECKING:
    from scripts.steering_vectors import SteeringVectors

logger = logging.getLogger(__name__)

POSITION_MODES: tuple[str, ...] = ("last_and_generated", "prompt", "all")
DEFAULT_POSITIONS = "last_and_generated"
DEFAULT_KIND = "resid_post"
PAPER_POSITIVE_STRENGTH = 4.0
PAPER_NEGATIVE_STRENGTH = -6.0
CATEGORY_SOURCES: tuple[str, ...] = ("token", "probe_head")
ROUTINGS: tuple[str, ...] = ("probe", "probe+token")
"""Routers of probe-routed steering: the probe alone (:func:`probe_router`) or averaged with the model's token
(:func:`probe_token_router`)."""
RESPOND = "respond"
_MIN_PROBABILITY = 1e-45

VectorSource = Union[Mapping[str, torch.Tensor], "SteeringVectors"]
"""Category → ``[d_model]`` steering vector, as a plain mapping or a saved ``SteeringVectors``."""

DeltaFunction = Callable[[torch.Tensor], torch.Tensor]
"""``delta(region [batch, pos, d_model]) -> [batch, pos or 1, d_model]``: what to add to ``region``."""


# ---------------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------------


def check_positions(positions: str) -> str:
    """Return ``positions`` if it is a known mode; else raise ``ValueError`` naming the valid ones."""
    if positions not in POSITION_MODES:
        raise ValueError(f"unknown positions mode {positions!r}; valid modes: {list(POSITION_MODES)}")
    return positions


def tensor_fingerprint(source: torch.Tensor | nn.Module | Any) -> str | None:
    """First 16 hex digits of the SHA-256 of a tensor's (or a module's state's) float32 values; ``None`` otherwise.

    Recorded in a condition's metadata so that a resumed evaluation can tell whether the vectors, the
    probe or the operator it would steer with are the ones its earlier rows were made with.
    """
    if isinstance(source, nn.Module):
        tensors = [tensor for _, tensor in sorted(source.state_dict().items())]
    elif isinstance(source, torch.Tensor):
        tensors = [source]
    else:
        return None
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def delta_hook(delta: DeltaFunction, positions: str = DEFAULT_POSITIONS) -> HookFunction:
    """A TransformerLens hook function adding ``delta(region)`` to the steered positions.

    Args:
        delta: Maps the steered region ``[batch, pos, d_model]`` of the activation to the amount to add.
        positions: ``"last_and_generated"`` (the last position of each call: the last prompt token, then
            every generated token), ``"prompt"`` (the last position of a multi-position call only: the
            last prompt token, which generated tokens then read through the KV cache; cached decoding
            steps, one position each, pass unchanged; for an intervention trained on that position
            alone, such as the low-rank combination) or ``"all"``.

    Returns:
        ``fn(activation [batch, pos, d_model], hook) -> activation`` (out of place, so gradients flow).
    """
    check_positions(positions)

    def hook_fn(activation: torch.Tensor, hook: object) -> torch.Tensor:
        if positions == "all":
            return activation + delta(activation).to(activation.dtype)
        if positions == "prompt" and activation.shape[1] == 1:
            return activation
        last = activation[:, -1:, :]
        return torch.cat([activation[:, :-1, :], last + delta(last).to(activation.dtype)], dim=1)

    return hook_fn


def _row_deltas(vectors: torch.Tensor, strengths: float | torch.Tensor) -> torch.Tensor:
    """Per-row ``strength · v`` ``[batch, d_model]`` from vectors ``[d]``/``[batch, d]``, strengths ``[]``/``[batch]``.

    (One vector with ``[batch]`` strengths broadcasts to every row.)
    """
    if vectors.ndim not in (1, 2):
        raise ValueError(f"steering vectors must be [d_model] or [batch, d_model], got shape {tuple(vectors.shape)}")
    strengths = torch.as_tensor(strengths, dtype=torch.float32, device=vectors.device)
    if strengths.ndim > 1:
        raise ValueError(f"strengths must be a scalar or [batch], got shape {tuple(strengths.shape)}")
    if not torch.isfinite(strengths).all():
        raise ValueError("strengths must be finite")
    rows = vectors.float() if vectors.ndim == 2 else vectors.float().unsqueeze(0)
    if strengths.ndim == 1:
        if rows.shape[0] == 1:
            rows = rows.expand(strengths.shape[0], -1)
        if strengths.shape[0] != rows.shape[0]:
            raise ValueError(f"{rows.shape[0]} steering vectors but {strengths.shape[0]} strengths")
        return strengths[:, None] * rows
    return strengths * rows


def vector_delta(vectors: torch.Tensor, strengths: float | torch.Tensor = 1.0) -> DeltaFunction:
    """Delta function adding ``strengths[b] · vectors[b]`` to every steered position of row ``b``.

    Args:
        vectors: ``[d_model]`` (one vector for all rows) or ``[batch, d_model]``.
        strengths: A scalar or ``[batch]``; 0 leaves a row exactly unchanged.

    Raises:
        ValueError: inconsistent shapes, or (at call time) a batch of another size.
    """
    deltas = _row_deltas(vectors, strengths)
    per_row = vectors.ndim == 2 or torch.as_tensor(strengths).ndim == 1

    def delta(region: torch.Tensor) -> torch.Tensor:
        if per_row and region.shape[0] != deltas.shape[0]:
            raise ValueError(
                f"steering was set up for {deltas.shape[0]} rows but the batch has {region.shape[0]}"
            )
        if region.shape[-1] != deltas.shape[-1]:
            raise ValueError(f"steering vectors have d_model {deltas.shape[-1]}, activation has {region.shape[-1]}")
        return deltas.to(region.device)[:, None, :]

    return delta


def operator_delta(operator: nn.Module, strengths: float | torch.Tensor = 1.0) -> DeltaFunction:
    """Delta function ``strengths[b] · operator(z)`` computed from the current activation ``z``.

    Args:
        operator: Maps ``[..., d_model]`` to ``[..., d_model]`` (e.g. the low-rank combination).
        strengths: A scalar or ``[batch]``.
    """
    strengths = torch.as_tensor(strengths, dtype=torch.float32)
    if strengths.ndim > 1 or not torch.isfinite(strengths).all():
        raise ValueError(f"strengths must be a finite scalar or [batch], got {strengths}")
    parameter = next(operator.parameters(), None)

    def delta(region: torch.Tensor) -> torch.Tensor:
        if strengths.ndim == 1 and strengths.shape[0] != region.shape[0]:
            raise ValueError(f"steering was set up for {strengths.shape[0]} rows but the batch has {region.shape[0]}")
        # The operator may be kept in float32 while the model runs in half precision.
        inputs = region if parameter is None else region.to(parameter.dtype)
        scale = strengths.to(region.device).reshape(-1, 1, 1) if strengths.ndim == 1 else strengths.to(region.device)
        return scale * operator(inputs)

    return delta


def steering_hooks(
    hooked: HookedModel,
    layer: int,
    delta: DeltaFunction,
    kind: str = DEFAULT_KIND,
    positions: str = DEFAULT_POSITIONS,
) -> contextlib.AbstractContextManager[HookedModel]:
    """Context manager adding ``delta`` at ``blocks.{layer}.hook_{kind}``; the hook is removed in ``finally``.

    Layer, kind and positions are validated here, before anything is registered.
    """
    return hooked.hooks([(hooked.hook_name(layer, kind), delta_hook(delta, positions))])


def steer(
    hooked: HookedModel,
    layer: int,
    vectors: torch.Tensor,
    strengths: float | torch.Tensor = 1.0,
    kind: str = DEFAULT_KIND,
    positions: str = DEFAULT_POSITIONS,
) -> contextlib.AbstractContextManager[HookedModel]:
    """Context manager adding ``strengths · vectors`` at one hook point.

    Args:
        vectors: ``[d_model]`` or ``[batch, d_model]``.
        strengths: A scalar or ``[batch]``.
    """
    _check_width(vectors, hooked.d_model)
    return steering_hooks(hooked, layer, vector_delta(vectors.to(hooked.device), strengths), kind, positions)


def steer_with_operator(
    hooked: HookedModel,
    layer: int,
    operator: nn.Module,
    strengths: float | torch.Tensor = 1.0,
    kind: str = DEFAULT_KIND,
    positions: str = DEFAULT_POSITIONS,
) -> contextlib.AbstractContextManager[HookedModel]:
    """Context manager adding ``strengths · operator(z)`` where ``z`` is the hooked activation itself."""
    return steering_hooks(hooked, layer, operator_delta(operator, strengths), kind, positions)


def per_row_batch_hook(
    hooked: HookedModel,
    layer: int,
    vectors: torch.Tensor,
    strengths: torch.Tensor,
    kind: str = DEFAULT_KIND,
    positions: str = DEFAULT_POSITIONS,
) -> BatchHookFactory:
    """A ``batch_hook`` for :func:`scripts.model.generate_ids`: input row ``i`` gets ``strengths[i] · vectors[i]``.

    Args:
        vectors: ``[N, d_model]``, one row per input text (zeros for unsteered rows).
        strengths: ``[N]`` (0 for unsteered rows).

    Raises:
        ValueError: shapes disagree with each other or with the model width.
    """
    _check_width(vectors, hooked.d_model)
    if vectors.ndim != 2 or strengths.ndim != 1 or vectors.shape[0] != strengths.shape[0]:
        raise ValueError(
            f"per-row steering needs vectors [N, d_model] and strengths [N], got {tuple(vectors.shape)} "
            f"and {tuple(strengths.shape)}"
        )
    hooked.hook_name(layer, kind)
    check_positions(positions)
    vectors = vectors.to(hooked.device)

    def factory(batch_indices: Sequence[int]) -> contextlib.AbstractContextManager[HookedModel]:
        index = torch.as_tensor(list(batch_indices), dtype=torch.long)
        return steer(hooked, layer, vectors[index.to(vectors.device)], strengths[index], kind, positions)

    return factory


def operator_batch_hook(
    hooked: HookedModel,
    layer: int,
    operator: nn.Module,
    strengths: torch.Tensor,
    kind: str = DEFAULT_KIND,
    positions: str = DEFAULT_POSITIONS,
) -> BatchHookFactory:
    """A ``batch_hook`` adding ``strengths[i] · operator(z)`` to input row ``i`` (``strengths``: ``[N]``)."""
    if strengths.ndim != 1:
        raise ValueError(f"strengths must be [N], got shape {tuple(strengths.shape)}")
    hooked.hook_name(layer, kind)
    check_positions(positions)

    def factory(batch_indices: Sequence[int]) -> contextlib.AbstractContextManager[HookedModel]:
        index = torch.as_tensor(list(batch_indices), dtype=torch.long)
        return steer_with_operator(hooked, layer, operator, strengths[index], kind, positions)

    return factory


def _check_width(vectors: torch.Tensor, d_model: int) -> None:
    if vectors.shape[-1] != d_model:
        raise ValueError(f"steering vectors have width {vectors.shape[-1]} but the model's d_model is {d_model}")


# ---------------------------------------------------------------------------------------------------
# Batched last-position forward passes
# ---------------------------------------------------------------------------------------------------


def encode_texts(tokenizer, texts: Sequence[str], device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``/``attention_mask`` plus ``position_ids`` counted from each row's first real token.

    Explicit position ids make a padded row's logits equal those of the row alone (and those of
    ``generate``'s first step), so batching never changes a score.
    """
    prepare_tokenizer(tokenizer)
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    target = resolve_device(device)
    return {
        "input_ids": encoded["input_ids"].to(target),
        "attention_mask": encoded["attention_mask"].to(target),
        "position_ids": position_ids_from_mask(encoded["attention_mask"]).to(target),
    }


def next_token_logits(model, encoded: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the next token after each row's last position: ``[batch, vocab]`` (only that position is projected)."""
    return model(**encoded, logits_to_keep=1, use_cache=False).logits[:, -1, :]


def last_position_forward(
    hooked: HookedModel,
    texts: Sequence[str],
    token_ids: Sequence[int],
    capture: Sequence[str] = (),
    batch_hook: BatchHookFactory | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batched, length-sorted forward pass over ``texts``, reading the last position.

    (Activations alone come cheaper from :func:`scripts.activation_caching.cache_activations`, which
    stops at the layer; this pass runs the whole model because it needs the next-token distribution.)

    Args:
        token_ids: Token ids whose next-token probabilities (softmax over the whole vocabulary) to return.
        capture: Hook names whose last-position activations to return too (e.g. ``blocks.5.hook_resid_post``).
        batch_hook: Entered around each batch with its input indices (steering).

    Returns:
        ``(probabilities [N, len(token_ids)], {hook name: activations [N, d_model]})``, float32 on CPU,
        input order.
    """
    from tqdm.auto import tqdm

    if not texts:
        raise ValueError("no texts given")
    if isinstance(capture, str):
        raise TypeError("capture takes a sequence of hook names, not one string")
    lengths = [len(ids) for ids in hooked.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    probabilities = torch.zeros(len(texts), len(token_ids))
    activations = {name: torch.zeros(len(texts), hooked.d_model) for name in capture}
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=hooked.device)
    captured: dict[str, torch.Tensor] = {}

    def capture_fn(activation: torch.Tensor, hook: object, name: str) -> None:
        captured[name] = activation[:, -1, :].detach().float().cpu()

    readers = [(name, functools.partial(capture_fn, name=name)) for name in activations]
    with torch.no_grad():
        batches = length_sorted_batches(lengths, batch_size, MAX_BATCH_TOKENS)
        for batch in tqdm(batches, desc="forward", disable=not progress):
            encoded = encode_texts(hooked.tokenizer, [texts[i] for i in batch], hooked.device)
            captured.clear()
            steering = batch_hook(batch) if batch_hook is not None else contextlib.nullcontext()
            reading = hooked.hooks(readers) if readers else contextlib.nullcontext()
            with steering, reading:
                logits = next_token_logits(hooked.model, encoded)
            rows = torch.as_tensor(batch, dtype=torch.long)
            probabilities[rows] = torch.softmax(logits.float(), dim=-1)[:, ids].cpu()
            for name, values in activations.items():
                values[rows] = captured[name]
    return probabilities, activations


def refusal_token_ids(tokenizer, category_set: CategorySet) -> list[int]:
    """Token ids of the set's category tokens (registry order) followed by the compliance token."""
    by_category = category_set.token_ids(tokenizer)
    return [by_category[category] for category in category_set.categories] + [category_set.respond_token_id(tokenizer)]


def token_router_scores(probabilities: torch.Tensor) -> torch.Tensor:
    """The model's own routing score: log-odds of opening with any refusal token rather than ``[respond]``.

    ``log Σ_c p(c) − log p([respond])`` ranks prompts by how much the first-token distribution leans
    toward refusing; it is monotone in ``Σ_c p(c)`` for a fixed ``p([respond])`` and, unlike the
    probability itself, does not saturate at 1.0 in float32 (saturated scores tie and blur the ROC).

    Args:
        probabilities: ``[N, n_categories + 1]`` from :func:`scripts.steering.refusal_token_probabilities`
            (category columns, then ``[respond]``).

    Returns:
        ``[N]`` float64 scores, higher = more harmful.
    """
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise ValueError(f"probabilities must be [N, n_categories + 1], got shape {tuple(probabilities.shape)}")
    values = probabilities.detach().cpu().double().clamp_min(_MIN_PROBABILITY)
    return values[:, :-1].sum(dim=1).log() - values[:, -1].log()


def refusal_token_probabilities(
    hooked: HookedModel,
    texts: Sequence[str],
    category_set: CategorySet,
    steering: "Condition | BatchHookFactory | None" = None,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Next-token probabilities of each refusal token and the compliance token at the assistant's first position.

    Args:
        texts: Chat-formatted inputs ending with the assistant turn's opening.
        steering: ``None`` (unsteered), a ``batch_hook`` factory, or a :class:`Condition` (planned on
            ``texts``, which then also serve as its ``prompts``).

    Returns:
        ``[N, n_categories + 1]`` float32 on CPU: columns are ``category_set.categories`` then ``respond``.
    """
    if steering is not None and hasattr(steering, "plan"):
        steering = steering.plan(hooked, texts, texts).batch_hook
    probabilities, _ = last_position_forward(
        hooked, texts, refusal_token_ids(hooked.tokenizer, category_set), batch_hook=steering,
        batch_size=batch_size, progress=progress,
    )
    return probabilities


def token_probabilities_and_activations(
    hooked: HookedModel,
    texts: Sequence[str],
    category_set: CategorySet,
    layers: Sequence[int],
    hook_kind: str = DEFAULT_KIND,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[torch.Tensor, CachedActivations]:
    """:func:`refusal_token_probabilities` and the last-position activations at ``layers`` from one forward pass.

    Cheaper than :func:`scripts.activation_caching.cache_activations` followed by
    :func:`refusal_token_probabilities` when both are needed: the layers are read on the way to the logits.

    Returns:
        ``(probabilities [N, n_categories + 1], activations)``: the probabilities as
        :func:`refusal_token_probabilities` gives them; ``activations.layer(layer)`` ``[N, d_model]``
        float32 on CPU, position ``-1``.

    Raises:
        ValueError: no texts, or an invalid layer or hook kind.
    """
    resolved = sorted({validate_layer(layer, hooked.n_layers) for layer in layers})
    if not resolved:
        raise ValueError("no layers given")
    names = {layer: hooked.hook_name(layer, hook_kind) for layer in resolved}
    probabilities, captured = last_position_forward(
        hooked, texts, refusal_token_ids(hooked.tokenizer, category_set), capture=list(names.values()),
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    activations = CachedActivations({layer: captured[name] for layer, name in names.items()}, hook_kind,
                                    texts_hash(texts), position=-1)  # fmt: skip
    return probabilities, activations


def routed_token_probabilities(
    hooked: HookedModel,
    texts: Sequence[str],
    category_set: CategorySet,
    conditions: Mapping[str, tuple[VectorSource, Sequence[Route]]],
    layer: int | Mapping[str, int],
    kind: str = DEFAULT_KIND,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`refusal_token_probabilities` of ``texts``, unsteered and steered along each condition's routes.

    What :func:`categorical` steering gives with a router that returned those routes, without routing
    again: row ``i`` gets ``routes[i].strength`` times its category's vector at the condition's layer,
    at the last prompt position (:data:`DEFAULT_POSITIONS`). Since only that position is steered, each
    batch's prompts minus their last token run once, unsteered, into a KV cache; the last token then
    runs on that cache once unsteered and once per condition (the cache cropped back after each). That
    equals the full steered forward pass up to floating-point order, at a fraction of its cost when many
    conditions share the prompts.

    Args:
        conditions: Name → ``(vectors, routes)``: the category vectors and one route per text (a route of
            strength 0, e.g. for a row the condition does not cover, leaves the row unsteered).
        layer: The layer every condition steers, or condition name → its layer (the prefix is
            unsteered, so conditions at different layers share it too).

    Returns:
        ``(unsteered [N, C + 1], {name: steered [N, C + 1]})``, float32 on CPU, columns as
        :func:`refusal_token_probabilities`.

    Raises:
        ValueError: no texts, or a condition without one route per text; KeyError: a route's category
            has no vector, or a layer mapping without a condition's name.
    """
    from tqdm.auto import tqdm

    if not texts:
        raise ValueError("no texts given")
    layers = dict(layer) if isinstance(layer, Mapping) else {name: layer for name in conditions}
    missing = sorted(set(conditions) - set(layers))
    if missing:
        raise KeyError(f"no layer for conditions {missing}; layers given for {sorted(layers)}")
    tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (vectors, routes) in conditions.items():
        if len(routes) != len(texts):
            raise ValueError(f"condition {name!r} has {len(routes)} routes for {len(texts)} texts")
        layers[name] = validate_layer(layers[name], hooked.n_layers)
        hooked.hook_name(layers[name], kind)
        names, table = _vector_table(vectors, layers[name], kind)
        _check_width(table, hooked.d_model)
        unknown = sorted({r.category for r in routes if r.strength != 0 and r.category not in names})
        if unknown:
            raise KeyError(f"condition {name!r} steers along {unknown}, which have no vector; vectors: {names}")
        rows = torch.stack([table[names.index(r.category)] if r.strength != 0 else torch.zeros(table.shape[1])
                            for r in routes])  # fmt: skip
        tables[name] = (rows, torch.tensor([float(r.strength) for r in routes]))
    token_ids = torch.as_tensor(refusal_token_ids(hooked.tokenizer, category_set), dtype=torch.long, device=hooked.device)
    unsteered = torch.zeros(len(texts), len(token_ids))
    steered = {name: torch.zeros(len(texts), len(token_ids)) for name in conditions}
    lengths = [len(ids) for ids in hooked.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    if min(lengths) < 2:
        raise ValueError("every text needs at least two tokens (a prefix and the last prompt token)")

    def last_token(encoded: Mapping[str, torch.Tensor], cache: Any) -> torch.Tensor:
        logits = hooked.model(input_ids=encoded["input_ids"][:, -1:], attention_mask=encoded["attention_mask"],
                              position_ids=encoded["position_ids"][:, -1:], past_key_values=cache, use_cache=True,
                              logits_to_keep=1).logits[:, -1, :]  # fmt: skip
        cache.crop(-1)
        return torch.softmax(logits.float(), dim=-1)[:, token_ids].cpu()

    with torch.no_grad():
        batches = length_sorted_batches(lengths, batch_size, MAX_BATCH_TOKENS)
        for batch in tqdm(batches, desc="steered first token", disable=not progress):
            encoded = encode_texts(hooked.tokenizer, [texts[i] for i in batch], hooked.device)
            cache = hooked.model(input_ids=encoded["input_ids"][:, :-1], attention_mask=encoded["attention_mask"][:, :-1],
                                 position_ids=encoded["position_ids"][:, :-1], use_cache=True,
                                 logits_to_keep=1).past_key_values  # fmt: skip
            index = torch.as_tensor(batch, dtype=torch.long)
            unsteered[index] = last_token(encoded, cache)
            for name, (rows, strengths) in tables.items():
                if not strengths[index].any():
                    steered[name][index] = unsteered[index]
                    continue
                with steer(hooked, layers[name], rows[index], strengths[index], kind):
                    steered[name][index] = last_token(encoded, cache)
    return unsteered, steered


def unsteered_token_scores(
    hooked: HookedModel, texts: Sequence[str], category_set: CategorySet, batch_size: int = 16, progress: bool = False
) -> torch.Tensor:
    """``[N]`` token router scores of ``texts`` on the unsteered model: :func:`token_router_scores` of
    :func:`refusal_token_probabilities` (what the ``probe+token`` router reads beside the probe)."""
    return token_router_scores(
        refusal_token_probabilities(hooked, texts, category_set, batch_size=batch_size, progress=progress))


# ---------------------------------------------------------------------------------------------------
# Routers
# ---------------------------------------------------------------------------------------------------


ROUTING_POLICIES: tuple[str, ...] = ("binary", "abstain", "graded")
"""How a probe router turns its decision score into a route and a strength (see :class:`RoutingPolicy`)."""

_POLICY_PARAMETERS: dict[str, tuple[str, ...]] = {
    "binary": (),
    "abstain": ("low", "high"),
    "graded": ("slope", "intercept"),
}


def _sigmoid(value: float) -> float:
    """The logistic function in float64, without overflow for large ``|value|``."""
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exponential = math.exp(value)
    return exponential / (1.0 + exponential)


@dataclass(frozen=True)
class RoutingPolicy:
    """How a probe router turns each row's decision score into a route and a signed strength.

    Scores are on the router's own decision scale: the probe's logit (``probe.decision_function``) for
    :class:`ProbeRouter`, the ensemble score (``decision_function``) for :class:`ProbeTokenRouter`.
    Build one with :func:`binary_policy`, :func:`abstain_policy` or :func:`graded_policy` (or
    :func:`scripts.pipeline.fit_routing_policy`, which fits one on validation rows).

    Attributes:
        name: One of :data:`ROUTING_POLICIES`:
            ``"binary"`` (the paper): the router's own decision at its threshold, full strength either way;
            ``"abstain"``: toward refusal when ``score >= high``, away when ``score < low``, unsteered
            in between (the row's category is still recorded);
            ``"graded"``: ``p = sigmoid(slope · score + intercept)`` is a calibrated harmful probability;
            ``positive_strength · (2p − 1)`` when ``p >= 0.5``, else ``negative_strength · (1 − 2p)``.
        low, high: The abstain band (``low <= high``); ``None`` for the other policies.
        slope, intercept: The graded calibration; ``None`` for the other policies.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), missing, extra or non-finite
            parameters, or ``low > high``.
    """

    name: str = "binary"
    low: float | None = None
    high: float | None = None
    slope: float | None = None
    intercept: float | None = None

    def __post_init__(self) -> None:
        if self.name not in ROUTING_POLICIES:
            raise ValueError(f"unknown routing policy {self.name!r}; valid: {list(ROUTING_POLICIES)}")
        needed = _POLICY_PARAMETERS[self.name]
        for parameter in ("low", "high", "slope", "intercept"):
            value = getattr(self, parameter)
            if parameter not in needed:
                if value is not None:
                    raise ValueError(f"the {self.name} policy takes no {parameter}, got {value!r}")
                continue
            if value is None or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"the {self.name} policy needs a finite {parameter}, got {value!r}")
            # Stored as float so that to_dict writes the same JSON whether an int or a float was given.
            object.__setattr__(self, parameter, float(value))
        if self.name == "abstain" and self.low > self.high:
            raise ValueError(f"the abstain policy needs low <= high, got low={self.low} > high={self.high}")

    def to_dict(self) -> dict[str, Any]:
        """``{"name", ...its parameters}``, JSON-serialisable; :meth:`from_dict` restores it exactly."""
        parameters = _POLICY_PARAMETERS[self.name]
        return {"name": self.name, **{parameter: getattr(self, parameter) for parameter in parameters}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RoutingPolicy":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: no or an unknown name, or keys the named policy does not take.
        """
        name = data.get("name")
        if name not in ROUTING_POLICIES:
            raise ValueError(f"unknown routing policy {name!r}; valid: {list(ROUTING_POLICIES)}")
        extra = sorted(set(data) - {"name", *_POLICY_PARAMETERS[name]})
        if extra:
            raise ValueError(f"the {name} policy takes {list(_POLICY_PARAMETERS[name])}, got extra keys {extra}")
        return cls(name, **{parameter: data.get(parameter) for parameter in _POLICY_PARAMETERS[name]})

    def decide(
        self, score: float | None, harmful: bool, positive_strength: float, negative_strength: float
    ) -> tuple[str, float, dict[str, float]]:
        """One row's ``(route, signed strength, extra evidence)``.

        Args:
            score: The row's decision score on the router's scale (``binary`` does not read it).
            harmful: The router's own decision at its threshold (what ``binary`` follows, so that its
                routes are exactly those of a router without a policy).
        """
        if self.name == "binary":
            return ("harmful", positive_strength, {}) if harmful else ("benign", negative_strength, {})
        if self.name == "abstain":
            if score >= self.high:
                return "harmful", positive_strength, {}
            if score < self.low:
                return "benign", negative_strength, {}
            return "unsteered", 0.0, {}
        probability = _sigmoid(self.slope * score + self.intercept)
        evidence = {"harmful_probability": probability}
        if probability >= 0.5:
            return "harmful", positive_strength * max(0.0, 2 * probability - 1), evidence
        return "benign", negative_strength * max(0.0, 1 - 2 * probability), evidence


def binary_policy() -> RoutingPolicy:
    """The paper's policy: the router's own decision, full strength toward or away from refusal."""
    return RoutingPolicy("binary")


def abstain_policy(low: float, high: float) -> RoutingPolicy:
    """Toward refusal when ``score >= high``, away when ``score < low``, no steering in between.

    Raises:
        ValueError: ``low > high`` or a bound that is not finite.
    """
    return RoutingPolicy("abstain", low=low, high=high)


def graded_policy(slope: float, intercept: float) -> RoutingPolicy:
    """Strength scaled by the calibrated harmful probability ``p = sigmoid(slope · score + intercept)``.

    ``positive_strength · max(0, 2p − 1)`` (route ``harmful``) when ``p >= 0.5``, else
    ``negative_strength · max(0, 1 − 2p)`` (route ``benign``): full strength only where the router is
    certain, none at ``p = 0.5``.
    """
    return RoutingPolicy("graded", slope=slope, intercept=intercept)


@dataclass(frozen=True)
class Route:
    """One row's routing decision.

    Attributes:
        route: ``"harmful"`` (steer toward refusal), ``"benign"`` (steer away) or ``"unsteered"``.
        category: Category whose vector is used (``None`` when unsteered, except where a probe router's
            policy abstains: the row's most likely category is recorded, though nothing is steered).
        strength: Signed steering strength (0 when unsteered).
        info: Extra JSON-serialisable evidence (probe score, decision score, token probabilities).
    """

    route: str
    category: str | None
    strength: float
    info: Mapping[str, Any] = field(default_factory=dict)

    def decision(self) -> dict[str, Any]:
        """The row's decision record (``routed_category``: ``category`` is a reserved row field of the evaluation)."""
        return {"route": self.route, "routed_category": self.category, "strength": float(self.strength), **self.info}


class Router(Protocol):
    """Decides, for each text, the category vector and signed strength to steer with."""

    name: str
    categories: list[str]

    def route(self, hooked: HookedModel, texts: Sequence[str]) -> list[Route]: ...

    def metadata(self) -> dict[str, Any]: ...


class HarmfulnessProbe(Protocol):
    """What :func:`probe_router` needs of a probe (:class:`scripts.linear_probe.LinearProbe` fits).

    ``predict_category_proba(features) -> [N, C]`` and ``categories`` are needed only with
    ``category_source="probe_head"``.
    """

    threshold: float

    def decision_function(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, d_model]`` → harmful logit ``[N]`` (the scale a :class:`RoutingPolicy` reads)."""
        ...

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, d_model]`` → harmful probability ``[N]``."""
        ...

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, d_model]`` → ``[N]``: 1 where harmful at the probe's own threshold, else 0."""
        ...


@dataclass(frozen=True)
class TokenRouter:
    """Routes by the refusal token the model itself would emit first (see :func:`token_router`)."""

    category_set: CategorySet
    strength: float
    respond_strength: float | None
    batch_size: int
    name: str = "token"

    @property
    def categories(self) -> list[str]:
        return self.category_set.categories

    def route(self, hooked: HookedModel, texts: Sequence[str]) -> list[Route]:
        probabilities = refusal_token_probabilities(hooked, texts, self.category_set, batch_size=self.batch_size)
        categories = self.categories
        routes = []
        for row in probabilities:
            top = int(row.argmax())
            best_category = int(row[:-1].argmax())
            info = {
                "first_token": categories[top] if top < len(categories) else RESPOND,
                "first_token_probability": float(row[top]),
            }
            if top < len(categories):
                routes.append(Route("harmful", categories[top], self.strength, info))
            elif self.respond_strength is None:
                routes.append(Route("unsteered", None, 0.0, info))
            else:
                routes.append(Route("benign", categories[best_category], self.respond_strength, info))
        return routes

    def metadata(self) -> dict[str, Any]:
        return {"router": self.name, "category_set": self.category_set.name, "strength": self.strength,
                "respond_strength": self.respond_strength}


def token_router(
    category_set: CategorySet,
    strength: float = PAPER_POSITIVE_STRENGTH,
    respond_strength: float | None = None,
    batch_size: int = 16,
) -> TokenRouter:
    """The paper's "fixed" categorical steering: the model's own refusal token picks the vector.

    One unsteered forward pass scores the next token at the assistant's first position; the argmax over
    the category tokens and ``[respond]`` decides. A category token steers toward that category with
    ``strength``. For ``[respond]`` the paper's code applies no steering (it looks for a category token
    in the first 16 generated tokens and leaves the prompt unsteered when there is none), which is the
    default ``respond_strength=None``; a number instead steers such rows with that strength along the
    most likely category token's vector (negative: away from refusal).
    """
    return TokenRouter(category_set, float(strength), None if respond_strength is None else float(respond_strength),
                       batch_size)


def _head_probabilities(probe: Any, activations: torch.Tensor, categories: Sequence[str]) -> torch.Tensor:
    names = list(getattr(probe, "categories", None) or [])
    if not names or not hasattr(probe, "predict_category_proba"):
        raise ValueError("category_source='probe_head' needs a probe with a category head (predict_category_proba)")
    if names != list(categories):
        raise KeyError(f"the probe's category head covers {names}, the category set has {list(categories)}")
    return torch.as_tensor(probe.predict_category_proba(activations)).detach().float().cpu()


def signed_routes(
    categories: Sequence[str],
    scores: torch.Tensor,
    harmful: torch.Tensor,
    category_probabilities: torch.Tensor,
    positive_strength: float,
    negative_strength: float,
    router_scores: torch.Tensor | None = None,
    policy: RoutingPolicy | None = None,
) -> list[Route]:
    """Each row's route and strength by ``policy``, with its most likely category's vector.

    Under the default binary policy, harmful rows go toward refusal and the others away, at full strength.

    Args:
        scores: ``[N]`` the router's harmfulness scores (recorded as ``probe_score``).
        harmful: ``[N]`` bool decisions at the router's own threshold.
        category_probabilities: ``[N, C]`` over ``categories``; the argmax picks each row's vector.
        router_scores: ``[N]`` decision scores the policy reads (recorded as ``router_score``); may be
            left out only under the binary policy.
        policy: ``None``: :func:`binary_policy`.

    Raises:
        ValueError: a policy other than binary without ``router_scores``.
    """
    policy = policy or binary_policy()
    if router_scores is None and policy.name != "binary":
        raise ValueError(f"the {policy.name} routing policy needs the router's decision scores")
    decision_scores = [None] * len(harmful) if router_scores is None else router_scores.tolist()
    best = category_probabilities.argmax(dim=-1)
    routes = []
    for score, decision_score, is_harmful, index, row in zip(
        scores.tolist(), decision_scores, harmful.tolist(), best.tolist(), category_probabilities
    ):
        info = {"probe_score": float(score), "category_probability": float(row[index])}
        if decision_score is not None:
            info["router_score"] = float(decision_score)
        route, strength, evidence = policy.decide(decision_score, bool(is_harmful), positive_strength,
                                                  negative_strength)  # fmt: skip
        routes.append(Route(route, categories[index], strength, {**info, **evidence}))
    return routes


@dataclass(frozen=True)
class ProbeRouter:
    """Routes by a harmful-vs-benign probe on the last prompt position (see :func:`probe_router`)."""

    probe: HarmfulnessProbe
    layer: int
    category_set: CategorySet
    positive_strength: float
    negative_strength: float
    category_source: str
    kind: str
    batch_size: int
    name: str = "probe"
    policy: RoutingPolicy = field(default_factory=binary_policy)
    reads_first_token: ClassVar[bool] = False
    """Whether the decision reads the refusal-token distribution (a full forward pass, not a truncated one)."""

    @property
    def categories(self) -> list[str]:
        return self.category_set.categories

    def route(self, hooked: HookedModel, texts: Sequence[str]) -> list[Route]:
        probabilities = None
        if self.category_source == "token" or self.reads_first_token:
            probabilities, cached = token_probabilities_and_activations(hooked, texts, self.category_set, [self.layer],
                                                                        self.kind, batch_size=self.batch_size)  # fmt: skip
        else:
            cached = cache_activations(hooked, texts, self.layer, self.kind, batch_size=self.batch_size, progress=False)
        activations = cached.layer(cached.layers[0])
        return self.route_features(activations, probabilities)

    def route_features(self, activations: torch.Tensor, probabilities: torch.Tensor | None) -> list[Route]:
        """The routes :meth:`route` gives for rows whose features are already computed.

        Args:
            activations: ``[N, d_model]`` last-prompt-position activations at ``layer`` (``kind``).
            probabilities: ``[N, C + 1]`` unsteered refusal-token probabilities
                (:func:`refusal_token_probabilities`); needed with ``category_source="token"`` and by
                routers that read the first token, else ignored.

        Raises:
            ValueError: ``probabilities`` missing where needed, or the probe's outputs not ``[N]``.
        """
        if (self.category_source == "token" or self.reads_first_token) and probabilities is None:
            raise ValueError(f"router {self.name!r} with category source {self.category_source!r} reads the "
                             "refusal-token probabilities of the rows")
        category_probabilities = (probabilities[:, :-1] if self.category_source == "token"
                                  else _head_probabilities(self.probe, activations, self.categories))  # fmt: skip
        scores, router_scores, harmful = self._decide(activations, probabilities)
        rows = activations.shape[0]
        if {scores.shape, router_scores.shape, harmful.shape} != {(rows,)}:
            raise ValueError(
                f"the probe returned scores {tuple(scores.shape)}, decision scores {tuple(router_scores.shape)} "
                f"and decisions {tuple(harmful.shape)} for {rows} rows; expected [N] each"
            )
        return signed_routes(self.categories, scores, harmful, category_probabilities, self.positive_strength,
                              self.negative_strength, router_scores, self.policy)  # fmt: skip

    def _decide(
        self, activations: torch.Tensor, probabilities: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``([N] recorded scores, [N] decision scores, [N] bool harmful)``.

        ``probabilities`` ``[N, C + 1]`` is for routers that read it. The recorded score is the probe's
        probability (``probe_score``), the decision score its logit (what a policy reads).
        """
        # The decision is the probe's own (it may threshold logits, which do not saturate like probabilities).
        scores = torch.as_tensor(self.probe.predict_proba(activations)).detach().float().cpu()
        logits = torch.as_tensor(self.probe.decision_function(activations)).detach().cpu()
        harmful = torch.as_tensor(self.probe.predict(activations)).detach().cpu().bool()
        return scores, logits, harmful

    def metadata(self) -> dict[str, Any]:
        return {"router": self.name, "layer": self.layer, "hook": f"blocks.{self.layer}.hook_{self.kind}",
                "probe_threshold": float(self.probe.threshold), "probe_sha256": tensor_fingerprint(self.probe),
                "positive_strength": self.positive_strength, "negative_strength": self.negative_strength,
                "category_source": self.category_source, "category_set": self.category_set.name,
                "policy": self.policy.to_dict()}


def probe_router(
    probe: HarmfulnessProbe,
    layer: int | None,
    category_set: CategorySet,
    positive_strength: float = PAPER_POSITIVE_STRENGTH,
    negative_strength: float = PAPER_NEGATIVE_STRENGTH,
    category_source: str = "token",
    kind: str | None = None,
    batch_size: int = 16,
    policy: RoutingPolicy | None = None,
) -> ProbeRouter:
    """The paper's probe-routed categorical steering.

    One forward pass reads the last prompt position at ``layer``; rows the probe calls harmful (at its
    own threshold, ``probe.predict``) are steered toward refusal with their category's vector and
    ``positive_strength`` (paper +4), the others away from it with ``negative_strength`` (paper −6).
    Another ``policy`` reads the probe's logit instead (:class:`RoutingPolicy`).

    Args:
        layer: Layer the probe reads; ``None`` takes the probe's own ``layer`` attribute.
        category_source: ``"token"`` (the paper): the category whose refusal token is most likely at the
            assistant's first position, for harmful and benign rows alike; ``"probe_head"``: the argmax
            of the probe's category head (``predict_category_proba``; its ``categories`` must be the set's).
        kind: Hook kind the probe reads; ``None`` takes the probe's ``hook_kind`` (default ``resid_post``).
        policy: ``None``: :func:`binary_policy` (the paper's).

    Raises:
        ValueError: an unknown ``category_source``, no layer, or a layer/kind that contradicts the probe's.
    """
    if category_source not in CATEGORY_SOURCES:
        raise ValueError(f"unknown category_source {category_source!r}; valid: {list(CATEGORY_SOURCES)}")
    probe_layer, probe_kind = getattr(probe, "layer", None), getattr(probe, "hook_kind", None)
    if layer is None and probe_layer is None:
        raise ValueError("no layer given and the probe does not record one")
    if layer is not None and probe_layer is not None and layer != probe_layer:
        raise ValueError(f"the probe was trained on layer {probe_layer}, not {layer}")
    if kind is not None and probe_kind is not None and kind != probe_kind:
        raise ValueError(f"the probe was trained on hook kind {probe_kind!r}, not {kind!r}")
    return ProbeRouter(probe, probe_layer if layer is None else layer, category_set, float(positive_strength),
                       float(negative_strength), category_source, kind or probe_kind or DEFAULT_KIND, batch_size,
                       policy=policy or binary_policy())  # fmt: skip


class ProbeTokenScorer(Protocol):
    """What :func:`probe_token_router` needs (:class:`scripts.linear_probe.ProbeTokenEnsemble` fits)."""

    layer: int | None
    hook_kind: str | None
    categories: list[str]

    def decision_function(self, features: torch.Tensor, token_scores: torch.Tensor) -> torch.Tensor:
        """``[N, d_model]`` activations and ``[N]`` token scores → ``[N]`` scores, higher = more harmful."""
        ...

    def predict(self, features: torch.Tensor, token_scores: torch.Tensor) -> torch.Tensor:
        """``[N]``: 1 where harmful at the scorer's own threshold, else 0."""
        ...


@dataclass(frozen=True)
class ProbeTokenRouter(ProbeRouter):
    """Routes by a probe averaged with the model's refusal-token score (see :func:`probe_token_router`).

    ``probe`` is the :class:`ProbeTokenScorer` (e.g. a :class:`scripts.linear_probe.ProbeTokenEnsemble`).
    """

    probe: ProbeTokenScorer
    name: str = "probe+token"
    reads_first_token: ClassVar[bool] = True

    def _decide(
        self, activations: torch.Tensor, probabilities: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ensemble score is both the recorded score and the decision score."""
        token_scores = token_router_scores(probabilities)
        scores = torch.as_tensor(self.probe.decision_function(activations, token_scores)).detach().cpu()
        harmful = torch.as_tensor(self.probe.predict(activations, token_scores)).detach().cpu().bool()
        return scores, scores, harmful

    def metadata(self) -> dict[str, Any]:
        return {"router": self.name, "layer": self.layer, "hook": f"blocks.{self.layer}.hook_{self.kind}",
                "threshold": float(getattr(self.probe, "threshold", float("nan"))),
                "ensemble_sha256": tensor_fingerprint(self.probe),
                "positive_strength": self.positive_strength, "negative_strength": self.negative_strength,
                "category_source": self.category_source, "category_set": self.category_set.name,
                "policy": self.policy.to_dict()}  # fmt: skip


def probe_token_router(
    ensemble: ProbeTokenScorer,
    category_set: CategorySet,
    positive_strength: float = PAPER_POSITIVE_STRENGTH,
    negative_strength: float = PAPER_NEGATIVE_STRENGTH,
    category_source: str = "token",
    batch_size: int = 16,
    policy: RoutingPolicy | None = None,
) -> ProbeTokenRouter:
    """Probe-routed steering whose harmful/benign decision also weighs the model's own first token.

    One full forward pass per batch gives both inputs of the ensemble
    (:class:`scripts.linear_probe.ProbeTokenEnsemble`): the last prompt position at the probe's layer
    and the refusal-token distribution at the assistant's first position (:func:`token_router_scores`).
    Rows the ensemble calls harmful (at its own threshold) are steered toward refusal with
    ``positive_strength``, the others away with ``negative_strength``; the category is picked as in
    :func:`probe_router`. Another ``policy`` (default :func:`binary_policy`) reads the ensemble score instead.

    Raises:
        ValueError: an unknown ``category_source``, or an ensemble whose probe records no layer.
    """
    if category_source not in CATEGORY_SOURCES:
        raise ValueError(f"unknown category_source {category_source!r}; valid: {list(CATEGORY_SOURCES)}")
    if ensemble.layer is None:
        raise ValueError("the ensemble's probe does not record its layer")
    return ProbeTokenRouter(ensemble, int(ensemble.layer), category_set, float(positive_strength),
                            float(negative_strength), category_source, ensemble.hook_kind or DEFAULT_KIND,
                            batch_size, policy=policy or binary_policy())  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------------


@dataclass
class SteeringPlan:
    """What a condition decided for a list of prompts.

    Attributes:
        batch_hook: Passed to :func:`scripts.model.generate_ids` (``None``: no hooks at all).
        decisions: One JSON-serialisable dict per row, e.g. ``{"route": "harmful", "routed_category":
            ..., "strength": 4.0, "probe_score": 0.93, "router_score": 2.6}``.
        metadata: Condition-level settings (layer, hook, strengths, router, vector norms).
        prompt_prefix_unchanged: The hooks leave every prompt position but the last as the unsteered
            model computes it, so generation may run the prefix the rows share once
            (``generate_ids(reuse_prefix=True)``). ``False`` unless a plan says so.
    """

    batch_hook: BatchHookFactory | None
    decisions: list[dict]
    metadata: dict
    prompt_prefix_unchanged: bool = False


class Condition(Protocol):
    """A steering condition: a name and a per-prompt plan."""

    name: str

    def plan(self, hooked: HookedModel, prompts: Sequence[str], texts: Sequence[str]) -> SteeringPlan: ...


Planner = Callable[[HookedModel, Sequence[str]], SteeringPlan]


@dataclass(frozen=True)
class PlannedCondition:
    """A :class:`Condition` whose plan is computed by ``planner(hooked, texts)``."""

    name: str
    planner: Planner

    def plan(self, hooked: HookedModel, prompts: Sequence[str], texts: Sequence[str]) -> SteeringPlan:
        if len(prompts) != len(texts):
            raise ValueError(f"{len(prompts)} prompts but {len(texts)} texts")
        plan = self.planner(hooked, texts)
        plan.metadata = {"condition": self.name, **plan.metadata}
        return plan


def _vector_table(vectors: VectorSource, layer: int, kind: str) -> tuple[list[str], torch.Tensor]:
    """Category names and their vectors stacked as ``[n_categories, d_model]`` float32.

    A :class:`~scripts.steering_vectors.SteeringVectors` made at another hook point than the one steered
    is allowed (cross-layer experiments) but logged.
    """
    mapping = getattr(vectors, "vectors", vectors)
    if not mapping:
        raise ValueError("no steering vectors given")
    source = (getattr(vectors, "layer", layer), getattr(vectors, "hook_kind", kind))
    if source != (layer, kind):
        logger.warning("steering at layer %d (%s) with vectors computed at layer %d (%s)", layer, kind, *source)
    names = list(mapping)
    shapes = {tuple(torch.as_tensor(mapping[name]).shape) for name in names}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"steering vectors must all be [d_model], got shapes {sorted(shapes)}")
    return names, torch.stack([torch.as_tensor(mapping[name]).float() for name in names])


def _steering_metadata(hooked: HookedModel, layer: int, kind: str, positions: str) -> dict[str, Any]:
    return {"layer": layer, "hook": hooked.hook_name(layer, kind), "positions": positions}


def baseline(name: str = "baseline") -> PlannedCondition:
    """No steering: every row unsteered (strength 0), no hooks installed."""

    def planner(hooked: HookedModel, texts: Sequence[str]) -> SteeringPlan:
        decisions = [Route("unsteered", None, 0.0).decision() for _ in texts]
        return SteeringPlan(None, decisions, {"steering": None}, prompt_prefix_unchanged=True)

    return PlannedCondition(name, planner)


def fixed_category(
    vectors: VectorSource,
    strength: float,
    category: str,
    layer: int,
    kind: str = DEFAULT_KIND,
    positions: str = DEFAULT_POSITIONS,
    name: str | None = None,
) -> PlannedCondition:
    """Steer every row with ``category``'s vector at ``strength`` (positive: toward refusal)."""
    names, table = _vector_table(vectors, layer, kind)
    if category not in names:
        raise KeyError(f"unknown category {category!r}; valid categories: {names}")
    check_positions(positions)
    route = Route("harmful" if strength > 0 else "benign" if strength < 0 else "unsteered",
                  category, float(strength))

    def planner(hooked: HookedModel, texts: Sequence[str]) -> SteeringPlan:
        rows = table[names.index(category)].expand(len(texts), -1)
        hook = per_row_batch_hook(hooked, layer, rows, torch.full((len(texts),), float(strength)), kind, positions)
        metadata = {"steering": "fixed_category", "category": category, "strength": float(strength),
                    "vector_sha256": tensor_fingerprint(table[names.index(category)]),
                    **_steering_metadata(hooked, layer, kind, positions)}
        return SteeringPlan(hook, [route.decision() for _ in texts], metadata,
                            prompt_prefix_unchanged=positions != "all")

    return PlannedCondition(name or f"fixed_{category}_{strength:+g}", planner)


def categorical(
    vectors: VectorSource,
    router: Router,
    layer: int,
    kind: str = DEFAULT_KIND,
    positions: str = DEFAULT_POSITIONS,
    name: str | None = None,
) -> PlannedCondition:
    """Per-row categorical steering: the router picks each row's category vector and signed strength.

    Raises:
        KeyError: the vectors' categories differ from the router's.
    """
    names, table = _vector_table(vectors, layer, kind)
    if set(names) != set(router.categories):
        raise KeyError(f"steering vectors cover {sorted(names)} but the router routes to {sorted(router.categories)}")
    check_positions(positions)

    def planner(hooked: HookedModel, texts: Sequence[str]) -> SteeringPlan:
        routes = router.route(hooked, texts)
        rows = torch.zeros(len(texts), table.shape[1])
        strengths = torch.zeros(len(texts))
        for index, route in enumerate(routes):
            if route.category is not None and route.strength != 0:
                rows[index] = table[names.index(route.category)]
                strengths[index] = route.strength
        metadata = {"steering": "categorical", "router": router.metadata(),
                    "vector_norms": {n: float(v.norm()) for n, v in zip(names, table)},
                    "vector_sha256": tensor_fingerprint(table),
                    **_steering_metadata(hooked, layer, kind, positions)}
        hook = per_row_batch_hook(hooked, layer, rows, strengths, kind, positions)
        return SteeringPlan(hook, [route.decision() for route in routes], metadata,
                            prompt_prefix_unchanged=positions != "all")

    return PlannedCondition(name or f"categorical_{router.name}", planner)


def low_rank_combination(
    operator: nn.Module,
    layer: int,
    strength: float = 1.0,
    router: Router | None = None,
    kind: str = DEFAULT_KIND,
    positions: str = "prompt",
    name: str | None = None,
) -> PlannedCondition:
    """Steer with a learned operator: each steered position gets ``strength · operator(z)``, ``z`` its own activation.

    By default only the last prompt position is steered (``positions="prompt"``), the one position the
    operator was trained on (:mod:`scripts.train_low_rank_combination_steering`): generated tokens read
    it through the KV cache. Applied to generated positions too, the untrained operator's output there
    (their activations lie far from the prompt-position mean it centres on) degrades the text.

    Args:
        operator: e.g. :class:`scripts.low_rank_combination_steering.LowRankCombinationSteering`.
        strength: Strength for every row when ``router`` is ``None`` (the paper's setting).
        router: Optional: each row's strength is then the router's signed strength (its category is
            ignored: the operator mixes all category directions itself).
    """
    check_positions(positions)

    def planner(hooked: HookedModel, texts: Sequence[str]) -> SteeringPlan:
        if router is None:
            routes = [Route("low_rank", None, float(strength)) for _ in texts]
        else:
            routes = [Route(r.route, None, r.strength, r.info) for r in router.route(hooked, texts)]
        strengths = torch.tensor([route.strength for route in routes], dtype=torch.float32)
        metadata = {"steering": "low_rank_combination", "strength": float(strength),
                    "router": None if router is None else router.metadata(),
                    "operator": getattr(operator, "describe", lambda: type(operator).__name__)(),
                    "operator_sha256": tensor_fingerprint(operator),
                    **_steering_metadata(hooked, layer, kind, positions)}
        hook = operator_batch_hook(hooked, layer, operator, strengths, kind, positions)
        return SteeringPlan(hook, [route.decision() for route in routes], metadata,
                            prompt_prefix_unchanged=positions != "all")

    return PlannedCondition(name or "low_rank_combination", planner)
