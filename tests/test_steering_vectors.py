"""Tests of scripts.steering_vectors against numpy / scikit-learn references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.refusal_tokens import DONOTANSWER_CATEGORIES
from scripts.steering_vectors import (
    SteeringVectors,
    build_steering_vectors,
    check_categories,
    compute_steering_vectors,
    contrastive,
    get_strategy,
    group_activations,
    mean_difference,
    ridge,
    threshold_entries,
    top_k_entries,
    unit_norm,
)

D_MODEL = 24


@pytest.fixture()
def data():
    """Three categories of harmful activations with different shifts, and a benign set."""
    generator = torch.Generator().manual_seed(0)
    harmful = {
        f"cat_{index}": torch.randn(10 + 3 * index, D_MODEL, generator=generator) + 2.0 * index
        for index in range(3)
    }
    benign = torch.randn(17, D_MODEL, generator=generator)
    return harmful, benign


def test_mean_difference_equals_numpy(data):
    harmful, benign = data
    vectors = compute_steering_vectors(harmful, benign, mean_difference(), normalize=False)
    assert list(vectors) == list(harmful)
    for category, acts in harmful.items():
        expected = acts.numpy().astype(np.float64).mean(axis=0) - benign.numpy().astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(vectors[category].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_per_category_benign_sets(data):
    harmful, benign = data
    per_category = {category: benign[index::3] for index, category in enumerate(harmful)}
    vectors = compute_steering_vectors(harmful, per_category, normalize=False)
    for category, acts in harmful.items():
        expected = acts.double().mean(0) - per_category[category].double().mean(0)
        torch.testing.assert_close(vectors[category], expected.float())


def test_contrastive_is_mean_of_pair_differences(data):
    harmful, _ = data
    generator = torch.Generator().manual_seed(1)
    pairs = {category: torch.randn(acts.shape, generator=generator) for category, acts in harmful.items()}
    vectors = compute_steering_vectors(harmful, pairs, contrastive(), normalize=False)
    for category, acts in harmful.items():
        differences = [acts[row].double() - pairs[category][row].double() for row in range(acts.shape[0])]
        torch.testing.assert_close(vectors[category], (sum(differences) / len(differences)).float())
    with pytest.raises(ValueError, match="paired"):
        compute_steering_vectors(harmful, torch.zeros(3, D_MODEL), contrastive())
    misaligned = {category: tensor[:-1] for category, tensor in pairs.items()}
    with pytest.raises(ValueError, match="aligned pairs"):
        compute_steering_vectors(harmful, misaligned, contrastive())


@pytest.mark.parametrize("alpha", [0.1, 5.0])
def test_ridge_matches_sklearn_and_covariance_form(data, alpha):
    from sklearn.linear_model import Ridge

    harmful, benign = data
    vectors = compute_steering_vectors(harmful, benign, ridge(alpha), normalize=False)
    for category, acts in harmful.items():
        features = torch.cat([acts, benign]).double().numpy()
        targets = np.concatenate([np.ones(acts.shape[0]), -np.ones(benign.shape[0])])
        reference = Ridge(alpha=alpha, fit_intercept=True, solver="cholesky").fit(features, targets).coef_
        np.testing.assert_allclose(vectors[category].numpy(), reference, rtol=1e-4, atol=1e-6)
        # The documented equivalent: (Σ + (α/n) I)⁻¹ (μ_h − μ_b), Σ the pooled (total) covariance.
        n = features.shape[0]
        covariance = np.cov(features, rowvar=False, bias=True)
        direction = np.linalg.solve(
            covariance + alpha / n * np.eye(D_MODEL), acts.double().numpy().mean(0) - benign.double().numpy().mean(0)
        )
        cosine = direction @ reference / np.linalg.norm(direction) / np.linalg.norm(reference)
        assert cosine == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="positive"):
        ridge(0.0)


def test_unit_norm_is_last(data):
    harmful, benign = data
    vectors = compute_steering_vectors(harmful, benign, tau=0.3, top_k=5)
    for vector in vectors.values():
        assert float(vector.norm()) == pytest.approx(1.0, abs=1e-6)
        assert int((vector != 0).sum()) <= 5
    with pytest.raises(ValueError, match="zero vector"):
        unit_norm(torch.zeros(4))


def test_top_k_keeps_exactly_the_k_largest_magnitudes():
    generator = torch.Generator().manual_seed(2)
    vector = torch.randn(D_MODEL, generator=generator)
    for k in (1, 5, D_MODEL):
        kept = top_k_entries(vector, k)
        assert int((kept != 0).sum()) == k
        largest = set(np.argsort(-np.abs(vector.numpy()))[:k].tolist())
        assert set(torch.nonzero(kept).flatten().tolist()) == largest
        assert torch.equal(kept[kept != 0], vector[kept != 0])
    tied = torch.tensor([1.0, -1.0, 1.0, 0.5])
    assert int((top_k_entries(tied, 2) != 0).sum()) == 2
    with pytest.raises(ValueError, match=r"\[1, 24\]"):
        top_k_entries(vector, 0)


def test_tau_zeroes_exactly_entries_below_threshold():
    vector = torch.tensor([0.1, -0.5, 2.0, -1.0, 0.9999, 1.0])
    absolute = threshold_entries(vector, 1.0, "absolute")
    assert absolute.tolist() == [0.0, 0.0, 2.0, -1.0, 0.0, 1.0]
    relative = threshold_entries(vector, 0.25, "relative")  # threshold 0.25 * 2.0 = 0.5
    assert relative.tolist() == [0.0, -0.5, 2.0, -1.0, pytest.approx(0.9999), 1.0]
    batched = threshold_entries(torch.stack([vector, 10 * vector]), 0.25, "relative")
    assert torch.equal(batched[1], 10 * relative)
    with pytest.raises(ValueError, match="valid"):
        threshold_entries(vector, 0.5, "percent")
    with pytest.raises(ValueError, match="<= 1"):
        threshold_entries(vector, 1.5, "relative")
    with pytest.raises(ValueError, match="cat_0"):
        compute_steering_vectors({"cat_0": torch.zeros(2, 3)}, torch.zeros(2, 3), tau=0.5, tau_mode="absolute")


def test_any_width_and_number_of_categories():
    for width, count in ((3, 1), (7, 8)):
        harmful = {str(index): torch.full((2, width), float(index + 1)) for index in range(count)}
        vectors = compute_steering_vectors(harmful, torch.zeros(4, width))
        for vector in vectors.values():
            torch.testing.assert_close(vector, torch.full((width,), width**-0.5))


def test_group_activations():
    acts = torch.arange(12.0).reshape(6, 2)
    harmful, benign = group_activations(
        acts, ["harmful", "benign", "harmful", "harmful", "benign", "harmful"], ["b", "x", "a", "b", "y", "a"]
    )
    assert list(harmful) == ["b", "a"]
    assert harmful["b"].tolist() == [[0.0, 1.0], [6.0, 7.0]]
    assert harmful["a"].tolist() == [[4.0, 5.0], [10.0, 11.0]]
    assert benign.tolist() == [[2.0, 3.0], [8.0, 9.0]]
    with pytest.raises(ValueError, match="'maybe'"):
        group_activations(acts[:1], ["maybe"], ["a"])


def test_bad_inputs_raise(data):
    harmful, benign = data
    with pytest.raises(ValueError, match="width"):
        compute_steering_vectors(harmful, torch.zeros(3, D_MODEL + 1))
    with pytest.raises(ValueError, match="non-finite"):
        compute_steering_vectors({"a": torch.tensor([[float("nan")] * D_MODEL])}, benign)
    with pytest.raises(ValueError, match="category mismatch"):
        compute_steering_vectors(harmful, {"cat_0": benign})
    with pytest.raises(KeyError, match="valid"):
        get_strategy("median")
    assert get_strategy("ridge", alpha=2.0).hyperparameters == {"alpha": 2.0}


def test_save_load_round_trip_with_metadata(tmp_path):
    generator = torch.Generator().manual_seed(3)
    harmful = {
        category: torch.randn(5, D_MODEL, generator=generator) + 1 for category in DONOTANSWER_CATEGORIES.categories
    }
    benign = torch.randn(9, D_MODEL, generator=generator)
    built = build_steering_vectors(
        harmful, benign, layer=15, hook_kind="resid_post", strategy=ridge(2.0), tau=0.1, top_k=10,
        model="smollm2-135m-refusal-tokens", revision="abc", template_hash="0123", mean_resid_norm=12.5,
    )
    path = built.save(tmp_path / "vectors.safetensors")
    loaded = SteeringVectors.load(path, expected_categories=DONOTANSWER_CATEGORIES)
    assert loaded.metadata() == built.metadata()
    assert loaded.method == "ridge" and loaded.layer == 15 and loaded.mean_resid_norm == 12.5
    assert loaded.hyperparameters == {"alpha": 2.0, "tau": 0.1, "tau_mode": "relative", "top_k": 10}
    for category in built.categories:
        assert torch.equal(loaded.vector(category), built.vector(category))
    assert loaded.stacked(["misinformation_harms"]).shape == (1, D_MODEL)
    with pytest.raises(KeyError, match="valid categories"):
        loaded.vector("unknown")


def test_load_category_mismatch_names_both_sets(tmp_path):
    vectors = SteeringVectors({"a": torch.ones(3), "b": torch.ones(3)}, layer=1, hook_kind="resid_pre", method="m")
    path = vectors.save(tmp_path / "v.safetensors")
    with pytest.raises(ValueError) as error:
        SteeringVectors.load(path, expected_categories=["a", "c"])
    message = str(error.value)
    assert "['a', 'b']" in message and "['a', 'c']" in message
    SteeringVectors.load(path, expected_categories=["b", "a"])  # order does not matter
    with pytest.raises(ValueError, match="category mismatch"):
        check_categories(["x"], DONOTANSWER_CATEGORIES)
