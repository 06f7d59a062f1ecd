"""The notebook's set-up: the fast configuration's sizes, the parameter checks, seeds, logging and the run's
configuration, in one call (:func:`prepare_run`).
"""

from __future__ import annotations

import logging
import random
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from scripts.judge import resolve_judge_name
from scripts.paths import RunConfig
from scripts.refusal_tokens import CategorySet, get_category_set

FAST_SOURCES: tuple[str, ...] = ("rho_overrefusal", "harmbench")
"""The held-out sources the fast configuration keeps (of those the parameters name)."""


def fast_overrides(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The tiny sizes of the fast configuration (CI): the parameters it replaces, by name.

    ``generalization_sources`` keeps only those of :data:`FAST_SOURCES` the parameters name, in their order.
    """
    return {
        "candidate_layers": [9, 15],
        "sweep_positive_strengths": [4.0, 16.0], "sweep_negative_strengths": [6.0], "n_sweep_layers": 2,
        "n_low_rank_per_label": 8,
        "n_train_per_category": 8, "n_eval_per_category": 3, "n_eval_overrefusal": 10, "n_sweep_per_label": 6,
        "max_new_tokens": 12, "low_rank_epochs": 1, "n_eval_unseen_harmful": 3, "n_probe_extra_harmful": 8,
        "generalization_sources": [s for s in parameters.get("generalization_sources") or [] if s in FAST_SOURCES],
        "generalization_layers": [9, 15], "n_generalization_per_source": 24, "n_generalization_generate": 4,
        "data_curve_shots": [0, 8], "held_out_policy_seeds": [0, 1],
    }  # fmt: skip


def check_parameters(parameters: Mapping[str, Any]) -> None:
    """Reject settings that would fail late, before any work.

    Raises:
        ValueError: ``data_curve_source`` is set but not one of the held-out ``generalization_sources``.
    """
    sources, curve_source = parameters.get("generalization_sources"), parameters.get("data_curve_source")
    if sources and curve_source and curve_source not in sources:
        raise ValueError(f"data_curve_source {curve_source!r} is not held out; held-out sources: "
                         f"{list(sources)} (None skips the curve)")  # fmt: skip


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class RunSetup:
    """What the set-up decided.

    Attributes:
        parameters: Every notebook parameter as the run uses it (the fast sizes applied, the judge resolved).
        config: The run's configuration (its directory and artifact paths), built from ``parameters``.
        category_set: The category set named by ``category_set_name``.
    """

    parameters: dict[str, Any]
    config: RunConfig
    category_set: CategorySet


def prepare_run(parameters: Mapping[str, Any]) -> RunSetup:
    """Logging, seeds, the fast sizes, the parameter checks, the category set, the judge and the configuration.

    Args:
        parameters: The notebook's parameters by name (at least ``seed``, ``fast``, ``category_set_name``,
            ``judge``, ``model_name``).

    Raises:
        ValueError: as :func:`check_parameters`, before anything is loaded.
    """
    # Without ipywidgets (as when papermill runs it) tqdm draws text progress bars, which is what we want.
    warnings.filterwarnings("ignore", message="IProgress not found")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    seed_everything(parameters["seed"])
    used = dict(parameters)
    if used.get("fast"):
        used.update(fast_overrides(used))
    check_parameters(used)
    category_set = get_category_set(used["category_set_name"])
    # "auto": the LLM judge when configured, else the trained judge, else phrases.
    used["judge"] = resolve_judge_name(used["judge"])
    return RunSetup(used, RunConfig.from_parameters(used), category_set)
