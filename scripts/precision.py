"""Choose the floating-point precision of training by what the device computes well.

bfloat16 autocast halves the cost of the matrix products only where the hardware computes bfloat16
natively: CUDA GPUs of compute capability 8.0 or newer, and x86 CPUs with AVX512-BF16 or AMX whose
kernels torch is allowed to use. Elsewhere it is emulated, and far slower than float32 (a
512×576 @ 576×1536 product took 718 ms under bfloat16 autocast against 17 ms in float32 on an AVX2
CPU). :func:`resolve_precision` turns ``"auto"`` into the precision the device does well and records
why; ``"bfloat16"`` and ``"float32"`` force one.

On a CPU the answer comes from torch's kernel capability (``torch.backends.cpu.get_cpu_capability()``,
which the ``ATEN_CPU_CAPABILITY`` variable can lower), oneDNN's ISA limit (``ONEDNN_MAX_CPU_ISA``)
and the CPU's flags in ``/proc/cpuinfo``. Where these do not settle it (another architecture, no
``/proc/cpuinfo``), one small product is timed in both precisions and the answer is cached in
``cache_dir()/precision/cpu_bfloat16.json``, keyed by CPU model, torch version and capability.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scripts.paths import cache_dir

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "bfloat16", "float32")
"""Names :func:`resolve_precision` accepts."""

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}

CPUINFO_PATH = Path("/proc/cpuinfo")
CACHE_NAME = "cpu_bfloat16.json"

NATIVE_BF16_FLAGS: frozenset[str] = frozenset({"avx512_bf16", "amx_bf16"})
"""``/proc/cpuinfo`` flags of x86 instructions that compute bfloat16 products natively."""

WITHOUT_BF16_CAPABILITIES: frozenset[str] = frozenset({"DEFAULT", "NO AVX", "AVX", "AVX2"})
"""Kernel capabilities of torch on x86 (``get_cpu_capability()``) under which no bfloat16 kernel is native."""

ONEDNN_ISA_WITHOUT_BF16: frozenset[str] = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}
)
"""Values of ``ONEDNN_MAX_CPU_ISA`` that keep oneDNN (which runs the bfloat16 products) off bfloat16 instructions."""

X86_MACHINES: frozenset[str] = frozenset({"x86_64", "amd64", "i386", "i686"})

TIMING_SHAPE: tuple[int, int, int] = (512, 576, 1536)
"""``(m, k, n)`` of the product timed where the flags do not settle the question (SmolLM2's MLP at 512 tokens)."""


@dataclass(frozen=True)
class ResolvedPrecision:
    """The precision a run uses, and why.

    Attributes:
        name: ``"bfloat16"`` (forward and backward under bfloat16 autocast; weights and optimizer
            stay float32) or ``"float32"``.
        requested: What was asked for (``"auto"``, ``"bfloat16"`` or ``"float32"``).
        device_type: ``"cpu"``, ``"cuda"``, …
        reason: One sentence on why ``name`` was chosen.
    """

    name: str
    requested: str
    device_type: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """``torch.bfloat16`` or ``torch.float32``."""
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """A context that runs the enclosed forward pass in this precision (a no-op for float32)."""
        if self.name == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``, as ``lscpu`` shows it), else the platform's."""
    try:
        for line in CPUINFO_PATH.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> frozenset[str] | None:
    """The CPU feature flags of ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on ARM); ``None`` where unreadable."""
    try:
        text = CPUINFO_PATH.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return None


def cpu_capability() -> str:
    """torch's CPU kernel capability (``"AVX2"``, ``"AVX512"``, ``"DEFAULT"``, ``"SVE256"``, …)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_description() -> dict[str, str]:
    """The CPU a number was measured on: model name, torch's kernel capability and the machine type."""
    return {"cpu": cpu_model_name(), "cpu_capability": cpu_capability(), "machine": platform.machine()}


def cpu_bfloat16_from_flags(
    capability: str, flags: frozenset[str] | None, machine: str, onednn_max_isa: str | None = None
) -> tuple[bool | None, str]:
    """Whether bfloat16 is native on this CPU, decided from capability, flags and oneDNN's limit alone.

    Args:
        capability: ``torch.backends.cpu.get_cpu_capability()``.
        flags: ``/proc/cpuinfo`` flags (``None``: unknown).
        machine: ``platform.machine()``.
        onednn_max_isa: ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``), if set.

    Returns:
        ``(answer, reason)``; ``answer`` is ``None`` where these do not settle it (then time it).
    """
    if machine.lower() not in X86_MACHINES:
        return None, f"{machine} CPU: no flag rule for bfloat16"
    if capability.upper() in WITHOUT_BF16_CAPABILITIES:
        return False, f"torch's CPU kernels are limited to {capability}"
    if onednn_max_isa and onednn_max_isa.upper() in ONEDNN_ISA_WITHOUT_BF16:
        return False, f"oneDNN is limited to {onednn_max_isa} (ONEDNN_MAX_CPU_ISA)"
    if capability.upper() != "AVX512":
        return None, f"unknown CPU capability {capability!r}"
    if flags is None:
        return None, "CPU flags unreadable"
    native = sorted(flags & NATIVE_BF16_FLAGS)
    if native:
        return True, f"{capability} kernels and {'/'.join(native)} instructions"
    return False, f"{capability} without avx512_bf16 or amx_bf16"


def _onednn_max_isa() -> str | None:
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or None


def time_cpu_bfloat16(repeats: int = 3) -> dict[str, float]:
    """Milliseconds of one :data:`TIMING_SHAPE` product in float32 and under bfloat16 autocast (best of ``repeats``)."""
    m, k, n = TIMING_SHAPE
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator)
    b = torch.randn(k, n, generator=generator)

    def best(autocast: bool) -> float:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        times = []
        with context:
            a @ b  # warm-up: first calls pick and prepare kernels
            for _ in range(repeats):
                began = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - began)
        return min(times) * 1e3

    return {"float32_ms": best(False), "bfloat16_ms": best(True)}


def _cache_path() -> Path:
    return cache_dir() / "precision" / CACHE_NAME


def _cache_key() -> str:
    return f"{cpu_model_name()} | torch {torch.__version__} | {cpu_capability()}"


def measured_cpu_bfloat16() -> tuple[bool, str]:
    """Whether a bfloat16-autocast product beats float32 here; timed once per CPU, torch and capability, then cached.

    Returns:
        ``(native, reason)``, the reason quoting both timings.
    """
    path, key = _cache_path(), _cache_key()
    cached: dict[str, dict] = {}
    if path.exists():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable %s", path)
    if key not in cached:
        timing = time_cpu_bfloat16()
        cached[key] = {**timing, "native": timing["bfloat16_ms"] < timing["float32_ms"]}
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(cached, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(staging, path)
    entry = cached[key]
    reason = f"timed: {entry['bfloat16_ms']:.1f} ms in bfloat16 vs {entry['float32_ms']:.1f} ms in float32"
    return bool(entry["native"]), reason


def cpu_bfloat16_support() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively, and why: flags first, a cached timing where they are unclear."""
    answer, reason = cpu_bfloat16_from_flags(cpu_capability(), cpu_flags(), platform.machine(), _onednn_max_isa())
    if answer is not None:
        return answer, reason
    native, timed = measured_cpu_bfloat16()
    return native, f"{reason}; {timed}"


def native_cpu_bfloat16() -> bool:
    """True where this CPU computes bfloat16 natively (see :func:`cpu_bfloat16_support`)."""
    return cpu_bfloat16_support()[0]


def resolve_precision(precision: str = "auto", device: str | torch.device | None = None) -> ResolvedPrecision:
    """The precision to train in on ``device``.

    ``"auto"``: bfloat16 on a CUDA device that computes it natively (compute capability 8.0+) and on a
    CPU with native bfloat16 (:func:`native_cpu_bfloat16`), float32 everywhere else. ``"bfloat16"``
    and ``"float32"`` force one. The choice is logged.

    Args:
        device: Where the model runs (default: CUDA when available, else CPU).

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {list(PRECISIONS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    if precision != "auto":
        name, reason = precision, "forced"
    elif device_type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        name = "bfloat16" if native else "float32"
        reason = "CUDA device computes bfloat16 natively" if native else "CUDA device without native bfloat16"
    elif device_type == "cpu":
        native, why = cpu_bfloat16_support()
        name = "bfloat16" if native else "float32"
        reason = f"CPU {'with' if native else 'without'} native bfloat16 ({why})"
    else:
        name, reason = "float32", f"no bfloat16 rule for {device_type} devices"
    resolved = ResolvedPrecision(name=name, requested=precision, device_type=device_type, reason=reason)
    logger.info("precision %s -> %s on %s: %s", precision, name, device_type, reason)
    return resolved
