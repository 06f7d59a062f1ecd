"""Tests of the precision choice: CPU capability and flags mocked both ways, CUDA, forced names, errors, the cache."""

from __future__ import annotations

import json

import pytest
import torch

from scripts import precision
from scripts.precision import (
    cpu_bfloat16_from_flags,
    cpu_flags,
    cpu_model_name,
    native_cpu_bfloat16,
    resolve_precision,
)

AVX512_BF16_FLAGS = frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"})
AVX2_FLAGS = frozenset({"fpu", "avx2", "fma"})


@pytest.fixture()
def cpu(monkeypatch, tmp_path):
    """Mock the CPU: returns a setter of (capability, flags, machine); the cache goes to a temporary directory."""
    monkeypatch.setenv("REFUSAL_CONTROL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_timing(repeats: int = 3):
        raise AssertionError("the flags settle this; nothing must be timed")

    monkeypatch.setattr(precision, "time_cpu_bfloat16", no_timing)

    def set_cpu(capability: str, flags: frozenset[str] | None, machine: str = "x86_64") -> None:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        monkeypatch.setattr(precision.platform, "machine", lambda: machine)

    return set_cpu


def test_auto_is_bfloat16_on_a_cpu_with_native_bfloat16(cpu):
    cpu("AVX512", AVX512_BF16_FLAGS)
    assert native_cpu_bfloat16()
    resolved = resolve_precision("auto", "cpu")
    assert (resolved.name, resolved.dtype, resolved.requested) == ("bfloat16", torch.bfloat16, "auto")
    assert "avx512_bf16" in resolved.reason
    assert resolve_precision("auto").device_type == "cpu"  # device=None resolves to the CPU without CUDA


@pytest.mark.parametrize(
    ("capability", "flags"),
    [
        ("AVX2", AVX512_BF16_FLAGS),  # ATEN_CPU_CAPABILITY=avx2 on a bfloat16 CPU: the kernels may not use it
        ("AVX2", AVX2_FLAGS),
        ("AVX512", frozenset({"avx512f", "avx2"})),  # AVX-512 without the bfloat16 extension
        ("DEFAULT", AVX512_BF16_FLAGS),
    ],
)
def test_auto_is_float32_on_a_cpu_without_native_bfloat16(cpu, capability, flags):
    cpu(capability, flags)
    assert not native_cpu_bfloat16()
    resolved = resolve_precision("auto", "cpu")
    assert (resolved.name, resolved.dtype) == ("float32", torch.float32)


def test_a_onednn_isa_limit_below_bfloat16_means_float32(cpu, monkeypatch):
    cpu("AVX512", AVX512_BF16_FLAGS)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolve_precision("auto", "cpu").name == "float32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert resolve_precision("auto", "cpu").name == "bfloat16"


def test_forced_precisions_ignore_the_device(cpu):
    cpu("AVX2", AVX2_FLAGS)
    forced = resolve_precision("bfloat16", "cpu")
    assert (forced.name, forced.reason) == ("bfloat16", "forced")
    cpu("AVX512", AVX512_BF16_FLAGS)
    assert resolve_precision("float32", "cpu").dtype == torch.float32


def test_unknown_precision_names_the_valid_ones(cpu):
    with pytest.raises(ValueError, match="'fp16'.*auto.*bfloat16.*float32"):
        resolve_precision("fp16", "cpu")


def test_cuda_auto_follows_native_bfloat16_support(cpu, monkeypatch):
    calls = []

    def supported(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return support

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    support = True
    assert resolve_precision("auto", "cuda").name == "bfloat16"
    support = False
    assert resolve_precision("auto", "cuda:0").name == "float32"
    assert calls == [False, False]  # emulated bfloat16 does not count
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("auto").device_type == "cuda"  # device=None picks CUDA when available


def test_autocast_runs_the_forward_in_the_resolved_dtype(cpu):
    cpu("AVX512", AVX512_BF16_FLAGS)
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with resolve_precision("bfloat16", "cpu").autocast():
        assert (a @ b).dtype == torch.bfloat16
    with resolve_precision("float32", "cpu").autocast():
        assert (a @ b).dtype == torch.float32


def test_unclear_cpu_is_timed_once_and_cached(cpu, monkeypatch, tmp_path):
    cpu("SVE256", frozenset({"fp", "asimd", "bf16"}), machine="aarch64")
    timings = []

    def fake_timing(repeats: int = 3) -> dict[str, float]:
        timings.append(repeats)
        return {"float32_ms": 10.0, "bfloat16_ms": 4.0}

    monkeypatch.setattr(precision, "time_cpu_bfloat16", fake_timing)
    monkeypatch.setattr(precision, "cpu_model_name", lambda: "Test CPU")
    assert native_cpu_bfloat16()
    assert resolve_precision("auto", "cpu").name == "bfloat16"
    assert len(timings) == 1  # the second answer came from the cache file

    path = tmp_path / "cache" / "precision" / "cpu_bfloat16.json"
    stored = json.loads(path.read_text())
    key = f"Test CPU | torch {torch.__version__} | SVE256"
    assert stored == {key: {"float32_ms": 10.0, "bfloat16_ms": 4.0, "native": True}}

    # Another capability is another key: measured again, and its slower bfloat16 gives float32.
    cpu("SVE128", frozenset({"fp"}), machine="aarch64")
    monkeypatch.setattr(precision, "time_cpu_bfloat16", lambda repeats=3: {"float32_ms": 10.0, "bfloat16_ms": 300.0})
    assert resolve_precision("auto", "cpu").name == "float32"
    assert set(json.loads(path.read_text())) == {key, f"Test CPU | torch {torch.__version__} | SVE128"}


def test_flag_rules_settle_only_what_they_can():
    assert cpu_bfloat16_from_flags("AVX512", frozenset({"amx_bf16"}), "x86_64")[0] is True
    assert cpu_bfloat16_from_flags("AVX512", None, "x86_64")[0] is None  # no /proc/cpuinfo: time it
    assert cpu_bfloat16_from_flags("AVX512", AVX512_BF16_FLAGS, "arm64")[0] is None
    assert cpu_bfloat16_from_flags("AVX2", None, "AMD64")[0] is False


def test_cpuinfo_reader_parses_flags_and_model_name(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test EPYC 9999\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    monkeypatch.setattr(precision, "CPUINFO_PATH", info)
    assert cpu_flags() == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert cpu_model_name() == "Test EPYC 9999"
    monkeypatch.setattr(precision, "CPUINFO_PATH", tmp_path / "missing")
    assert cpu_flags() is None
    assert cpu_model_name()  # falls back to the platform's name


def test_time_cpu_bfloat16_measures_both_precisions():
    timing = precision.time_cpu_bfloat16(repeats=1)
    assert set(timing) == {"float32_ms", "bfloat16_ms"}
    assert all(value > 0 for value in timing.values())
