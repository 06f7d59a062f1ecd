"""How separable the category directions are: cosine similarities, a 2-D projection, clustering and top-K overlap.

Inputs are category-keyed steering vectors (``{category: [d_model]}``, as in ``scripts.steering_vectors``)
and last-token activations ``[N, d_model]`` with one category label per row (as cached by
``scripts.activation_caching``). Every matrix comes back with its category order, so rows and columns
are always keyed by name. Figures are drawn with matplotlib's Agg backend and saved as PNG.

The 2-D projection uses no PCA or UMAP library: it projects onto the top two right singular vectors of
the centred activations (``torch.linalg.svd``) or onto two chosen category directions.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CategoryMatrix:
    """A square matrix whose rows and columns are categories, in ``categories`` order.

    Attributes:
        categories: Row/column names.
        values: ``[C, C]`` float tensor.
    """

    categories: list[str]
    values: torch.Tensor

    def __getitem__(self, pair: tuple[str, str]) -> float:
        """``matrix["a", "b"]``: the entry of categories ``a`` and ``b`` (unknown names raise with the valid ones)."""
        row, column = (self._index(name) for name in pair)
        return float(self.values[row, column])

    def _index(self, name: str) -> int:
        if name not in self.categories:
            raise KeyError(f"unknown category {name!r}; valid categories: {self.categories}")
        return self.categories.index(name)

    def to_dict(self) -> dict[str, dict[str, float]]:
        """Nested ``{row: {column: value}}`` for JSON."""
        return {
            row: {column: float(self.values[i, j]) for j, column in enumerate(self.categories)}
            for i, row in enumerate(self.categories)
        }


@dataclass(frozen=True)
class ClusteringResult:
    """k-means clustering of activations compared with their true categories.

    Attributes:
        assignments: Cluster index per row, shape ``[N]``.
        n_clusters: Number of clusters fitted.
        silhouette: Silhouette score of the clustering (Euclidean distance), in ``[-1, 1]``.
        adjusted_rand_index: Agreement of clusters with the true categories (1 = identical partitions).
    """

    assignments: torch.Tensor
    n_clusters: int
    silhouette: float
    adjusted_rand_index: float


def _stack(vectors: Mapping[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """Category names and the vectors stacked as ``[C, d_model]`` float64; checks shapes agree."""
    if not vectors:
        raise ValueError("no vectors given")
    categories = list(vectors)
    shapes = {name: tuple(vector.shape) for name, vector in vectors.items()}
    if any(len(shape) != 1 for shape in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"vectors must all be 1-D of the same length; got shapes {shapes}")
    return categories, torch.stack([vectors[name].detach().double().cpu() for name in categories])


def cosine_similarity_matrix(vectors: Mapping[str, torch.Tensor]) -> CategoryMatrix:
    """Pairwise cosine similarity of category vectors.

    Args:
        vectors: Category → vector ``[d_model]``.

    Returns:
        ``[C, C]`` cosine similarities (float64), keyed by the input's category order.

    Raises:
        ValueError: a vector is zero (its direction is undefined) or shapes differ.
    """
    categories, stacked = _stack(vectors)
    norms = stacked.norm(dim=1)
    zero = [name for name, norm in zip(categories, norms) if norm == 0]
    if zero:
        raise ValueError(f"zero vector(s) have no direction: {zero}")
    unit = stacked / norms[:, None]
    return CategoryMatrix(categories, unit @ unit.T)


def top_k_indices(vector: torch.Tensor, k: int, by: Literal["abs", "value"] = "abs") -> set[int]:
    """Indices of the ``k`` largest entries of a ``[d_model]`` vector, by magnitude (``abs``) or signed value."""
    if by not in ("abs", "value"):
        raise ValueError(f"by must be 'abs' or 'value', got {by!r}")
    if not 1 <= k <= vector.shape[-1]:
        raise ValueError(f"k must be in 1..{vector.shape[-1]}, got {k}")
    scores = vector.abs() if by == "abs" else vector
    return set(torch.topk(scores.detach().double(), k).indices.tolist())


def top_k_overlap(vectors: Mapping[str, torch.Tensor], k: int, by: Literal["abs", "value"] = "abs") -> CategoryMatrix:
    """Jaccard overlap of the top-``k`` feature indices of each pair of category vectors.

    Args:
        vectors: Category → vector ``[d_model]``.
        k: How many of the largest entries define a vector's feature set.
        by: Rank entries by magnitude (``abs``) or by signed value.

    Returns:
        ``[C, C]`` matrix of ``|A ∩ B| / |A ∪ B|`` (1 on the diagonal).
    """
    categories, stacked = _stack(vectors)
    sets = [top_k_indices(row, k, by) for row in stacked]
    values = torch.tensor(
        [[len(a & b) / len(a | b) for b in sets] for a in sets],
        dtype=torch.float64,
    )
    return CategoryMatrix(categories, values)


def svd_projection(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project activations onto the top two right singular vectors of their centred matrix.

    Args:
        activations: ``[N, d_model]``, N >= 2.

    Returns:
        ``(coordinates [N, 2], components [2, d_model])``; each component's sign is fixed so that its
        largest-magnitude entry is positive, making the picture reproducible.
    """
    if activations.ndim != 2 or activations.shape[0] < 2 or activations.shape[1] < 2:
        raise ValueError(f"activations must be [N >= 2, d_model >= 2], got {tuple(activations.shape)}")
    data = activations.detach().double().cpu()
    centred = data - data.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:2]
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components = components * signs
    return centred @ components.T, components


def direction_projection(
    activations: torch.Tensor, vectors: Mapping[str, torch.Tensor], axes: tuple[str, str]
) -> torch.Tensor:
    """Coordinates of activations along two category directions (unit-normalised vectors, not orthogonalised).

    Args:
        activations: ``[N, d_model]``.
        vectors: Category → vector ``[d_model]``.
        axes: The two categories whose directions are the x and y axes.

    Returns:
        ``[N, 2]`` dot products with the two unit directions.
    """
    missing = [name for name in axes if name not in vectors]
    if missing:
        raise KeyError(f"unknown categor(ies) {missing}; valid categories: {list(vectors)}")
    directions = torch.stack([vectors[name].detach().double().cpu() for name in axes])
    directions = directions / directions.norm(dim=1, keepdim=True)
    return activations.detach().double().cpu() @ directions.T


def cluster_activations(
    activations: torch.Tensor,
    labels: Sequence[str],
    n_clusters: int | None = None,
    seed: int = 0,
    n_init: int = 10,
) -> ClusteringResult:
    """k-means on activations, scored by silhouette and by adjusted Rand index against the true categories.

    Args:
        activations: ``[N, d_model]``.
        labels: True category per row (length N).
        n_clusters: Number of clusters; default the number of distinct labels.
        seed: k-means random state.
        n_init: k-means restarts.

    Raises:
        ValueError: lengths differ, or fewer than 2 clusters / more clusters than rows.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    if activations.ndim != 2 or activations.shape[0] != len(labels):
        raise ValueError(f"need one label per activation row; got {tuple(activations.shape)} and {len(labels)} labels")
    k = n_clusters if n_clusters is not None else len(set(labels))
    if not 2 <= k < activations.shape[0]:
        raise ValueError(f"n_clusters must be in 2..{activations.shape[0] - 1}, got {k}")
    data = activations.detach().double().cpu().numpy()
    assignments = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit_predict(data)
    return ClusteringResult(
        assignments=torch.as_tensor(assignments),
        n_clusters=k,
        silhouette=float(silhouette_score(data, assignments)),
        adjusted_rand_index=float(adjusted_rand_score(list(labels), assignments)),
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_category_matrix(
    matrix: CategoryMatrix,
    path: str | os.PathLike[str],
    title: str = "Cosine similarity of category vectors",
    vmin: float = -1.0,
    vmax: float = 1.0,
) -> Path:
    """Save a heatmap of a category matrix (values written in the cells) as PNG; returns the path."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = max(4.0, 0.9 * len(matrix.categories) + 2.0)
    figure, axes = plt.subplots(figsize=(size + 1.0, size))
    image = axes.imshow(matrix.values.numpy(), cmap="RdBu_r", vmin=vmin, vmax=vmax)
    axes.set_xticks(range(len(matrix.categories)), matrix.categories, rotation=45, ha="right")
    axes.set_yticks(range(len(matrix.categories)), matrix.categories)
    for i in range(len(matrix.categories)):
        for j in range(len(matrix.categories)):
            axes.text(j, i, f"{float(matrix.values[i, j]):.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    logger.info("saved %s", path)
    return path


def plot_projection(
    coordinates: torch.Tensor,
    labels: Sequence[str],
    path: str | os.PathLike[str],
    axis_labels: tuple[str, str] = ("component 1", "component 2"),
    title: str = "Category activations",
) -> Path:
    """Save a scatter plot of ``[N, 2]`` coordinates coloured by category as PNG; returns the path."""
    if coordinates.ndim != 2 or coordinates.shape != (len(labels), 2):
        raise ValueError(f"need [N, 2] coordinates and N labels; got {tuple(coordinates.shape)} and {len(labels)}")
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    points = coordinates.detach().double().cpu().numpy()
    figure, axes = plt.subplots(figsize=(7, 5.5))
    for category in sorted(set(labels)):
        mask = [label == category for label in labels]
        axes.scatter(points[mask, 0], points[mask, 1], label=category, s=14, alpha=0.75)
    axes.set_xlabel(axis_labels[0])
    axes.set_ylabel(axis_labels[1])
    axes.set_title(title)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    logger.info("saved %s", path)
    return path


def analyse_category_vectors(
    vectors: Mapping[str, torch.Tensor],
    activations: torch.Tensor,
    labels: Sequence[str],
    figure_dir: str | os.PathLike[str],
    k: int = 20,
    seed: int = 0,
) -> dict[str, object]:
    """All analyses at once: figures saved under ``figure_dir`` and a JSON-able summary returned.

    Args:
        vectors: Category → steering vector ``[d_model]``.
        activations: ``[N, d_model]`` last-token activations of labelled prompts.
        labels: Category per activation row.
        figure_dir: Where ``cosine_similarity.png``, ``top_k_overlap.png`` and ``svd_projection.png`` go.
        k: Top-K size for the feature overlap (capped at ``d_model``).
        seed: k-means random state.

    Returns:
        ``{"cosine": {...}, "top_k_overlap": {...}, "k": k, "clustering": {"n_clusters", "silhouette",
        "adjusted_rand_index"}, "figures": {name: path}}``.
    """
    figure_dir = Path(figure_dir)
    cosine = cosine_similarity_matrix(vectors)
    k = min(k, vector_dimension(vectors))
    overlap = top_k_overlap(vectors, k)
    coordinates, _ = svd_projection(activations)
    clustering = cluster_activations(activations, labels, seed=seed)
    figures = {
        "cosine_similarity": plot_category_matrix(cosine, figure_dir / "cosine_similarity.png"),
        "top_k_overlap": plot_category_matrix(
            overlap, figure_dir / "top_k_overlap.png", title=f"Top-{k} feature overlap (Jaccard)", vmin=0.0
        ),
        "svd_projection": plot_projection(
            coordinates, labels, figure_dir / "svd_projection.png", ("singular vector 1", "singular vector 2")
        ),
    }
    return {
        "cosine": cosine.to_dict(),
        "top_k_overlap": overlap.to_dict(),
        "k": k,
        "clustering": {
            "n_clusters": clustering.n_clusters,
            "silhouette": clustering.silhouette,
            "adjusted_rand_index": clustering.adjusted_rand_index,
        },
        "figures": {name: str(path) for name, path in figures.items()},
    }


def vector_dimension(vectors: Mapping[str, torch.Tensor]) -> int:
    """The common length ``d_model`` of category vectors (checked)."""
    return int(_stack(vectors)[1].shape[1])
