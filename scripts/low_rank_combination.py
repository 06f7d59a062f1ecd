"""Whitening of residual activations and the orthonormal category basis of the low-rank combination.

Residual activations are strongly anisotropic: a few directions carry most of the variance, so raw
category vectors are far from orthogonal and a step along one moves the model very differently from
an equal step along another. The paper therefore mixes the category directions in a whitened space:

* covariance ``Σ`` of activations ``X [N, d]`` (mean ``μ``), eigendecomposed ``Σ = Q Λ Qᵀ``;
* whitening ``W = Q (Λ + ε)^{-1/2} Qᵀ`` (symmetric, ``W Σ W ≈ I``) and its inverse, the colouring
  ``C = W^{-1} = Q (Λ + ε)^{1/2} Qᵀ``, which maps whitened vectors back to activation space;
* whitened category vectors ``W v_c`` stacked as ``[d, k]`` and orthonormalised by QR: ``W V = B R``
  with ``BᵀB = I`` and ``R`` upper triangular with a positive diagonal. ``B`` spans exactly the whitened
  category directions, and ``C B`` spans exactly the original ones.

Everything is computed in float64. ``ε`` is a ridge on the eigenvalues, relative to their mean
(``ε = eps · tr(Σ) / d``), so the same ``eps`` works at any activation scale and keeps ``W`` finite
when ``N ≤ d`` makes ``Σ`` singular.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch

logger = logging.getLogger(__name__)

DEFAULT_EPS = 1e-5
DEFAULT_RANK_TOLERANCE = 1e-6


def covariance(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of activations, in float64.

    Args:
        activations: ``[N, d_model]`` with ``N >= 2``.

    Returns:
        ``(mean [d_model], covariance [d_model, d_model])``, float64 on the input's device.
    """
    if activations.ndim != 2 or activations.shape[0] < 2:
        raise ValueError(f"need activations [N >= 2, d_model], got shape {tuple(activations.shape)}")
    x = activations.double()
    if not torch.isfinite(x).all():
        raise ValueError("activations contain non-finite values")
    mean = x.mean(dim=0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


@dataclass(frozen=True)
class Whitening:
    """An affine whitening of activation space and its inverse.

    Attributes:
        mean: ``μ [d_model]``.
        whitening: ``W [d_model, d_model]``, symmetric.
        colouring: ``C = W^{-1} [d_model, d_model]``, symmetric.
        eps: The relative eigenvalue ridge it was built with.
    """

    mean: torch.Tensor
    whitening: torch.Tensor
    colouring: torch.Tensor
    eps: float

    @property
    def d_model(self) -> int:
        return int(self.mean.shape[0])

    def whiten(self, activations: torch.Tensor) -> torch.Tensor:
        """``W (z − μ)`` for activations ``[..., d_model]`` (float64)."""
        return (activations.double() - self.mean) @ self.whitening

    def colour(self, whitened: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`whiten`: ``C y + μ`` for ``[..., d_model]`` (float64)."""
        return whitened.double() @ self.colouring + self.mean

    def whiten_directions(self, vectors: torch.Tensor) -> torch.Tensor:
        """``W v`` for directions ``[..., d_model]`` (no centring: a direction has no origin)."""
        return vectors.double() @ self.whitening


def fit_whitening(activations: torch.Tensor, eps: float = DEFAULT_EPS) -> Whitening:
    """Whitening ``W = Q (Λ + ε)^{-1/2} Qᵀ`` of ``activations [N, d_model]``, with ``ε = eps · mean(Λ)``.

    Raises:
        ValueError: ``eps`` is not positive, or the activations are degenerate (zero variance).
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    mean, sigma = covariance(activations)
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma)
    # eigh can return tiny negative eigenvalues for a singular Σ; they are zero variance.
    eigenvalues = eigenvalues.clamp(min=0.0)
    scale = float(eigenvalues.mean())
    if scale <= 0:
        raise ValueError("the activations have zero variance; they cannot be whitened")
    ridged = eigenvalues + eps * scale
    whitening = (eigenvectors * ridged.rsqrt()) @ eigenvectors.T
    colouring = (eigenvectors * ridged.sqrt()) @ eigenvectors.T
    rank = int((eigenvalues > eps * scale).sum())
    if rank < activations.shape[1]:
        logger.info("covariance has %d of %d directions above the ridge; the rest are regularised", rank,
                    activations.shape[1])
    return Whitening(mean=mean, whitening=whitening, colouring=colouring, eps=float(eps))


@dataclass(frozen=True)
class SteeringBasis:
    """Orthonormal basis of the whitened category directions.

    Attributes:
        categories: Category names, in column order.
        basis: ``B [d_model, k]`` float64 with ``BᵀB = I``.
        r: ``R [k, k]`` upper triangular with positive diagonal, ``W V = B R`` (``V`` the stacked vectors).
        whitening: The whitening used.
    """

    categories: list[str]
    basis: torch.Tensor
    r: torch.Tensor
    whitening: Whitening

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])


def steering_basis(
    vectors: Mapping[str, torch.Tensor],
    whitening: Whitening,
    rank_tolerance: float = DEFAULT_RANK_TOLERANCE,
) -> SteeringBasis:
    """QR-orthonormalise the whitened category vectors ``W v_c`` into ``B [d_model, k]``.

    Args:
        vectors: Category → ``[d_model]`` (a ``SteeringVectors``' ``.vectors`` works as is).
        whitening: From :func:`fit_whitening` on activations of the same hook point.
        rank_tolerance: A diagonal entry of ``R`` below this fraction of the largest means the vectors
            are linearly dependent (after whitening) and the basis would be ill-defined.

    Raises:
        ValueError: no vectors, wrong widths, more categories than dimensions, or dependent vectors.
    """
    mapping = getattr(vectors, "vectors", vectors)
    if not mapping:
        raise ValueError("no category vectors given")
    categories = list(mapping)
    stacked = torch.stack([torch.as_tensor(mapping[c]) for c in categories]).double()
    if stacked.ndim != 2 or stacked.shape[1] != whitening.d_model:
        raise ValueError(
            f"category vectors must be [d_model={whitening.d_model}], got stacked shape {tuple(stacked.shape)}"
        )
    if len(categories) > whitening.d_model:
        raise ValueError(f"{len(categories)} categories cannot be orthonormal in d_model={whitening.d_model}")
    whitened = whitening.whiten_directions(stacked.to(whitening.whitening.device)).T  # [d_model, k]
    q, r = torch.linalg.qr(whitened, mode="reduced")
    # QR is unique up to column signs; a positive diagonal of R makes B follow the vectors' own orientation.
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    q, r = q * signs, r * signs[:, None]
    diagonal = torch.diagonal(r)
    if (diagonal <= rank_tolerance * diagonal.abs().max()).any():
        dependent = [categories[i] for i in torch.nonzero(diagonal <= rank_tolerance * diagonal.abs().max()).flatten()]
        raise ValueError(f"the whitened category vectors are linearly dependent (at {dependent}); drop or merge them")
    return SteeringBasis(categories=categories, basis=q, r=r, whitening=whitening)
