"""Whitening and the orthonormal whitened category basis, against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.low_rank_combination import covariance, fit_whitening, steering_basis


def _anisotropic(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Correlated activations whose variances span four orders of magnitude, with a non-zero mean."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator, dtype=torch.float64) * torch.logspace(-2, 0, d, dtype=torch.float64)
    return torch.randn(n, d, generator=generator, dtype=torch.float64) @ mixing + 3.0


def _vectors(k: int, d: int, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"c{i}": torch.randn(d, generator=generator) for i in range(k)}


def test_covariance_matches_numpy():
    x = _anisotropic(200, 6)
    mean, sigma = covariance(x.float())
    np.testing.assert_allclose(mean.numpy(), x.float().double().numpy().mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.float().double().numpy(), rowvar=False), atol=1e-12)


def test_whitened_activations_have_identity_covariance():
    x = _anisotropic(5000, 16)
    whitening = fit_whitening(x, eps=1e-12)
    whitened = whitening.whiten(x)
    torch.testing.assert_close(torch.cov(whitened.T), torch.eye(16, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(whitened.mean(dim=0), torch.zeros(16, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(whitening.colour(whitened), x, atol=1e-8, rtol=0)


def test_whitening_is_the_symmetric_inverse_square_root_of_the_ridged_covariance():
    x = _anisotropic(300, 8)
    eps = 1e-3
    whitening = fit_whitening(x, eps=eps)
    sigma = np.cov(x.numpy(), rowvar=False)
    ridged = sigma + eps * np.trace(sigma) / 8 * np.eye(8)
    w = whitening.whitening.numpy()
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    np.testing.assert_allclose(w @ w, np.linalg.inv(ridged), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(w @ whitening.colouring.numpy(), np.eye(8), atol=1e-9)


def test_singular_covariance_stays_finite():
    x = _anisotropic(5, 32)  # N < d: Σ has rank 4
    whitening = fit_whitening(x, eps=1e-2)
    assert torch.isfinite(whitening.whitening).all() and torch.isfinite(whitening.colouring).all()
    with pytest.raises(ValueError, match="zero variance"):
        fit_whitening(torch.ones(10, 4))
    with pytest.raises(ValueError, match="positive"):
        fit_whitening(x, eps=0.0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_basis_is_orthonormal_and_spans_the_whitened_vectors(k):
    x = _anisotropic(500, 12)
    whitening = fit_whitening(x)
    vectors = _vectors(k, 12)
    basis = steering_basis(vectors, whitening)
    b = basis.basis
    assert b.shape == (12, k) and basis.categories == list(vectors)
    torch.testing.assert_close(b.T @ b, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0)
    stacked = torch.stack(list(vectors.values())).double()
    whitened = (whitening.whitening @ stacked.T).numpy()
    np.testing.assert_allclose(b.numpy() @ basis.r.numpy(), whitened, atol=1e-10)
    assert np.allclose(np.triu(basis.r.numpy()), basis.r.numpy()) and (torch.diagonal(basis.r) > 0).all()
    # The first column is the first whitened vector, normalised (Gram–Schmidt order).
    np.testing.assert_allclose(b[:, 0].numpy(), whitened[:, 0] / np.linalg.norm(whitened[:, 0]), atol=1e-12)


def test_basis_errors_name_the_problem():
    whitening = fit_whitening(_anisotropic(100, 6))
    vectors = _vectors(2, 6)
    with pytest.raises(ValueError, match="linearly dependent"):
        steering_basis({**vectors, "twice": 2 * vectors["c0"]}, whitening)
    with pytest.raises(ValueError, match="d_model=6"):
        steering_basis({"a": torch.ones(5)}, whitening)
    with pytest.raises(ValueError, match="no category"):
        steering_basis({}, whitening)
