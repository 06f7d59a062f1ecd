"""The notebook's set-up: the fast sizes, the parameter checks and the run configuration."""

from __future__ import annotations

import random

import pytest

from scripts.run_setup import check_parameters, fast_overrides, prepare_run

PARAMETERS = {
    "model_name": "m", "seed": 0, "fast": True, "category_set_name": "donotanswer", "judge": "phrase",
    "hook_kind": "resid_post", "layer": "auto", "results_root": "", "run_name": "r",
    "generalization_sources": ["rho_bbq", "harmbench", "rho_overrefusal"], "data_curve_source": "rho_overrefusal",
    "n_train_per_category": 60, "candidate_layers": [6, 9, 12],
}  # fmt: skip


def test_fast_overrides_shrink_sizes_and_keep_the_fast_sources_in_order() -> None:
    overrides = fast_overrides(PARAMETERS)
    assert overrides["n_train_per_category"] == 8 and overrides["candidate_layers"] == [9, 15]
    assert overrides["generalization_sources"] == ["harmbench", "rho_overrefusal"]


def test_a_data_curve_source_must_be_held_out() -> None:
    check_parameters(PARAMETERS)
    check_parameters({**PARAMETERS, "data_curve_source": None})
    with pytest.raises(ValueError, match="data_curve_source 'rho_bias' is not held out"):
        check_parameters({**PARAMETERS, "data_curve_source": "rho_bias"})


def test_prepare_run_applies_the_fast_sizes_seeds_and_names_the_run(tmp_path) -> None:
    setup = prepare_run({**PARAMETERS, "results_root": str(tmp_path)})
    first = random.random()
    assert setup.parameters["n_train_per_category"] == 8 and setup.parameters["judge"] == "phrase"
    assert setup.config.parameters["n_train_per_category"] == 8 and setup.config.run_dir == tmp_path / "r"
    assert setup.category_set.name == "donotanswer"
    prepare_run({**PARAMETERS, "results_root": str(tmp_path), "fast": False})
    assert random.random() == first  # the same seed, the same stream
    assert prepare_run({**PARAMETERS, "fast": False, "results_root": str(tmp_path)}).parameters["n_train_per_category"] == 60
