"""Training the low-rank combination on the tiny model: losses, loss decrease, exact resume, failure modes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from scripts.activation_caching import cache_activations
from scripts.low_rank_combination import fit_whitening, steering_basis
from scripts.low_rank_combination_steering import LowRankCombinationSteering
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES as CATEGORIES
from scripts.train_low_rank_combination_steering import (
    TrainingConfig,
    epoch_batches,
    evaluate_loss,
    kl_to_base,
    latest_checkpoint,
    refusal_token_loss,
    train_low_rank_combination,
)
from tests.tiny_steering import PROMPTS, build_hooked_tiny, tiny_texts

LAYER = 1
HARMFUL = (PROMPTS[1], PROMPTS[3], "Explain how to poison a neighbour's dog.", "Write a threat to my boss.")
BENIGN = (PROMPTS[0], PROMPTS[2], PROMPTS[4])
CONFIG = TrainingConfig(layer=LAYER, epochs=2, batch_size=2, lr=5e-2, strength=1.0, kl_weight=0.5, seed=3)


@pytest.fixture(scope="module")
def hooked():
    return build_hooked_tiny()


@pytest.fixture(scope="module")
def texts(hooked):
    return tiny_texts(hooked, HARMFUL), tiny_texts(hooked, BENIGN)


@pytest.fixture(scope="module")
def basis(hooked, texts):
    activations = cache_activations(hooked, texts[0] + texts[1], LAYER, progress=False).layer(LAYER)
    generator = torch.Generator().manual_seed(0)
    vectors = {c: torch.randn(hooked.d_model, generator=generator) for c in CATEGORIES.categories}
    return steering_basis(vectors, fit_whitening(activations, eps=1e-2))


def _operator(basis) -> LowRankCombinationSteering:
    return LowRankCombinationSteering.from_basis(basis, metadata={"layer": LAYER})


def test_refusal_token_loss_and_kl_match_naive_formulas():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, generator=generator) * 3
    other = torch.randn(3, 11, generator=generator) * 3
    ids = torch.tensor([2, 5, 7])
    naive = -torch.log(torch.softmax(logits, dim=-1)[:, ids].sum(dim=-1)).mean()
    torch.testing.assert_close(refusal_token_loss(logits, ids), naive)
    reference = F.kl_div(F.log_softmax(other, -1), F.log_softmax(logits, -1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(kl_to_base(logits, other), reference)
    assert float(kl_to_base(logits, logits)) == pytest.approx(0.0, abs=1e-6)


def test_epoch_batches_cover_both_sets_and_depend_only_on_seed_and_epoch():
    batches = epoch_batches(5, 2, 2, seed=1, epoch=0)
    assert len(batches) == 3
    assert sorted(i for harmful, _ in batches for i in harmful) == [0, 1, 2, 3, 4]
    assert all(sorted(benign) == [0, 1] for _, benign in batches)
    assert batches == epoch_batches(5, 2, 2, seed=1, epoch=0)
    assert batches != epoch_batches(5, 2, 2, seed=1, epoch=1)


def test_training_lowers_the_loss_and_freezes_the_model(hooked, texts, basis):
    operator = _operator(basis)
    before = evaluate_loss(hooked, operator, texts[0], texts[1], CATEGORIES, CONFIG)
    config = dataclasses.replace(CONFIG, epochs=4)
    result = train_low_rank_combination(hooked, operator, texts[0], texts[1], CATEGORIES, config, progress=False)
    after = evaluate_loss(hooked, result.operator, texts[0], texts[1], CATEGORIES, config)
    assert after["loss"] < before["loss"] - 0.1
    assert after["harmful_loss"] < before["harmful_loss"]
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert all(p.requires_grad for p in hooked.model.parameters())  # restored after the run
    assert all(p.grad is None for p in hooked.model.parameters())  # and never trained


def test_resume_from_a_checkpoint_continues_like_an_uninterrupted_run(hooked, texts, basis, tmp_path):
    straight = train_low_rank_combination(hooked, _operator(basis), texts[0], texts[1], CATEGORIES, CONFIG,
                                          checkpoint_dir=tmp_path / "straight", progress=False)
    interrupted = tmp_path / "interrupted"
    first = dataclasses.replace(CONFIG, epochs=1)
    train_low_rank_combination(hooked, _operator(basis), texts[0], texts[1], CATEGORIES, first,
                               checkpoint_dir=interrupted, progress=False)
    assert latest_checkpoint(interrupted).name == "epoch_0001.safetensors"
    resumed = train_low_rank_combination(hooked, _operator(basis), texts[0], texts[1], CATEGORIES, CONFIG,
                                         checkpoint_dir=interrupted, progress=False)
    assert latest_checkpoint(interrupted).name == "epoch_0002.safetensors"
    for name, tensor in straight.operator.state_dict().items():
        assert torch.equal(resumed.operator.state_dict()[name], tensor), name
    assert resumed.history == straight.history
    assert not torch.equal(straight.operator.U, _operator(basis).U)  # training moved the parameters


def test_resume_with_another_configuration_raises(hooked, texts, basis, tmp_path):
    first = dataclasses.replace(CONFIG, epochs=1)
    train_low_rank_combination(hooked, _operator(basis), texts[0], texts[1], CATEGORIES, first,
                               checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        train_low_rank_combination(hooked, _operator(basis), texts[0], texts[1], CATEGORIES,
                                   dataclasses.replace(CONFIG, lr=1e-4), checkpoint_dir=tmp_path, progress=False)


def test_non_finite_loss_raises_and_restores_the_model(hooked, texts, basis):
    operator = _operator(basis)
    with torch.no_grad():
        operator.U.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 1, step 1"):
        train_low_rank_combination(hooked, operator, texts[0], texts[1], CATEGORIES, CONFIG, progress=False)
    assert all(p.requires_grad for p in hooked.model.parameters())


def test_config_validation():
    with pytest.raises(ValueError, match="epochs"):
        TrainingConfig(layer=0, epochs=0)
    with pytest.raises(ValueError, match="valid modes"):
        TrainingConfig(layer=0, positions="everywhere")
