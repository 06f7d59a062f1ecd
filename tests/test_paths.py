import pytest

from scripts.paths import CACHE_ENV_VAR, RunConfig, cache_dir, data_dir, models_dir


def test_cache_dir_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    assert models_dir() == tmp_path / "cache" / "models" and models_dir().is_dir()
    assert data_dir() == tmp_path / "cache" / "data" and data_dir().is_dir()


def test_run_config_names_every_artifact(tmp_path):
    config = RunConfig(model="org/My-Model", layer=15, seed=3, results_root=str(tmp_path))
    assert config.name == "My-Model_L15_s3"
    assert config.artifact_path("vectors") == tmp_path / "My-Model_L15_s3" / "vectors.safetensors"
    assert config.artifact_path("generations", "base") == tmp_path / "My-Model_L15_s3" / "generations" / "base.jsonl"
    assert config.artifact_path("generations", "base").parent.is_dir()
    with pytest.raises(ValueError, match="known kinds"):
        config.artifact_path("nonsense")
    with pytest.raises(ValueError, match="needs a name"):
        config.artifact_path("judge")


def test_run_config_save_load(tmp_path):
    config = RunConfig(model="m", layer=2, results_root=str(tmp_path), extra={"strength": 4.0})
    loaded = RunConfig.load(config.save())
    assert loaded == config
