import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import scripts.paths as paths
from scripts.paths import (
    CACHE_ENV_VAR,
    NOTEBOOK_PATH,
    REPO_ROOT,
    RunConfig,
    cache_dir,
    data_dir,
    models_dir,
    notebook_parameter_names,
    results_dir,
)


def test_cache_dir_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    assert models_dir() == tmp_path / "cache" / "models" and models_dir().is_dir()
    assert data_dir() == tmp_path / "cache" / "data" and data_dir().is_dir()


def test_repository_paths_come_from_the_package_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert REPO_ROOT == Path(paths.__file__).resolve().parents[1]
    assert (REPO_ROOT / "pyproject.toml").is_file() and NOTEBOOK_PATH.is_file()
    assert results_dir() == REPO_ROOT / "results"
    # A run with the default results root lands in the repository's results/, wherever it is started.
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "repo")
    config = RunConfig(model="m", layer=1, name="r")
    assert config.run_dir == tmp_path / "repo" / "results" / "r"
    assert RunConfig(model="m", layer=1, name="r", results_root="out").run_dir == Path("out") / "r"


def test_run_config_names_every_artifact(tmp_path):
    config = RunConfig(model="org/My-Model", layer=15, seed=3, results_root=str(tmp_path), name="run")
    assert config.artifact_path("vectors") == tmp_path / "run" / "vectors.safetensors"
    assert config.artifact_path("generations", "base") == tmp_path / "run" / "generations" / "base.jsonl"
    assert config.artifact_path("generations", "base").parent.is_dir()
    with pytest.raises(ValueError, match="known kinds"):
        config.artifact_path("nonsense")
    with pytest.raises(ValueError, match="needs a name"):
        config.artifact_path("judge")


def test_an_empty_name_is_derived_from_the_settings_and_kept_when_the_layer_is_chosen(tmp_path):
    settings = {"model": "org/My-Model", "seed": 3, "results_root": str(tmp_path),
                "parameters": {"layer": "auto", "routing": "probe"}}
    config = RunConfig(**settings)
    alias, seed, digest = config.name.split("_")
    assert (alias, seed, len(digest)) == ("My-Model", "s3", 8) and int(digest, 16) >= 0
    assert RunConfig(**settings).name == config.name  # the same settings name the same directory (resume)
    other = RunConfig(**{**settings, "parameters": {"layer": "auto", "routing": "probe+token"}})
    assert other.name != config.name
    assert RunConfig(**{**settings, "seed": 4}).name != config.name
    run_dir = config.run_dir
    path = config.record_choices(layer=18, positive_strength=8, negative_strength=-6)
    assert path == run_dir / "config.json" and config.run_dir == run_dir  # the choice does not rename the run
    saved = json.loads(path.read_text())
    assert (saved["layer"], saved["positive_strength"], saved["negative_strength"]) == (18, 8.0, -6.0)
    assert saved["name"] == config.name and "L-1" not in config.name


def test_run_config_round_trips_through_json(tmp_path):
    config = RunConfig(model="m", layer=2, seed=5, results_root=str(tmp_path), hook_kind="resid_mid",
                       positive_strength=8.0, negative_strength=-6.0,
                       parameters={"routing": "probe+token", "candidate_layers": [6, 9], "system_prompt": None,
                                   "sweep_positive_strengths": [4.0, 8.0], "fast": True, "layer": "auto",
                                   "nested": {"a": [1, {"b": None}]}})
    assert RunConfig.from_json(config.to_json()) == config
    assert RunConfig.load(config.save()) == config
    unchosen = RunConfig(model="m")
    assert RunConfig.from_json(unchosen.to_json()) == unchosen and unchosen.layer is None
    with pytest.raises(ValueError, match=r"unknown run configuration field\(s\) \['extra'\]; known fields"):
        RunConfig.from_json(json.dumps({"model": "m", "extra": {}}))


def test_from_parameters_records_what_the_sweep_leaves_open_and_every_other_setting():
    notebook = {"model_name": "smollm2", "seed": 1, "hook_kind": "resid_post", "results_root": "", "run_name": "",
                "layer": "auto", "positive_strength": 4.0, "negative_strength": -6.0, "candidate_layers": [9, 15],
                "routing": "probe", "probe_threshold_method": "fpr", "batch_size": 16, "judge": "phrase",
                "fast": True, "system_prompt": None}
    auto = RunConfig.from_parameters(notebook)
    assert (auto.model, auto.seed, auto.layer, auto.positive_strength, auto.negative_strength) == (
        "smollm2", 1, None, None, None)  # the sweep chooses them: the given strengths are not what the run uses
    assert auto.parameters == {"layer": "auto", "candidate_layers": [9, 15], "routing": "probe",
                               "probe_threshold_method": "fpr", "batch_size": 16, "judge": "phrase", "fast": True,
                               "system_prompt": None}
    assert auto.name.startswith("smollm2_s1_")
    fixed = RunConfig.from_parameters({**notebook, "layer": 12})
    assert (fixed.layer, fixed.positive_strength, fixed.negative_strength) == (12, 4.0, -6.0)
    assert fixed.name != auto.name
    with pytest.raises(ValueError, match="layer must be an int or 'auto'"):
        RunConfig.from_parameters({**notebook, "layer": "12"})
    with pytest.raises(ValueError, match="model_name"):
        RunConfig.from_parameters({"seed": 0})


def test_notebook_parameters_invert_from_parameters_as_the_run_was_asked():
    notebook = {"model_name": "smollm2", "seed": 1, "hook_kind": "resid_post", "results_root": "", "run_name": "r",
                "layer": "auto", "candidate_layers": [9, 15], "routing": "probe", "batch_size": 16}
    auto = RunConfig.from_parameters(notebook)
    auto.record_choices(15, 8.0, -6.0)  # the sweep's choice is run again by the same sweep, not fixed
    auto.parameters["routing_policy_fitted"] = {"name": "binary"}  # a recorded choice, not a parameter
    assert auto.notebook_parameters() == notebook
    fixed = RunConfig.from_parameters({**notebook, "layer": 12, "positive_strength": 4.0, "negative_strength": -6.0})
    assert fixed.notebook_parameters() == {**notebook, "layer": 12, "positive_strength": 4.0, "negative_strength": -6.0}
    assert RunConfig.from_parameters(fixed.notebook_parameters()) == fixed


def test_notebook_parameter_names(tmp_path):
    cell = {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "outputs": [], "execution_count": None,
            "source": ["# comment\n", "a = 1  # note\n", "b: int = 2\n", "a = 3\n", "print(a)\n"]}
    notebook = tmp_path / "n.ipynb"
    notebook.write_text(json.dumps({"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# t"]}, cell]}))
    assert notebook_parameter_names(notebook) == ("a", "b")
    notebook.write_text(json.dumps({"cells": [{**cell, "metadata": {}}]}))
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        notebook_parameter_names(notebook)
    names = notebook_parameter_names()
    assert {"model_name", "layer", "positive_strength", "routing", "seed", "fast", "run_name"} <= set(names)


@pytest.mark.parametrize(
    "command",
    [
        *([str(bench.relative_to(REPO_ROOT)), "--help"] for bench in sorted((REPO_ROOT / "bench").glob("*.py"))),
        ["-m", "scripts.run_notebook", "--help"],
        ["-m", "eval_refusal_judge_azure", "--help"],
        ["-m", "refusal_tradeoff_plot", "--help"],
    ],
    ids=" ".join,
)
def test_command_lines_run_from_outside_the_repository(tmp_path, command):
    # Only an installed project (`pip install -e .`, as `make setup` does) is importable from elsewhere.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    args = [str(REPO_ROOT / command[0]), *command[1:]] if command[0].endswith(".py") else command
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")
