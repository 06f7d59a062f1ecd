"""Tests of scripts.eval_steering_vectors against references computed another way (numpy, by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.eval_steering_vectors import (
    CategoryMatrix,
    analyse_category_vectors,
    cluster_activations,
    cosine_similarity_matrix,
    direction_projection,
    plot_category_matrix,
    plot_projection,
    svd_projection,
    top_k_indices,
    top_k_overlap,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _vectors(seed: int = 0, d: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(d, generator=generator) for name in ("hazards", "malicious", "misinfo")}


def _clusters(per: int = 20, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Three tight, far-apart Gaussian blobs."""
    generator = torch.Generator().manual_seed(seed)
    centres = 50.0 * torch.eye(d)[:3]
    rows, labels = [], []
    for index, name in enumerate(("a", "b", "c")):
        rows.append(centres[index] + 0.1 * torch.randn(per, d, generator=generator))
        labels += [name] * per
    return torch.cat(rows), labels


def test_cosine_matrix_matches_numpy():
    vectors = _vectors()
    matrix = cosine_similarity_matrix(vectors)
    stacked = np.stack([v.numpy().astype(np.float64) for v in vectors.values()])
    reference = np.array([[a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for b in stacked] for a in stacked])
    assert matrix.categories == list(vectors)
    np.testing.assert_allclose(matrix.values.numpy(), reference, rtol=1e-12, atol=1e-12)
    assert matrix["hazards", "misinfo"] == pytest.approx(reference[0, 2], abs=1e-12)
    assert matrix.to_dict()["malicious"]["hazards"] == pytest.approx(reference[1, 0], abs=1e-12)
    with pytest.raises(KeyError, match="valid categories: \\['hazards', 'malicious', 'misinfo'\\]"):
        matrix["nope", "hazards"]


def test_cosine_matrix_rejects_zero_and_mismatched_vectors():
    with pytest.raises(ValueError, match="zero vector.*'b'"):
        cosine_similarity_matrix({"a": torch.ones(3), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="same length"):
        cosine_similarity_matrix({"a": torch.ones(3), "b": torch.ones(4)})


def test_top_k_overlap_hand_computed():
    vectors = {
        "x": torch.tensor([5.0, -4.0, 3.0, 0.1, 0.0, 0.0]),  # top-3 by |.|: {0, 1, 2}
        "y": torch.tensor([0.0, 9.0, 0.2, -8.0, 7.0, 0.0]),  # {1, 3, 4}
        "z": torch.tensor([1.0, 1.5, 2.0, 0.0, 0.0, 0.5]),  # {0, 1, 2}
    }
    overlap = top_k_overlap(vectors, k=3)
    assert overlap["x", "y"] == pytest.approx(1 / 5)  # {1} / {0,1,2,3,4}
    assert overlap["x", "z"] == pytest.approx(1.0)
    assert overlap["y", "z"] == pytest.approx(1 / 5)
    assert torch.equal(overlap.values.diagonal(), torch.ones(3, dtype=torch.float64))
    # Signed ranking: x's top-3 values are {0, 2, 3}, y's are {1, 2, 4}.
    assert top_k_indices(vectors["x"], 3, by="value") == {0, 2, 3}
    assert top_k_overlap(vectors, k=3, by="value")["x", "y"] == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="k must be in 1..6"):
        top_k_overlap(vectors, k=7)


def test_clustering_of_separated_clusters_is_perfect():
    activations, labels = _clusters()
    result = cluster_activations(activations, labels)
    assert result.n_clusters == 3
    assert result.adjusted_rand_index == pytest.approx(1.0)
    assert result.silhouette > 0.95
    assert result.assignments.shape == (60,)


def test_clustering_of_shuffled_labels_scores_near_zero():
    activations, labels = _clusters()
    shuffled = list(np.random.default_rng(0).permutation(labels))
    assert abs(cluster_activations(activations, shuffled).adjusted_rand_index) < 0.2
    with pytest.raises(ValueError, match="one label per activation row"):
        cluster_activations(activations, labels[:-1])


def test_svd_projection_matches_numpy_and_separates_clusters():
    activations, labels = _clusters()
    coordinates, components = svd_projection(activations)
    data = activations.double().numpy()
    centred = data - data.mean(axis=0)
    _, singular, vh = np.linalg.svd(centred, full_matrices=False)
    # Same subspace and same spread as numpy's SVD (signs may differ per component).
    np.testing.assert_allclose(np.abs(components.numpy()), np.abs(vh[:2]), atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(coordinates.numpy(), axis=0), singular[:2], rtol=1e-10)
    # Cluster centroids in the plane are far apart compared with the spread within a cluster.
    names = sorted(set(labels))
    centroids = torch.stack([coordinates[[label == n for label in labels]].mean(0) for n in names])
    assert torch.cdist(centroids, centroids).fill_diagonal_(1e9).min() > 30


def test_direction_projection_is_dot_with_unit_directions():
    vectors = {"a": torch.tensor([3.0, 0.0, 4.0]), "b": torch.tensor([0.0, 2.0, 0.0])}
    activations = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    coordinates = direction_projection(activations, vectors, ("a", "b"))
    expected = torch.tensor([[(3 + 12) / 5, 2.0], [20 / 5, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(coordinates, expected)
    with pytest.raises(KeyError, match="valid categories: \\['a', 'b'\\]"):
        direction_projection(activations, vectors, ("a", "c"))


def test_figures_are_valid_pngs(tmp_path):
    matrix = cosine_similarity_matrix(_vectors())
    heatmap = plot_category_matrix(matrix, tmp_path / "figs" / "cos.png")
    activations, labels = _clusters()
    scatter = plot_projection(svd_projection(activations)[0], labels, tmp_path / "proj.png")
    for path in (heatmap, scatter):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    with pytest.raises(ValueError, match="\\[N, 2\\]"):
        plot_projection(torch.zeros(3, 3), ["a"] * 3, tmp_path / "bad.png")


def test_analyse_category_vectors_summary(tmp_path):
    activations, labels = _clusters(d=16)
    vectors = _vectors(d=16)
    summary = analyse_category_vectors(vectors, activations, labels, tmp_path, k=4)
    assert summary["clustering"]["adjusted_rand_index"] == pytest.approx(1.0)
    assert summary["cosine"] == cosine_similarity_matrix(vectors).to_dict()
    assert summary["top_k_overlap"] == top_k_overlap(vectors, 4).to_dict()
    for path in summary["figures"].values():
        assert open(path, "rb").read(8) == PNG_MAGIC


def test_category_matrix_is_keyed():
    matrix = CategoryMatrix(["p", "q"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert matrix["q", "p"] == 3.0
