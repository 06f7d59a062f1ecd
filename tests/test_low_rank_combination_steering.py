"""The low-rank combination operator: initial output against a hand-computed numpy reference, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.low_rank_combination import fit_whitening, steering_basis
from scripts.low_rank_combination_steering import LowRankCombinationSteering


def _setup(d: int, k: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, d, dtype=torch.float64)
    activations = torch.randn(4 * d, d, generator=generator, dtype=torch.float64) * scales + 0.5
    vectors = {f"c{i}": torch.randn(d, generator=generator) for i in range(k)}
    return activations, vectors


def _reference_delta(activations: np.ndarray, vectors: np.ndarray, z: np.ndarray, eps: float) -> np.ndarray:
    """``C B Bᵀ W (z − μ)`` from scratch in numpy (eigendecomposition and QR of its own)."""
    mean = activations.mean(axis=0)
    sigma = np.cov(activations, rowvar=False)
    values, vecs = np.linalg.eigh(sigma)
    values = np.clip(values, 0, None) + eps * values.clip(0, None).mean()
    w = vecs @ np.diag(values**-0.5) @ vecs.T
    c = vecs @ np.diag(values**0.5) @ vecs.T
    q, _ = np.linalg.qr(w @ vectors.T)
    return (c @ q @ q.T @ w @ (z - mean).T).T


@pytest.mark.parametrize(("d", "k"), [(8, 1), (16, 3), (64, 5)])
def test_initial_output_matches_the_formula_by_hand(d, k):
    activations, vectors = _setup(d, k)
    eps = 1e-4
    basis = steering_basis(vectors, fit_whitening(activations, eps=eps))
    z = activations[:7] + 0.3
    reference = _reference_delta(activations.numpy(), torch.stack(list(vectors.values())).double().numpy(),
                                 z.numpy(), eps)
    exact = LowRankCombinationSteering.from_basis(basis, dtype=torch.float64)
    np.testing.assert_allclose(exact(z).detach().numpy(), reference, rtol=1e-8, atol=1e-9)
    single = LowRankCombinationSteering.from_basis(basis)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(single(z.float()).detach().numpy(), reference, atol=1e-4 * scale, rtol=0)
    assert exact.rank == k and exact.d_model == d


def test_initial_output_lies_in_the_span_of_the_category_vectors():
    activations, vectors = _setup(32, 3)
    operator = LowRankCombinationSteering.from_basis(steering_basis(vectors, fit_whitening(activations)),
                                                     dtype=torch.float64)
    delta = operator(activations[:10]).detach().numpy()
    span = torch.stack(list(vectors.values())).double().numpy().T
    coefficients, *_ = np.linalg.lstsq(span, delta.T, rcond=None)
    np.testing.assert_allclose(span @ coefficients, delta.T, atol=1e-8 * np.abs(delta).max())
    # Zero at the mean: the map is linear in the centred activation.
    np.testing.assert_allclose(operator(operator.mean).detach().numpy(), 0.0, atol=1e-10)


def test_only_the_factors_are_parameters_and_receive_gradients():
    activations, vectors = _setup(16, 2)
    operator = LowRankCombinationSteering.from_basis(steering_basis(vectors, fit_whitening(activations)))
    assert sorted(name for name, _ in operator.named_parameters()) == ["U", "V"]
    operator(activations[:4].float()).square().sum().backward()
    assert operator.U.grad is not None and operator.U.grad.abs().sum() > 0
    assert operator.V.grad is not None and operator.V.grad.abs().sum() > 0


def test_save_load_round_trip(tmp_path):
    activations, vectors = _setup(16, 3)
    operator = LowRankCombinationSteering.from_basis(steering_basis(vectors, fit_whitening(activations)),
                                                     metadata={"layer": 5, "hook": "blocks.5.hook_resid_post"})
    with torch.no_grad():
        operator.U.add_(0.01)  # a trained operator: U and V no longer equal
    path = operator.save(tmp_path / "op.safetensors")
    loaded = LowRankCombinationSteering.load(path)
    for name, tensor in operator.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.categories == operator.categories and loaded.metadata == operator.metadata
    assert loaded.metadata["layer"] == 5 and "eps" in loaded.metadata
    # Stored row-major like the loaded copy, so both outputs come from the same kernel: exact equality holds on any CPU.
    assert all(tensor.is_contiguous() for tensor in operator.state_dict().values())
    z = activations[:3].float()
    assert torch.equal(loaded(z), operator(z))


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="LowRankCombinationSteering.save"):
        LowRankCombinationSteering.load(tmp_path / "other.safetensors")


def test_shape_errors():
    with pytest.raises(ValueError, match="whitening must have shape"):
        LowRankCombinationSteering(torch.zeros(4, 2), torch.zeros(4), torch.zeros(3, 3), torch.zeros(4, 4), ["a", "b"])
    with pytest.raises(ValueError, match="category names"):
        LowRankCombinationSteering(torch.zeros(4, 2), torch.zeros(4), torch.eye(4), torch.eye(4), ["a"])
    operator = LowRankCombinationSteering(torch.zeros(4, 2), torch.zeros(4), torch.eye(4), torch.eye(4), ["a", "b"])
    with pytest.raises(ValueError, match="expects 4"):
        operator(torch.zeros(2, 5))
