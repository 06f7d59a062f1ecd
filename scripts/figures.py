"""The notebook's figures, each drawn from a stage's record and saved as a PNG (the notebook displays it).

Figures are drawn on :class:`matplotlib.figure.Figure` objects, not through ``pyplot``, so a call shows
nothing by itself and leaves no open figure behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

DPI = 120


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def plot_layer_sweep(
    auc_by_layer: Mapping[int, float],
    sweep: Sequence[Mapping[str, Any]],
    sweep_layers: Sequence[int],
    path: str | os.PathLike[str],
) -> Path:
    """Probe validation AUC by layer, and the sweep's first-token probabilities by strength of either sign.

    Args:
        sweep: Rows of :func:`scripts.layer_selection.sweep_layers` (``layer``, ``side``, ``strength``,
            ``harmful_refusal``, ``benign_respond``).
    """
    fig = Figure(figsize=(14, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].plot(list(auc_by_layer), list(auc_by_layer.values()), marker="o")
    axes[0].set(xlabel="layer", ylabel="probe ROC-AUC (validation)", title="Probe separability by layer")
    for k, layer in enumerate(sweep_layers):  # one colour per layer; solid: the side's own prompts
        for ax, side, own, other in ((axes[1], "positive", "harmful_refusal", "benign_respond"),
                                     (axes[2], "negative", "benign_respond", "harmful_refusal")):  # fmt: skip
            rows = [row for row in sweep if row["layer"] == layer and row["side"] == side]
            x = [abs(row["strength"]) for row in rows]
            ax.plot(x, [row[own] for row in rows], color=f"C{k}", marker="o", label=f"L{layer}: {own}")
            ax.plot(x, [row[other] for row in rows], color=f"C{k}", ls="--", marker=".", label=f"L{layer}: {other}")
    axes[1].set(xlabel="strength toward refusal", ylabel="mean first-token probability",
                title="Toward refusal (harmful: p(refusal), benign: p([respond]))")  # fmt: skip
    axes[2].set(xlabel="strength away from refusal", ylabel="mean first-token probability", title="Away from refusal")
    for ax in axes[1:]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def plot_probe_roc(
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    aucs: Mapping[str, float],
    path: str | os.PathLike[str],
) -> Path:
    """ROC curves of routing scores on the held-out rows.

    Args:
        labels: ``[N]`` 1 harmful, 0 benign.
        scores: Router name → ``[N]`` scores (higher: more harmful), one curve each.
        aucs: Router name → its AUC, for the legend.
    """
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    for name, values in scores.items():
        fpr, tpr, _ = roc_curve(labels, values)
        ax.plot(fpr, tpr, label=f"{name}, AUC {aucs[name]:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="Probe ROC (held-out)")
    ax.legend()
    return _save(fig, path)


def plot_low_rank_loss(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Each loss of the low-rank operator's training history by epoch (``history`` must not be empty)."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    for key in [k for k in history[0] if "loss" in k or k in ("refusal", "kl")]:
        ax.plot([h["epoch"] for h in history], [h[key] for h in history], marker="o", label=key)
    ax.set(xlabel="epoch", ylabel="loss", title="Low-rank combination training")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_generalization_auc(
    generalization: Mapping[str, Any], layers: Sequence[int], path: str | os.PathLike[str], target: float = 0.85
) -> Path:
    """Each held-out source's probe AUC by layer (a ``generalization`` block of ``summary.json``)."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    for source, entry in generalization["sources"].items():
        ax.plot(layers, [entry["probe_auc"][f"probe_L{layer}"]["auc"] for layer in layers], marker="o", label=source)
    ax.axhline(target, color="k", ls="--", lw=0.8)
    ax.set(xlabel="probe layer", ylabel="held-out ROC-AUC", title="Probe AUC on each held-out source")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def plot_data_curve(
    curve: Mapping[str, Any], routings: Sequence[str], path: str | os.PathLike[str], max_refusal_drop: float = 0.05
) -> Path:
    """Over-refusal and harmful refusal by shots added, one line per routing, with the unsteered rate and targets.

    Args:
        curve: A :func:`scripts.generalization.data_curve_summary`.
    """
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    for ax, label, title in zip(axes, ("benign", "harmful"),
                                ("over-refusal (held-out look-alikes)", "refusal (held-out harmful)")):  # fmt: skip
        base_rate = curve["base"][label]["rate"]
        for offset, routing in zip((-0.8, 0.8), routings):
            points = [p for p in curve["points"] if p["routing"] == routing]
            rates = np.array([p["rates"][label]["rate"] for p in points])
            intervals = np.array([p["rates"][label]["ci"] for p in points]).T
            ax.errorbar([p["shots"] + offset for p in points], rates, yerr=np.abs(intervals - rates), marker="o",
                        capsize=3, label=routing)  # fmt: skip
        ax.axhline(base_rate, color="k", lw=0.8, label="unsteered")
        target = 0.5 * base_rate if label == "benign" else base_rate - max_refusal_drop
        ax.axhline(target, color="k", ls=":", lw=0.8, label="target")
        ax.set(xlabel=f"prompts of {curve['source']} added", ylabel="rate", title=title, ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_policy_table(policy_table: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Paired difference (steered − unsteered) per held-out source and routing policy, benign and harmful prompts.

    A point is the mean over seeds; its bar runs from the lowest lower to the highest upper end of the
    seeds' 95% intervals. The dotted lines are the do-no-harm bounds.

    Args:
        policy_table: A :func:`scripts.generalization.held_out_policy_table`.
    """
    protocol = policy_table["protocol"]
    sources = list(policy_table["sources"])
    policies = protocol["policies"]
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2, sharey=True)
    bounds = {"benign": protocol["max_over_refusal_rise"], "harmful": -protocol["max_refusal_drop"]}
    for ax, label, title in zip(axes, ("benign", "harmful"), ("over-refusal change (benign)", "refusal change (harmful)")):
        for offset, policy in zip(np.linspace(-0.25, 0.25, len(policies)), policies):
            xs, means, lows, highs = [], [], [], []
            for x, source in enumerate(sources):
                cell = policy_table["sources"][source]["policies"][policy]
                mean = cell["paired_difference"].get(label, {}).get("mean")
                if mean is None:
                    continue
                xs.append(x + offset)
                means.append(mean)
                lows.append(mean - cell["paired_lower"][label]["min"])
                highs.append(cell["paired_upper"][label]["max"] - mean)
            ax.errorbar(xs, means, yerr=[lows, highs], fmt="o", capsize=3, label=policy)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.axhline(bounds[label], color="k", ls=":", lw=0.8)
        ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right", fontsize=7)
        ax.set(title=title, ylabel="steered − unsteered")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"held-out sources, first-token refusal, seeds {protocol['seeds']}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
