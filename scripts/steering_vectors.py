"""Categorical steering vectors: one direction per refusal category, from cached residual activations.

Strategies are small factories returning a callable ``strategy(harmful, benign) -> {category: [d_model]}``:

* :func:`mean_difference` — ``mean(harmful of c) − mean(benign)``;
* :func:`contrastive` — the mean of per-pair differences ``h_i − b_i`` over aligned harmful/benign pairs;
* :func:`ridge` — the ridge-regularised direction of the "Refusal Steering" paper. In closed form on
  centred activations ``X_c`` (harmful and benign rows stacked) with targets ``y = +1`` (harmful) /
  ``−1`` (benign), also centred: ``w = (X_cᵀ X_c + αI)⁻¹ X_cᵀ y_c`` — exactly scikit-learn's
  ``Ridge(alpha, fit_intercept=True)``. Since ``X_cᵀ y_c = (2 n_h n_b / n)(μ_h − μ_b)`` and
  ``X_cᵀ X_c = n Σ`` (``Σ`` the pooled covariance), the direction equals ``(Σ + (α/n) I)⁻¹ (μ_h − μ_b)``.

:func:`compute_steering_vectors` then post-processes each raw vector in this order: the ``tau``
threshold, top-K sparsification, and unit normalisation last. Vectors are saved with their metadata
(:class:`SteeringVectors`) in safetensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from scripts.hooked_model import HOOK_KINDS

FORMAT_VERSION = 1
TAU_MODES: tuple[str, ...] = ("relative", "absolute")

Benign = torch.Tensor | Mapping[str, torch.Tensor]
"""Benign activations: one shared ``[N_b, d_model]`` set, or one set per category (look-alikes, or pairs)."""


@dataclass(frozen=True)
class VectorStrategy:
    """A named vector-computation method with its hyper-parameters; call it like a function.

    Attributes:
        name: Method name recorded in the saved metadata.
        hyperparameters: JSON-serialisable parameters recorded in the saved metadata.
        compute: ``(harmful [N_c, d_model], benign [N_b, d_model]) -> [d_model]`` for one category.
        paired: Whether rows of ``harmful`` and ``benign`` must be aligned pairs.
    """

    name: str
    hyperparameters: Mapping[str, Any]
    compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    paired: bool = False

    def __call__(self, harmful: Mapping[str, torch.Tensor], benign: Benign) -> dict[str, torch.Tensor]:
        """Raw (unnormalised) vector per category.

        Args:
            harmful: Category → harmful activations ``[N_c, d_model]``.
            benign: Shared ``[N_b, d_model]``, or category → ``[N_b_c, d_model]`` with the same
                categories as ``harmful`` (required for paired strategies, row ``i`` paired with row ``i``).

        Returns:
            Category → ``[d_model]`` (float32), in the order of ``harmful``.
        """
        if not harmful:
            raise ValueError("no harmful categories given")
        if isinstance(benign, Mapping):
            check_categories(benign.keys(), harmful.keys(), what="benign sets")
        elif self.paired:
            raise ValueError(f"{self.name} needs one paired benign set per category, got a single tensor")
        vectors = {}
        for category, harmful_acts in harmful.items():
            benign_acts = benign[category] if isinstance(benign, Mapping) else benign
            _check_activations(harmful_acts, f"harmful[{category!r}]")
            _check_activations(benign_acts, f"benign for {category!r}")
            if harmful_acts.shape[1] != benign_acts.shape[1]:
                raise ValueError(
                    f"category {category!r}: harmful width {harmful_acts.shape[1]} "
                    f"!= benign width {benign_acts.shape[1]}"
                )
            if self.paired and harmful_acts.shape[0] != benign_acts.shape[0]:
                raise ValueError(
                    f"category {category!r}: {harmful_acts.shape[0]} harmful rows but {benign_acts.shape[0]} "
                    "benign rows; paired strategies need aligned pairs"
                )
            vectors[category] = self.compute(harmful_acts.double(), benign_acts.double()).float()
        return vectors


def _check_activations(acts: torch.Tensor, what: str) -> None:
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2:
        shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
        raise ValueError(f"{what} must be a [N, d_model] tensor, got {shape}")
    if acts.shape[0] == 0:
        raise ValueError(f"{what} has no rows")
    if not torch.isfinite(acts).all():
        raise ValueError(f"{what} contains non-finite values")


def mean_difference() -> VectorStrategy:
    """``mean(harmful of c) − mean(benign)`` per category."""
    return VectorStrategy(
        name="mean_difference",
        hyperparameters={},
        compute=lambda harmful, benign: harmful.mean(dim=0) - benign.mean(dim=0),
    )


def contrastive() -> VectorStrategy:
    """Mean over aligned pairs of ``harmful_i − benign_i`` (benign given per category, row-aligned)."""
    return VectorStrategy(
        name="contrastive",
        hyperparameters={},
        compute=lambda harmful, benign: (harmful - benign).mean(dim=0),
        paired=True,
    )


def ridge(alpha: float = 1.0) -> VectorStrategy:
    """Ridge-regression direction ``(X_cᵀX_c + αI)⁻¹ X_cᵀ y_c`` with ``y = ±1`` (harmful/benign); see the module doc.

    Args:
        alpha: L2 penalty (scikit-learn's ``Ridge(alpha)``); must be positive.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")

    def compute(harmful: torch.Tensor, benign: torch.Tensor) -> torch.Tensor:
        features = torch.cat([harmful, benign])
        targets = torch.cat([harmful.new_ones(harmful.shape[0]), -benign.new_ones(benign.shape[0])])
        centred = features - features.mean(dim=0)
        gram = centred.T @ centred + alpha * torch.eye(features.shape[1], dtype=features.dtype)
        return torch.linalg.solve(gram, centred.T @ (targets - targets.mean()))

    return VectorStrategy(name="ridge", hyperparameters={"alpha": float(alpha)}, compute=compute)


STRATEGIES: dict[str, Callable[..., VectorStrategy]] = {
    "mean_difference": mean_difference,
    "contrastive": contrastive,
    "ridge": ridge,
}


def get_strategy(name: str, **hyperparameters: Any) -> VectorStrategy:
    """A strategy by name (``mean_difference``, ``contrastive``, ``ridge``); unknown names raise with the valid ones."""
    if name not in STRATEGIES:
        raise KeyError(f"unknown vector strategy {name!r}; valid: {sorted(STRATEGIES)}")
    return STRATEGIES[name](**hyperparameters)


def threshold_entries(vector: torch.Tensor, tau: float, mode: str = "relative") -> torch.Tensor:
    """Zero every entry with ``|v_i| < threshold``.

    Args:
        vector: ``[..., d_model]``.
        tau: ``relative`` mode: a fraction in ``[0, 1]`` of the largest ``|v_i|`` of each vector
            (scale-free, so one ``tau`` suits any layer and method); ``absolute`` mode: the threshold
            itself, in the raw vector's units.
        mode: ``relative`` or ``absolute``.

    Returns:
        A new tensor of the same shape.
    """
    if mode not in TAU_MODES:
        raise ValueError(f"unknown tau mode {mode!r}; valid: {list(TAU_MODES)}")
    if tau < 0 or (mode == "relative" and tau > 1):
        raise ValueError(f"tau must be >= 0 (and <= 1 in relative mode), got {tau}")
    magnitude = vector.abs()
    threshold = tau * magnitude.amax(dim=-1, keepdim=True) if mode == "relative" else torch.tensor(tau)
    return torch.where(magnitude < threshold, torch.zeros_like(vector), vector)


def top_k_entries(vector: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` entries of largest magnitude of each vector ``[..., d_model]``; zero the rest.

    Ties at the boundary are broken by :func:`torch.topk`, so exactly ``k`` entries survive.
    """
    width = vector.shape[-1]
    if not 1 <= k <= width:
        raise ValueError(f"top_k must be in [1, {width}], got {k}")
    keep = vector.abs().topk(k, dim=-1).indices
    mask = torch.zeros_like(vector, dtype=torch.bool).scatter(-1, keep, True)
    return torch.where(mask, vector, torch.zeros_like(vector))


def unit_norm(vector: torch.Tensor) -> torch.Tensor:
    """``v / ‖v‖`` along the last dimension; a zero vector raises (it has no direction)."""
    norm = vector.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise ValueError("cannot normalise a zero vector (did tau or top_k zero every entry?)")
    return vector / norm


def compute_steering_vectors(
    harmful: Mapping[str, torch.Tensor],
    benign: Benign,
    strategy: VectorStrategy | None = None,
    tau: float | None = None,
    tau_mode: str = "relative",
    top_k: int | None = None,
    normalize: bool = True,
) -> dict[str, torch.Tensor]:
    """One steering vector per category: strategy, then ``tau`` threshold, then top-K, then unit norm.

    Args:
        harmful: Category → harmful activations ``[N_c, d_model]``.
        benign: Shared benign activations ``[N_b, d_model]`` or category → ``[N_b_c, d_model]``.
        strategy: Default :func:`mean_difference`.
        tau: Optional threshold (see :func:`threshold_entries`).
        tau_mode: ``relative`` (fraction of the largest entry) or ``absolute``.
        top_k: Optional number of entries to keep (see :func:`top_k_entries`).
        normalize: Scale each vector to unit L2 norm (last).

    Returns:
        Category → ``[d_model]`` (float32), in the order of ``harmful``.
    """
    strategy = strategy if strategy is not None else mean_difference()
    vectors = strategy(harmful, benign)
    processed = {}
    for category, vector in vectors.items():
        if tau is not None:
            vector = threshold_entries(vector, tau, tau_mode)
        if top_k is not None:
            vector = top_k_entries(vector, top_k)
        if normalize:
            try:
                vector = unit_norm(vector)
            except ValueError as error:
                raise ValueError(f"category {category!r}: {error}") from error
        processed[category] = vector
    return processed


def group_activations(
    acts: torch.Tensor, labels: Sequence[str], categories: Sequence[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Split the rows of one layer into harmful-per-category and benign sets (e.g. from :class:`PromptRecord` s).

    Args:
        acts: ``[N, d_model]``.
        labels: ``"harmful"`` or ``"benign"`` per row.
        categories: Category name per row (only read for harmful rows).

    Returns:
        ``({category: [N_c, d_model]}, benign [N_b, d_model])``, categories in first-seen order.
    """
    if not (acts.shape[0] == len(labels) == len(categories)):
        raise ValueError(f"{acts.shape[0]} rows but {len(labels)} labels and {len(categories)} categories")
    unknown = sorted(set(labels) - {"harmful", "benign"})
    if unknown:
        raise ValueError(f"labels must be 'harmful' or 'benign', got {unknown}")
    harmful: dict[str, list[int]] = {}
    benign: list[int] = []
    for index, (label, category) in enumerate(zip(labels, categories)):
        if label == "harmful":
            harmful.setdefault(category, []).append(index)
        else:
            benign.append(index)
    return {category: acts[rows] for category, rows in harmful.items()}, acts[benign]


def check_categories(actual: Sequence[str] | Any, expected: Sequence[str] | Any, what: str = "vectors") -> None:
    """Raise ``ValueError`` naming both sets when two collections of category names differ (order ignored).

    Either argument may be a :class:`~scripts.refusal_tokens.CategorySet` (its ``categories`` are used).
    """
    actual_names = list(getattr(actual, "categories", actual))
    expected_names = list(getattr(expected, "categories", expected))
    if set(actual_names) != set(expected_names):
        raise ValueError(
            f"category mismatch: {what} have {sorted(actual_names)}, expected {sorted(expected_names)} "
            f"(missing {sorted(set(expected_names) - set(actual_names))}, "
            f"unexpected {sorted(set(actual_names) - set(expected_names))})"
        )


@dataclass
class SteeringVectors:
    """Per-category steering vectors at one hook point, and how they were made.

    Attributes:
        vectors: Category → ``[d_model]``.
        layer: Block index of the hook point.
        hook_kind: ``resid_pre``, ``resid_mid`` or ``resid_post``.
        method: Strategy name (``mean_difference``, ``contrastive``, ``ridge``).
        model: Model alias, Hub id or path.
        revision: Model revision, when known.
        hyperparameters: Strategy and post-processing parameters (``tau``, ``tau_mode``, ``top_k``, ``alpha``…).
        template_hash: :func:`scripts.activation_caching.chat_template_hash` of the tokenizer used.
        normalization: ``"unit"`` or ``"none"``.
        mean_resid_norm: Mean L2 norm of the residual stream at this hook point, so that steering
            strengths can be reported relative to it.
        extra: Any other JSON-serialisable metadata.
    """

    vectors: dict[str, torch.Tensor]
    layer: int
    hook_kind: str
    method: str
    model: str = ""
    revision: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    template_hash: str = ""
    normalization: str = "unit"
    mean_resid_norm: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ValueError("SteeringVectors needs at least one category")
        if self.hook_kind not in HOOK_KINDS:
            raise ValueError(f"unknown hook kind {self.hook_kind!r}; valid kinds: {list(HOOK_KINDS)}")
        shapes = {category: tuple(vector.shape) for category, vector in self.vectors.items()}
        if any(len(shape) != 1 for shape in shapes.values()) or len(set(shapes.values())) != 1:
            raise ValueError(f"every vector must be [d_model] with one shared width, got {shapes}")

    @property
    def categories(self) -> list[str]:
        """Category names in stored order."""
        return list(self.vectors)

    @property
    def d_model(self) -> int:
        """Residual-stream width."""
        return int(next(iter(self.vectors.values())).shape[0])

    def vector(self, category: str) -> torch.Tensor:
        """The ``[d_model]`` vector of ``category``; an unknown name raises naming the valid ones."""
        if category not in self.vectors:
            raise KeyError(f"unknown category {category!r}; valid categories: {self.categories}")
        return self.vectors[category]

    def stacked(self, categories: Sequence[str] | None = None) -> torch.Tensor:
        """Vectors as ``[C, d_model]`` in the order of ``categories`` (default: stored order)."""
        return torch.stack([self.vector(category) for category in (categories or self.categories)])

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, as a JSON-serialisable dict."""
        return {
            "format": FORMAT_VERSION,
            "categories": self.categories,
            "layer": self.layer,
            "hook_kind": self.hook_kind,
            "method": self.method,
            "model": self.model,
            "revision": self.revision,
            "hyperparameters": self.hyperparameters,
            "template_hash": self.template_hash,
            "normalization": self.normalization,
            "mean_resid_norm": self.mean_resid_norm,
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the vectors (one tensor per category) and :meth:`metadata` as JSON to a safetensors file."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {category: vector.detach().cpu().contiguous() for category, vector in self.vectors.items()}
        staging = path.with_name(path.name + ".part")
        save_file(tensors, str(staging), metadata={"steering_vectors": json.dumps(self.metadata(), sort_keys=True)})
        os.replace(staging, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_categories: Sequence[str] | Any = None) -> "SteeringVectors":
        """Read a file written by :meth:`save`.

        Args:
            expected_categories: When given (names or a ``CategorySet``), the stored categories must
                be the same set; otherwise ``ValueError`` names both.
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("steering_vectors")
            if raw is None:
                raise ValueError(f"{path} has no steering-vector metadata; was it written by SteeringVectors.save?")
            meta = json.loads(raw)
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"{path} has format {meta.get('format')}, expected {FORMAT_VERSION}")
            check_categories(list(handle.keys()), meta["categories"], what=f"tensors in {path}")
            vectors = {category: handle.get_tensor(category) for category in meta["categories"]}
        if expected_categories is not None:
            check_categories(meta["categories"], expected_categories, what=str(path))
        return cls(
            vectors=vectors,
            layer=int(meta["layer"]),
            hook_kind=meta["hook_kind"],
            method=meta["method"],
            model=meta["model"],
            revision=meta["revision"],
            hyperparameters=meta["hyperparameters"],
            template_hash=meta["template_hash"],
            normalization=meta["normalization"],
            mean_resid_norm=meta["mean_resid_norm"],
            extra=meta["extra"],
        )


def build_steering_vectors(
    harmful: Mapping[str, torch.Tensor],
    benign: Benign,
    layer: int,
    hook_kind: str = "resid_post",
    strategy: VectorStrategy | None = None,
    tau: float | None = None,
    tau_mode: str = "relative",
    top_k: int | None = None,
    normalize: bool = True,
    model: str = "",
    revision: str | None = None,
    template_hash: str = "",
    mean_resid_norm: float | None = None,
) -> SteeringVectors:
    """:func:`compute_steering_vectors` wrapped in a :class:`SteeringVectors` with its full metadata."""
    strategy = strategy if strategy is not None else mean_difference()
    vectors = compute_steering_vectors(harmful, benign, strategy, tau, tau_mode, top_k, normalize)
    hyperparameters = {**strategy.hyperparameters, "tau": tau, "tau_mode": tau_mode, "top_k": top_k}
    return SteeringVectors(
        vectors=vectors,
        layer=layer,
        hook_kind=hook_kind,
        method=strategy.name,
        model=model,
        revision=revision,
        hyperparameters=hyperparameters,
        template_hash=template_hash,
        normalization="unit" if normalize else "none",
        mean_resid_norm=mean_resid_norm,
    )
