"""The low-rank combination steering operator ``delta(z) = C U Vᵀ W (z − μ)``.

Parametrisation. ``z [..., d_model]`` is the residual activation being steered. With the fixed whitening
``W``, colouring ``C = W^{-1}`` and mean ``μ`` of :mod:`scripts.low_rank_combination`:

1. ``y = W (z − μ)`` whitens the activation (isotropic coordinates);
2. ``a = Vᵀ y`` reads ``r`` coefficients (``V [d_model, r]``, learnable);
3. ``U a`` writes a whitened steering vector (``U [d_model, r]``, learnable);
4. ``delta = C U a`` colours it back to activation space.

So the map is linear in the centred activation with rank at most ``r``: ``delta = (C U)(W V)ᵀ (z − μ)``
(``W`` is symmetric). Both factors start at the orthonormal whitened category basis ``B [d_model, k]``
(``r = k``): initially ``delta = C B Bᵀ W (z − μ)``, the whitened activation's projection on the
whitened category directions, coloured back, which lies in the span of the original category vectors.
Training (:mod:`scripts.train_low_rank_combination_steering`) then mixes and rescales the category
directions per input. The steering hook adds ``strength · delta`` (:func:`scripts.steering.low_rank_combination`).

Saved as safetensors: ``U``, ``V``, ``mean``, ``whitening``, ``colouring`` and JSON metadata
(format, categories, rank, eps, layer, hook, model…).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from scripts.low_rank_combination import SteeringBasis, Whitening

FORMAT = "low_rank_combination_steering/v1"
METADATA_KEY = "low_rank_combination_steering"


class LowRankCombinationSteering(nn.Module):
    """``delta(z) = C U Vᵀ W (z − μ)`` for ``z [..., d_model]`` (see the module docstring).

    Attributes:
        categories: Names of the category directions the basis was built from (column order at init).
        metadata: JSON-serialisable provenance saved with the operator (layer, hook, model, eps…).

    Parameters: ``U [d_model, rank]``, ``V [d_model, rank]``. Buffers: ``mean [d_model]``,
    ``whitening [d_model, d_model]``, ``colouring [d_model, d_model]``.
    """

    def __init__(
        self,
        basis: torch.Tensor,
        mean: torch.Tensor,
        whitening: torch.Tensor,
        colouring: torch.Tensor,
        categories: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if basis.ndim != 2 or basis.shape[1] < 1:
            raise ValueError(f"basis must be [d_model, rank >= 1], got shape {tuple(basis.shape)}")
        d_model = basis.shape[0]
        for name, tensor, shape in (("mean", mean, (d_model,)), ("whitening", whitening, (d_model, d_model)),
                                    ("colouring", colouring, (d_model, d_model))):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for d_model={d_model}, got {tuple(tensor.shape)}")
        if len(categories) != basis.shape[1]:
            raise ValueError(f"{len(categories)} category names for a basis of rank {basis.shape[1]}")
        self.categories = list(categories)
        self.metadata: dict[str, Any] = dict(metadata or {})
        # Row-major copies whatever the inputs' strides (a QR basis is column-major): a loaded operator
        # then has the same layout as the saved one, so both take the same matmul kernel and agree bit for bit.
        def owned(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().to(dtype).clone(memory_format=torch.contiguous_format)

        self.U = nn.Parameter(owned(basis))
        self.V = nn.Parameter(owned(basis))
        self.register_buffer("mean", owned(mean))
        self.register_buffer("whitening", owned(whitening))
        self.register_buffer("colouring", owned(colouring))

    @classmethod
    def from_basis(
        cls, basis: SteeringBasis, metadata: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> "LowRankCombinationSteering":
        """The operator initialised from :func:`scripts.low_rank_combination.steering_basis` (``U = V = B``)."""
        whitening: Whitening = basis.whitening
        return cls(basis.basis, whitening.mean, whitening.whitening, whitening.colouring, basis.categories,
                   {"eps": whitening.eps, **dict(metadata or {})}, dtype)

    @property
    def d_model(self) -> int:
        return int(self.U.shape[0])

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def coefficients(self, activations: torch.Tensor) -> torch.Tensor:
        """``Vᵀ W (z − μ)``: ``[..., d_model]`` → ``[..., rank]``."""
        if activations.shape[-1] != self.d_model:
            raise ValueError(f"activations have width {activations.shape[-1]}, the operator expects {self.d_model}")
        return (activations.to(self.mean.dtype) - self.mean) @ (self.whitening @ self.V)

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        """``delta = C U Vᵀ W (z − μ)``: ``[..., d_model]`` → ``[..., d_model]``."""
        return self.coefficients(activations) @ (self.colouring @ self.U).T

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary (recorded in a condition's metadata)."""
        return {"operator": "low_rank_combination", "rank": self.rank, "d_model": self.d_model,
                "categories": self.categories, **self.metadata}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write parameters, buffers and metadata to a safetensors file (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        header = {"format": FORMAT, "categories": self.categories, "metadata": self.metadata}
        staging = path.with_name(path.name + ".part")
        save_file(tensors, str(staging), metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})
        os.replace(staging, path)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str | torch.device | None = None
    ) -> "LowRankCombinationSteering":
        """Read an operator written by :meth:`save` (on ``device``; default CPU).

        Raises:
            ValueError: the file was not written by :meth:`save` or has another format version.
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            if raw is None:
                raise ValueError(
                    f"{path} has no {METADATA_KEY} metadata; was it written by LowRankCombinationSteering.save?"
                )
            header = json.loads(raw)
            if header.get("format") != FORMAT:
                raise ValueError(f"{path} has format {header.get('format')!r}, expected {FORMAT!r}")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        expected = {"U", "V", "mean", "whitening", "colouring"}
        if set(tensors) != expected:
            raise ValueError(f"{path} holds tensors {sorted(tensors)}, expected {sorted(expected)}")
        operator = cls(tensors["U"], tensors["mean"], tensors["whitening"], tensors["colouring"], header["categories"],
                       header["metadata"], dtype=tensors["U"].dtype)
        operator.load_state_dict(tensors, strict=True)
        return operator.to(device) if device is not None else operator
