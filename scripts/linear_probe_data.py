"""The harmful-vs-benign dataset for linear probes, its splits, and tensors from cached activations.

Records become (prompts, labels, categories) with label 1 for harmful and 0 for benign; splits come
from :mod:`scripts.data_splits`, so they are seeded, stratified and free of near-duplicates across
sides. :func:`probe_tensors` turns cached activations ``{layer: [N, d_model]}`` and labels into the
float tensors a probe is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from scripts.data_splits import train_val_test_split
from scripts.records import PromptRecord

HARMFUL = 1
BENIGN = 0


@dataclass(frozen=True)
class ProbeDataset:
    """Prompts with binary labels (1 harmful, 0 benign), in a fixed order shared by all fields."""

    prompts: list[str]
    labels: torch.Tensor
    categories: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def build_probe_dataset(records: Sequence[PromptRecord]) -> ProbeDataset:
    """Records as a probe dataset: ``labels`` is a long tensor ``[N]`` of 1 (harmful) / 0 (benign)."""
    return ProbeDataset(
        prompts=[record.prompt for record in records],
        labels=torch.tensor([HARMFUL if r.label == "harmful" else BENIGN for r in records], dtype=torch.long),
        categories=[record.category for record in records],
        ids=[record.id for record in records],
    )


@dataclass(frozen=True)
class ProbeSplits:
    """Train, validation and test probe datasets."""

    train: ProbeDataset
    val: ProbeDataset
    test: ProbeDataset


def build_probe_splits(
    records: Sequence[PromptRecord],
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ProbeSplits:
    """Seeded splits stratified by label and category (see :func:`scripts.data_splits.train_val_test_split`)."""
    split = train_val_test_split(records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    return ProbeSplits(
        train=build_probe_dataset(split.train),
        val=build_probe_dataset(split.val),
        test=build_probe_dataset(split.test),
    )


def probe_tensors(
    activations: Mapping[int, torch.Tensor],
    labels: torch.Tensor,
    layers: Sequence[int] | None = None,
    indices: Sequence[int] | torch.Tensor | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Training tensors per layer: ``(X [n, d_model] float32, y [n] float32)``.

    Args:
        activations: Cached activations ``{layer: [N, d_model]}``, rows in the dataset's order.
        labels: ``[N]`` labels (1 harmful, 0 benign).
        layers: Layers to return (default: every cached layer, sorted).
        indices: Rows to keep (e.g. a split's positions in the cached order); default all.

    Raises:
        ValueError: a layer is missing (the message lists the cached ones), an activation tensor is
            not 2-D, or its row count differs from the number of labels.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(labels.shape)}")
    chosen = sorted(activations) if layers is None else list(layers)
    missing = [layer for layer in chosen if layer not in activations]
    if missing:
        raise ValueError(f"layers {missing} not cached; cached layers: {sorted(activations)}")
    rows = None if indices is None else torch.as_tensor(indices, dtype=torch.long)
    y = labels.to(torch.float32) if rows is None else labels[rows].to(torch.float32)
    tensors = {}
    for layer in chosen:
        acts = activations[layer]
        if acts.dim() != 2:
            raise ValueError(f"layer {layer}: activations must be [N, d_model], got shape {tuple(acts.shape)}")
        if acts.shape[0] != labels.shape[0]:
            raise ValueError(f"layer {layer}: {acts.shape[0]} activation rows but {labels.shape[0]} labels")
        x = acts.to(torch.float32) if rows is None else acts[rows].to(torch.float32)
        tensors[layer] = (x, y)
    return tensors
