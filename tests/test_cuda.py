"""The method's steps on a CUDA device agree with the same steps on the CPU (tiny random Llama, Qwen2, Gemma3).

Skipped without a GPU. Each test runs one step twice, on a CPU copy and a CUDA copy of the same model,
with inputs created on the CPU as a user would (vectors, probes and operators built from cached CPU
activations), and compares the results: float32 throughout, so they agree to rounding.
``SECOND_TEST_DEVICE=cpu`` runs the same comparisons with a second CPU copy, to check the tests
themselves on a machine without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from scripts.activation_caching import cache_activations
from scripts.generalization import FoldSettings, fold_steering_condition, held_out_source_splits
from scripts.layer_selection import best_strengths, sweep_layers
from scripts.linear_probe import LinearProbe
from scripts.low_rank_combination import fit_whitening, steering_basis
from scripts.low_rank_combination_steering import LowRankCombinationSteering
from scripts.model import format_chat, generate_ids
from scripts.records import PromptRecord
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES as CATEGORIES
from scripts.steering import (
    PAPER_NEGATIVE_STRENGTH,
    PAPER_POSITIVE_STRENGTH,
    ROUTINGS,
    per_row_batch_hook,
    probe_router,
    refusal_token_probabilities,
    steer,
    token_router_scores,
)
from scripts.train_low_rank_combination_steering import TrainingConfig, train_low_rank_combination
from tests.tiny import FAMILIES
from tests.tiny_steering import PROMPTS, build_hooked_tiny, tiny_texts

DEVICE = os.environ.get("SECOND_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LAYER = 2
HARMFUL = (PROMPTS[1], PROMPTS[3])
BENIGN = (PROMPTS[0], PROMPTS[2], PROMPTS[4])


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """The same tiny hooked model of each family on the CPU and on CUDA."""
    cpu, second = build_hooked_tiny(family=request.param), build_hooked_tiny(family=request.param)  # seeded: same weights
    second.bridge.to(DEVICE)
    second.model.to(DEVICE)
    return cpu, second


def _vectors(hooked) -> torch.Tensor:
    """``[n_categories, d_model]`` unit vectors along the refusal tokens' unembeddings, on the CPU."""
    weight = hooked.model.get_output_embeddings().weight.detach().cpu()
    ids = CATEGORIES.token_ids(hooked.tokenizer)
    rows = torch.stack([weight[ids[c]] for c in CATEGORIES.categories])
    return rows / rows.norm(dim=-1, keepdim=True)


def test_the_second_copy_runs_on_the_device(pair):
    _, gpu = pair
    assert gpu.device.type == DEVICE


def test_cached_activations_agree(pair):
    cpu, gpu = pair
    texts = tiny_texts(cpu)
    on_cpu = cache_activations(cpu, texts, [1, LAYER], batch_size=2, progress=False)
    on_gpu = cache_activations(gpu, texts, [1, LAYER], batch_size=2, progress=False)
    for layer in (1, LAYER):
        assert on_gpu.layer(layer).device.type == "cpu"
        torch.testing.assert_close(on_gpu.layer(layer), on_cpu.layer(layer), atol=1e-4, rtol=1e-4)


def test_steered_refusal_probabilities_agree_and_move(pair):
    cpu, gpu = pair
    texts = tiny_texts(cpu)
    vectors = _vectors(cpu)[torch.arange(len(texts)) % len(CATEGORIES.categories)]
    strengths = torch.full((len(texts),), 3.0)
    results = []
    for hooked in (cpu, gpu):
        hook = per_row_batch_hook(hooked, LAYER, vectors, strengths)
        results.append(refusal_token_probabilities(hooked, texts, CATEGORIES, hook, batch_size=2))
    torch.testing.assert_close(results[1].cpu(), results[0].cpu(), atol=1e-5, rtol=1e-4)
    unsteered = refusal_token_probabilities(gpu, texts, CATEGORIES, batch_size=2).cpu()
    assert (results[1].cpu()[:, :-1].sum(-1) - unsteered[:, :-1].sum(-1)).abs().max() > 1e-3


def test_steered_batched_generation_agrees(pair):
    cpu, gpu = pair
    texts = tiny_texts(cpu)
    vectors = _vectors(cpu)[torch.arange(len(texts)) % len(CATEGORIES.categories)]
    strengths = torch.tensor([4.0, -6.0, 4.0, -6.0, 0.0])
    generated = []
    for hooked in (cpu, gpu):
        hook = per_row_batch_hook(hooked, LAYER, vectors, strengths)
        generated.append(generate_ids(hooked.model, hooked.tokenizer, texts, batch_size=3, max_new_tokens=6,
                                      batch_hook=hook, progress=False))
    assert generated[1] == generated[0]
    # A CPU vector steers the device's model, and the hook is gone after the block.
    before = refusal_token_probabilities(gpu, texts, CATEGORIES, batch_size=2)
    with steer(gpu, LAYER, _vectors(cpu)[0], 4.0):
        steered = refusal_token_probabilities(gpu, texts, CATEGORIES, batch_size=2)
    after = refusal_token_probabilities(gpu, texts, CATEGORIES, batch_size=2)
    torch.testing.assert_close(after, before)
    assert (steered[:, 0] - before[:, 0]).min() > 0  # every row's first category gained probability


def test_probe_router_and_sweep_agree(pair):
    cpu, gpu = pair
    texts = tiny_texts(cpu)
    labels = torch.tensor([0, 1, 0, 1, 0])
    features = cache_activations(cpu, texts, LAYER, batch_size=2, progress=False).layer(LAYER)
    probe = LinearProbe(cpu.d_model, layer=LAYER, hook_kind="resid_post").fit(features, labels, progress=False)
    routes = [probe_router(probe, LAYER, CATEGORIES).route(hooked, texts) for hooked in (cpu, gpu)]
    assert [r.route for r in routes[1]] == [r.route for r in routes[0]]
    assert [r.category for r in routes[1]] == [r.category for r in routes[0]]

    vectors = {LAYER: dict(zip(CATEGORIES.categories, _vectors(cpu)))}
    tables = [sweep_layers(hooked, tiny_texts(cpu, HARMFUL), tiny_texts(cpu, BENIGN), CATEGORIES, [LAYER],
                           [0.0, 2.0], [2.0], vectors, batch_size=2, progress=False) for hooked in (cpu, gpu)]
    for on_cpu, on_gpu in zip(*tables):
        assert on_gpu["contribution"] == pytest.approx(on_cpu["contribution"], abs=1e-5)
    assert best_strengths(tables[1])["positive_strength"] == best_strengths(tables[0])["positive_strength"]


def test_low_rank_training_runs_on_cuda_and_steers(pair, tmp_path):
    cpu, gpu = pair
    texts = tiny_texts(cpu)
    activations = cache_activations(cpu, texts, LAYER, batch_size=2, progress=False).layer(LAYER)
    basis = steering_basis(dict(zip(CATEGORIES.categories, _vectors(cpu))), fit_whitening(activations))
    operator = LowRankCombinationSteering.from_basis(basis)
    config = TrainingConfig(layer=LAYER, epochs=2, batch_size=2, lr=5e-2, seed=0)
    result = train_low_rank_combination(gpu, operator, tiny_texts(cpu, HARMFUL), tiny_texts(cpu, BENIGN), CATEGORIES,
                                        config, checkpoint_dir=tmp_path, progress=False)
    assert len(result.history) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_fold_steering_conditions_plan_alike(pair):
    """The leave-one-source-out / data-curve conditions (fitted on CPU activations) route alike on the device."""
    cpu, gpu = pair
    words = ["bread", "wifi", "poem", "weapon", "moon", "soup"]
    records = [PromptRecord(prompt=f"How do I get {w} {c}?", label="harmful", category=c, source="harm")
               for c in CATEGORIES.categories for w in words[:3]]
    records += [PromptRecord(prompt=f"Tell me about {w} number {i}.", label="benign", category="benign",
                             source="plain") for i in range(2) for w in words]
    records += [PromptRecord(prompt=f"Tell me about {w}, safely.", label="benign", category="benign", source="look")
                for w in words]
    contrast = [PromptRecord(prompt=f"How do I get {w} now?", label="harmful", category="malicious_uses",
                             source="harm_test") for w in words]
    records += contrast
    split = held_out_source_splits(records, ["look"], seed=0, val_fraction=0.3, contrast=contrast)["look"]
    texts = format_chat(cpu.tokenizer, [r.prompt for r in records])
    acts = cache_activations(cpu, texts, LAYER, batch_size=4, progress=False).layer(LAYER)
    token_scores = token_router_scores(refusal_token_probabilities(cpu, texts, CATEGORIES, batch_size=4))
    test_prompts = [r.prompt for r in split.test]
    test_texts = format_chat(cpu.tokenizer, test_prompts)
    for routing in ROUTINGS:
        condition = fold_steering_condition(acts, records, split, LAYER, routing, token_scores,
                                            FoldSettings(CATEGORIES, PAPER_POSITIVE_STRENGTH, PAPER_NEGATIVE_STRENGTH))
        plans = [condition.plan(hooked, test_prompts, test_texts) for hooked in (cpu, gpu)]
        keys = ("route", "routed_category", "strength")
        assert [[d[k] for k in keys] for d in plans[1].decisions] == [[d[k] for k in keys] for d in plans[0].decisions]
        for on_gpu, on_cpu in zip(plans[1].decisions, plans[0].decisions):
            assert on_gpu["probe_score"] == pytest.approx(on_cpu["probe_score"], abs=1e-4)
