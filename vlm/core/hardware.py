"""What this machine computes fast, and the precision ``auto`` resolves to on it.

bf16 autocast is a large win where the hardware multiplies bf16 natively (CUDA GPUs with bf16
support; CPUs with AMX, and often those with AVX-512 bf16) and a large loss where it is emulated:
on an AVX2-only CPU a bf16 matmul runs about 20x slower than fp32. :func:`resolve_precision`
decides from capability flags and, where flags are not enough (AVX-512 bf16 without AMX), from a
short micro-probe (matmul and convolution, fp32 against bf16 autocast) whose answer is cached on
disk per CPU model and torch version. torch is imported inside the functions: the rest of
``vlm.core`` stays free of it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Optional, Tuple

logger = logging.getLogger(__name__)

# the CPU flags (as /proc/cpuinfo spells them) that decide bf16 speed
BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
PROBE_FILE = "bf16_probe.json"
# bf16 must beat fp32 by this factor in the probe to be chosen (noise margin)
PROBE_MIN_SPEEDUP = 1.1


@dataclass(frozen=True)
class GPU:
    """One CUDA device: its name, compute capability and whether it runs bf16 natively."""

    name: str
    capability: Tuple[int, int]
    bf16: bool


@dataclass(frozen=True)
class Hardware:
    """The machine as precision choices see it."""

    cpu_model: str
    cpu_capability: str  # torch's own reading: AVX2, AVX512, DEFAULT, ...
    cpu_flags: FrozenSet[str] = field(default_factory=frozenset)
    gpus: Tuple[GPU, ...] = ()

    @property
    def hardware_class(self) -> str:
        """The class a measured figure holds for: ``cuda-bf16``, ``cuda``, ``cpu-amx``,
        ``cpu-avx512-bf16``, ``cpu-avx512``, ``cpu-avx2`` or ``cpu``."""
        if self.gpus:
            return "cuda-bf16" if self.gpus[0].bf16 else "cuda"
        if "amx_bf16" in self.cpu_flags:
            return "cpu-amx"
        if "avx512_bf16" in self.cpu_flags:
            return "cpu-avx512-bf16"
        if "avx512f" in self.cpu_flags:
            return "cpu-avx512"
        if "avx2" in self.cpu_flags:
            return "cpu-avx2"
        return "cpu"

    def describe(self) -> str:
        """One line: CPU model, capability and the bf16-relevant flags (and the GPUs)."""
        flags = ", ".join(f for f in BF16_FLAGS if f in self.cpu_flags) or "none"
        text = f"{self.cpu_model} (torch capability {self.cpu_capability}; flags: {flags})"
        for gpu in self.gpus:
            text += f"; GPU {gpu.name} sm_{gpu.capability[0]}{gpu.capability[1]} bf16={gpu.bf16}"
        return text


def _cpuinfo() -> Tuple[str, FrozenSet[str]]:
    """(model name, flags) from /proc/cpuinfo; the platform's processor name elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or "unknown", frozenset()
    model, flags = "unknown", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


@functools.lru_cache(maxsize=1)
def detect() -> Hardware:
    """This machine's :class:`Hardware` (read once per process)."""
    import torch

    model, flags = _cpuinfo()
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(GPU(props.name, (props.major, props.minor), bool(torch.cuda.is_bf16_supported())))
    return Hardware(model, torch.backends.cpu.get_cpu_capability(), frozenset(f for f in flags if f in BF16_FLAGS),
                    tuple(gpus))


@dataclass(frozen=True)
class PrecisionChoice:
    """What a stage's ``precision`` resolved to, why, and a warning when the choice is slow here."""

    requested: str
    precision: str  # fp32 | bf16 | fp16
    reason: str
    warning: Optional[str] = None

    def as_record(self) -> Dict[str, str]:
        """The choice as a JSON-able record (stage outputs, metrics.json, ``vlm env``)."""
        record = {"requested": self.requested, "precision": self.precision, "reason": self.reason}
        if self.warning:
            record["warning"] = self.warning
        return record


def cache_dir() -> Path:
    """Where vlm caches what it measured about this machine: ``$VLM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/vlm``, else ``~/.cache/vlm``."""
    if os.environ.get("VLM_CACHE_DIR"):
        return Path(os.environ["VLM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlm"


def _time(fn: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of a 256-wide matmul chain and a 3x3 convolution on the CPU
    (forward + backward, best of 3, alternating): above 1 means bf16 is faster here. Well under a
    second where bf16 is native; a few seconds where it is emulated (where it is never asked)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(128, 256, generator=generator, requires_grad=True)
    w = torch.randn(256, 256, generator=generator, requires_grad=True)
    x = torch.randn(4, 16, 32, 32, generator=generator, requires_grad=True)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)

    def step(bf16: bool) -> Callable[[], object]:
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = (a @ w @ w).float().sum() + conv(x).float().sum()
            loss.backward()
        return run

    for bf16 in (False, True):  # warm-up (kernel selection, allocations)
        step(bf16)()
    fp32 = bf16_time = 0.0
    for _ in range(2):  # alternate, so that a busy neighbour hurts both alike
        fp32 += _time(step(False))
        bf16_time += _time(step(True))
    return fp32 / max(bf16_time, 1e-9)


def probed_bf16_speedup(hardware: Hardware, measure: Callable[[], float] = measure_bf16_speedup) -> float:
    """:func:`measure_bf16_speedup`, cached on disk (``$VLM_CACHE_DIR`` or ``~/.cache/vlm``) per
    CPU model and torch version; an unwritable cache only costs a re-measure."""
    import torch

    key = f"{hardware.cpu_model} | {hardware.cpu_capability} | torch {torch.__version__}"
    path = cache_dir() / PROBE_FILE
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    speedup = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**(cached if isinstance(cached, dict) else {}), key: speedup}, indent=2))
    except OSError as exc:
        logger.debug("cannot cache the bf16 probe in %s: %s", path, exc)
    return speedup


def resolve_precision(requested: str, hardware: Optional[Hardware] = None,
                      probe: Optional[Callable[[Hardware], float]] = None) -> PrecisionChoice:
    """The precision a stage runs in. ``auto``: bf16 where the hardware multiplies bf16 natively
    and faster, fp32 elsewhere (fp16 only when asked). An explicit precision is kept, with a
    warning when it is emulated here. ``probe`` (default :func:`probed_bf16_speedup`) is asked
    only for a CPU with AVX-512 bf16 and no AMX."""
    requested = str(getattr(requested, "value", requested))
    hardware = hardware or detect()
    probe = probe or probed_bf16_speedup
    cls = hardware.hardware_class
    if requested != "auto":
        warning = None
        if requested == "bf16" and cls in ("cpu-avx512", "cpu-avx2", "cpu"):
            warning = (f"precision bf16 on a CPU without native bf16 ({hardware.cpu_capability}): bf16 matmuls are "
                       "emulated here, expect them 10-20x slower than fp32 (precision: auto picks fp32)")
        elif requested == "bf16" and cls == "cuda":
            warning = f"precision bf16 on {hardware.gpus[0].name}, which has no native bf16: expect it slow"
        return PrecisionChoice(requested, requested, "as configured", warning)
    if cls == "cuda-bf16":
        return PrecisionChoice("auto", "bf16", f"CUDA device {hardware.gpus[0].name} supports bf16")
    if cls == "cuda":
        return PrecisionChoice("auto", "fp32", f"CUDA device {hardware.gpus[0].name} has no native bf16")
    if cls == "cpu-amx":
        return PrecisionChoice("auto", "bf16", f"CPU capability {hardware.cpu_capability} with AMX: bf16 matmul is native")
    if cls == "cpu-avx512-bf16":
        speedup = probe(hardware)
        if speedup >= PROBE_MIN_SPEEDUP:
            return PrecisionChoice("auto", "bf16", f"CPU with AVX-512 bf16: bf16 measured {speedup:.2f}x fp32 here")
        return PrecisionChoice("auto", "fp32", f"CPU with AVX-512 bf16: bf16 measured only {speedup:.2f}x fp32 here")
    return PrecisionChoice("auto", "fp32", f"CPU capability {hardware.cpu_capability}, bf16 matmul is emulated")
