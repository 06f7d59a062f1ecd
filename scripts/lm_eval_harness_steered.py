"""Capability benchmarks under steering: an lm-evaluation-harness model that runs an already-loaded model with hooks.

:class:`SteeredHFLM` (registered as ``hf-steered``) is lm-eval's ``HFLM`` built from a loaded model and
tokenizer; every forward pass it makes for ``loglikelihood`` (``_model_call``) and every generation for
``generate_until`` (``_model_generate``) runs inside a steering context. :func:`evaluate_steered` wraps
``lm_eval.simple_evaluate`` around it.

What is supported. lm-eval batches unrelated requests and gives the model no prompt identity, so the
per-row routing of a :class:`scripts.steering.Condition` (token or probe router) cannot be reproduced
here. Steering is one fixed intervention for every request:

* :func:`vector_steering` — ``strength · vector`` at one layer (e.g. one category's vector);
* :func:`operator_steering` — ``strength · operator(z)`` (the learned low-rank combination);
* :func:`hook_steering` — any list of TransformerLens hooks (e.g. ``scripts.logit_bias.logit_bias_hook``).

Vector and operator steering default to ``positions="all"``: lm-eval right-pads loglikelihood batches,
so "the last position of each call" would often be padding; steering every position is the usual setting
for benchmark evaluation. lm-eval is imported only with this module.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager, Sequence

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch import nn

from scripts.hooked_model import HookedModel, HookFunction

logger = logging.getLogger(__name__)

MODEL_NAME = "hf-steered"
"""Registry name of :class:`SteeredHFLM` in lm-eval."""

SteeringContext = Callable[[], ContextManager[object]]
"""Zero-argument factory returning the context manager that installs the steering hooks for one call."""


@register_model(MODEL_NAME)
class SteeredHFLM(HFLM):
    """lm-eval's ``HFLM`` on an already-loaded model, with a steering context around every forward and generation.

    Args:
        pretrained: A loaded ``transformers.PreTrainedModel`` (or a name/path, as for ``HFLM``).
        tokenizer: Its tokenizer.
        steering: Factory of the steering context (``None``: unsteered, identical to ``HFLM``).
        **kwargs: Passed to ``HFLM`` (``batch_size``, ``max_length``, ``device`` …).
    """

    def __init__(self, pretrained: Any, tokenizer: Any = None, steering: SteeringContext | None = None, **kwargs: Any):
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        self.steering = steering

    def steering_context(self) -> ContextManager[object]:
        """The context active during one model call (a null context when unsteered)."""
        return self.steering() if self.steering is not None else contextlib.nullcontext()

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``HFLM._model_call`` (logits ``[batch, seq, vocab]`` of ``inps [batch, seq]``) under steering."""
        with self.steering_context():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any):
        """``HFLM._model_generate`` (token ids ``[batch, seq]``) under steering."""
        with self.steering_context():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def hook_steering(hooked: HookedModel, fwd_hooks: Sequence[tuple[str, HookFunction]]) -> SteeringContext:
    """Steering by a fixed list of TransformerLens hooks ``(hook name, fn(activation, hook))``."""
    fwd_hooks = list(fwd_hooks)
    for name, _ in fwd_hooks:
        if name not in hooked.bridge.hook_dict:
            raise KeyError(f"unknown hook point {name!r} (e.g. {hooked.hook_name(0)!r})")
    return lambda: hooked.hooks(fwd_hooks)


def vector_steering(
    hooked: HookedModel,
    layer: int,
    vector: torch.Tensor,
    strength: float,
    kind: str = "resid_post",
    positions: str = "all",
) -> SteeringContext:
    """Steering by ``strength · vector`` (``[d_model]``) at ``blocks.{layer}.hook_{kind}`` for every request.

    Raises:
        ValueError: ``vector`` is not ``[d_model]`` of this model, or ``positions`` is unknown.
    """
    from scripts.steering import check_positions, steer

    if vector.ndim != 1 or vector.shape[0] != hooked.d_model:
        raise ValueError(f"vector must be [d_model={hooked.d_model}], got shape {tuple(vector.shape)}")
    hooked.hook_name(layer, kind)
    check_positions(positions)
    return lambda: steer(hooked, layer, vector, float(strength), kind, positions)


def operator_steering(
    hooked: HookedModel,
    layer: int,
    operator: nn.Module,
    strength: float = 1.0,
    kind: str = "resid_post",
    positions: str = "all",
) -> SteeringContext:
    """Steering by ``strength · operator(z)`` at ``blocks.{layer}.hook_{kind}`` (the low-rank combination)."""
    from scripts.steering import check_positions, steer_with_operator

    hooked.hook_name(layer, kind)
    check_positions(positions)
    return lambda: steer_with_operator(hooked, layer, operator, float(strength), kind, positions)


def _as_context(hooked: HookedModel, steering: SteeringContext | Sequence[tuple[str, HookFunction]] | None):
    if steering is None or callable(steering):
        return steering
    return hook_steering(hooked, steering)


def steered_lm(
    hooked: HookedModel,
    steering: SteeringContext | Sequence[tuple[str, HookFunction]] | None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> SteeredHFLM:
    """A :class:`SteeredHFLM` on ``hooked``'s model and tokenizer.

    Args:
        steering: A steering-context factory, a hook list, or ``None`` (unsteered).
        batch_size: lm-eval batch size.
        max_length: Context length limit (default: from the model config).
    """
    return SteeredHFLM(
        pretrained=hooked.model,
        tokenizer=hooked.tokenizer,
        steering=_as_context(hooked, steering),
        batch_size=batch_size,
        max_length=max_length,
    )


def evaluate_steered(
    hooked: HookedModel,
    steering: SteeringContext | Sequence[tuple[str, HookFunction]] | None,
    tasks: Sequence[str],
    limit: int | float | None = None,
    include_path: str | None = None,
    task_manager: Any = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    seed: int = 0,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval tasks on ``hooked`` under one fixed steering intervention.

    Args:
        steering: A factory from :func:`vector_steering` / :func:`operator_steering` / :func:`hook_steering`,
            a hook list, or ``None`` for the unsteered baseline.
        tasks: lm-eval task names.
        limit: At most this many documents per task (a fraction when < 1).
        include_path: Extra directory of task YAML files (ignored when ``task_manager`` is given).
        task_manager: An ``lm_eval.tasks.TaskManager`` to reuse (building one scans every task YAML).
        batch_size: lm-eval batch size.
        num_fewshot: Few-shot examples per prompt.
        log_samples: Keep per-document results (``results["samples"]``: responses and loglikelihoods).
        seed: Seeds lm-eval's Python, numpy, torch and few-shot sampling.
        **simple_evaluate_kwargs: Passed to ``lm_eval.simple_evaluate`` (e.g. ``apply_chat_template``).

    Returns:
        lm-eval's results dict: ``results[task]["<metric>,<filter>"]``, ``configs``, ``samples`` …
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if task_manager is None:
        task_manager = TaskManager(include_path=include_path)
    results = lm_eval.simple_evaluate(
        model=steered_lm(hooked, steering, batch_size=batch_size),
        tasks=list(tasks),
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=task_manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        **simple_evaluate_kwargs,
    )
    if results is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results (is this a non-zero distributed rank?)")
    logger.info("lm-eval results: %s", {task: metrics for task, metrics in results["results"].items()})
    return results
