"""Each notebook figure is written as a PNG where it was asked to go."""

from __future__ import annotations

import numpy as np

from scripts.figures import plot_data_curve, plot_generalization_auc, plot_layer_sweep, plot_low_rank_loss, plot_probe_roc

PNG = b"\x89PNG\r\n\x1a\n"


def test_layer_sweep(tmp_path) -> None:
    sweep = [{"layer": layer, "side": side, "strength": sign * s, "harmful_refusal": 0.5, "benign_respond": 0.4}
             for layer in (9, 15) for side, sign in (("positive", 1), ("negative", -1)) for s in (4.0, 8.0)]
    path = plot_layer_sweep({9: 0.9, 15: 0.95}, sweep, [9, 15], tmp_path / "figures" / "sweep.png")
    assert path == tmp_path / "figures" / "sweep.png" and path.read_bytes().startswith(PNG)


def test_probe_roc(tmp_path) -> None:
    labels = np.array([1, 1, 0, 0, 1, 0])
    scores = {"probe": np.array([0.9, 0.6, 0.2, 0.4, 0.7, 0.1]), "probe+token": np.array([2.0, 1.0, -1.0, 0.0, 0.5, -2.0])}
    path = plot_probe_roc(labels, scores, {"probe": 1.0, "probe+token": 1.0}, tmp_path / "roc.png")
    assert path.read_bytes().startswith(PNG)


def test_low_rank_loss(tmp_path) -> None:
    history = [{"epoch": 1, "harmful_loss": 2.0, "kl": 0.1, "loss": 2.1}, {"epoch": 2, "harmful_loss": 1.0, "kl": 0.2, "loss": 1.2}]
    assert plot_low_rank_loss(history, tmp_path / "loss.png").read_bytes().startswith(PNG)


def test_generalization_auc_and_data_curve(tmp_path) -> None:
    entry = {"probe_auc": {"probe_L9": {"auc": 0.8}, "probe_L15": {"auc": 0.9}}}
    path = plot_generalization_auc({"sources": {"a": entry, "b": entry}}, [9, 15], tmp_path / "auc.png")
    assert path.read_bytes().startswith(PNG)
    rate = {"rate": 0.5, "ci": [0.3, 0.7]}
    points = [{"routing": routing, "shots": shots, "rates": {"benign": rate, "harmful": rate}}
              for shots in (0, 8) for routing in ("probe", "probe+token")]
    curve = {"source": "a", "base": {"benign": rate, "harmful": rate}, "points": points}
    assert plot_data_curve(curve, ("probe", "probe+token"), tmp_path / "curve.png").read_bytes().startswith(PNG)
