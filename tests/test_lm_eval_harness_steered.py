"""Tests of scripts.lm_eval_harness_steered on tiny local lm-eval tasks (tests/fixtures/lm_eval), fully offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from scripts.hooked_model import HookedModel, wrap_model
from scripts.lm_eval_harness_steered import (
    MODEL_NAME,
    SteeredHFLM,
    evaluate_steered,
    hook_steering,
    operator_steering,
    vector_steering,
)
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES, add_refusal_tokens
from tests.tiny import build_tiny_model, build_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = REPO_ROOT / "tests" / "fixtures" / "lm_eval"
MC_TASK = "tiny_refusal_mc"
GEN_TASK = "tiny_refusal_gen"
LAYER = 1


@pytest.fixture(scope="module")
def hooked() -> HookedModel:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    add_refusal_tokens(tokenizer, DONOTANSWER_CATEGORIES, model=model)
    return wrap_model(model, tokenizer)


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


@pytest.fixture(scope="module")
def vector(hooked) -> torch.Tensor:
    return torch.randn(hooked.d_model, generator=torch.Generator().manual_seed(0))


def _evaluate(hooked, steering, task_manager, tasks=(MC_TASK,)):
    # The task's data_files path is relative to the repository root.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO_ROOT)
        return evaluate_steered(
            hooked, steering, list(tasks), task_manager=task_manager, log_samples=True, batch_size=4
        )


def _loglikelihoods(results, task: str = MC_TASK) -> list[list[float]]:
    return [[ll for ll, _ in sample["filtered_resps"]] for sample in results["samples"][task]]


@pytest.fixture(scope="module")
def unsteered(hooked, task_manager):
    return _evaluate(hooked, None, task_manager, tasks=(MC_TASK, GEN_TASK))


def _by_hand_loglikelihood(
    hooked: HookedModel, context: str, continuation: str, delta: torch.Tensor | None, logit_scale: float = 1.0
) -> float:
    """Sum of log-probabilities of the continuation's tokens (``delta`` added at each LAYER position; logits scaled)."""
    tokenizer = hooked.tokenizer
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    continuation_ids = whole[len(context_ids) :]

    def add(act, hook):
        return act + delta

    hooks = [(hooked.hook_name(LAYER), add)] if delta is not None else []
    with torch.no_grad(), hooked.hooks(hooks):
        logits = hooked.model(torch.tensor([whole])).logits[0]
    log_probs = torch.log_softmax(logit_scale * logits.double(), dim=-1)
    start = len(context_ids)
    return float(sum(log_probs[start - 1 + i, token] for i, token in enumerate(continuation_ids)))


def test_results_have_the_metric_and_match_a_hand_computation(hooked, unsteered):
    metrics = unsteered["results"][MC_TASK]
    assert 0.0 <= metrics["acc,none"] <= 1.0
    assert "exact_match,none" in unsteered["results"][GEN_TASK]
    sample = unsteered["samples"][MC_TASK][0]
    for (context, continuation), (ll, _) in zip(sample["arguments"], sample["filtered_resps"]):
        assert ll == pytest.approx(_by_hand_loglikelihood(hooked, context, continuation, None), abs=1e-4)


def test_vector_steering_changes_loglikelihoods_as_computed_by_hand(hooked, task_manager, unsteered, vector):
    steered = _evaluate(hooked, vector_steering(hooked, LAYER, vector, strength=8.0), task_manager)
    before, after = _loglikelihoods(unsteered), _loglikelihoods(steered)
    assert max(abs(a - b) for row_a, row_b in zip(before, after) for a, b in zip(row_a, row_b)) > 0.5
    sample = steered["samples"][MC_TASK][2]
    for (context, continuation), (ll, _) in zip(sample["arguments"], sample["filtered_resps"]):
        assert ll == pytest.approx(_by_hand_loglikelihood(hooked, context, continuation, 8.0 * vector), abs=1e-4)


def test_zero_strength_equals_unsteered_exactly(hooked, task_manager, unsteered, vector):
    zero = _evaluate(hooked, vector_steering(hooked, LAYER, vector, strength=0.0), task_manager, (MC_TASK, GEN_TASK))
    assert _loglikelihoods(zero) == _loglikelihoods(unsteered)
    assert zero["results"][MC_TASK]["acc,none"] == unsteered["results"][MC_TASK]["acc,none"]
    assert [s["resps"] for s in zero["samples"][GEN_TASK]] == [s["resps"] for s in unsteered["samples"][GEN_TASK]]


def test_generate_until_is_steered(hooked, task_manager, unsteered, vector):
    steered = _evaluate(hooked, vector_steering(hooked, LAYER, vector, strength=30.0), task_manager, (GEN_TASK,))
    plain = [s["resps"] for s in unsteered["samples"][GEN_TASK]]
    assert [s["resps"] for s in steered["samples"][GEN_TASK]] != plain


class Rank1(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(2)
        self.down = nn.Parameter(torch.randn(d_model, 1, generator=generator))
        self.up = nn.Parameter(torch.randn(d_model, 1, generator=generator))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.down) @ self.up.T


def test_operator_and_hook_steering(hooked, task_manager, unsteered):
    operator = Rank1(hooked.d_model)
    steered = _evaluate(hooked, operator_steering(hooked, LAYER, operator, strength=2.0), task_manager)
    assert _loglikelihoods(steered) != _loglikelihoods(unsteered)

    # A hook list is accepted as steering: halving the logits is a temperature of 2.
    def halve(logits, hook):
        return 0.5 * logits

    halved = _evaluate(hooked, [("unembed.hook_out", halve)], task_manager)
    sample = halved["samples"][MC_TASK][1]
    for (context, continuation), (ll, _) in zip(sample["arguments"], sample["filtered_resps"]):
        assert ll == pytest.approx(_by_hand_loglikelihood(hooked, context, continuation, None, 0.5), abs=1e-4)
    assert _loglikelihoods(halved) != _loglikelihoods(unsteered)
    with pytest.raises(KeyError, match="unknown hook point"):
        hook_steering(hooked, [("blocks.0.hook_nothing", halve)])


def test_registration_and_argument_checks(hooked, vector):
    from lm_eval.api.registry import get_model

    assert get_model(MODEL_NAME) is SteeredHFLM
    with pytest.raises(ValueError, match="d_model=64"):
        vector_steering(hooked, LAYER, torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="out of range"):
        vector_steering(hooked, 9, vector, 1.0)
    with pytest.raises(ValueError, match="unknown positions mode"):
        vector_steering(hooked, LAYER, vector, 1.0, positions="first")


@pytest.mark.offline_model
def test_real_smollm2_on_the_tiny_task(task_manager):
    from scripts.hooked_model import load_hooked_model

    real = load_hooked_model("smollm2-135m-instruct")
    plain = _evaluate(real, None, task_manager)
    assert plain["results"][MC_TASK]["acc,none"] >= 0.5  # the answers are easy for an instruct model
    direction = torch.randn(real.d_model, generator=torch.Generator().manual_seed(0))
    steered = _evaluate(real, vector_steering(real, 15, direction / direction.norm(), 40.0), task_manager)
    assert _loglikelihoods(steered) != _loglikelihoods(plain)
