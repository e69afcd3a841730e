"""What the machine can do and what a step used: the peak FLOP/s that MFU divides by, and peak memory;
and how the CPU process's allocator keeps memory between steps.

A GPU's peak is a datasheet figure (budget.PEAK_BF16_FLOPS). A CPU has no such figure that a run could
trust (cores, vector width, clocks and the BLAS differ), so it is measured: a few float32 matmuls large
enough to run at their best, through the products the linear layers use (the BLAS or oneDNN: linear.py),
by the first few runs per machine, thread count, torch version and that backend, and the best rate
remembered in `cpu-peak-flops.json` beside the data cache (`$MOA_TRAIN_CACHE`). MFU on CPU
is therefore a share of the matmul rate this machine reaches, not of a theoretical peak.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import time
from pathlib import Path

import torch

from .linear import cpu_linear_backend, linear
from .utils import read_machine_cache, write_machine_cache

PEAK_FILE = "cpu-peak-flops.json"
PROBE_SIZE = 1024  # 2.1 GFLOP a matmul: ~15 ms at 150 GFLOP/s, large enough for the BLAS's blocked kernels
PROBE_REPEATS = 8
PEAK_PROBES = 3  # runs that probe before the cached best is trusted (cpu_peak_flops)


def _cpuinfo(field: str) -> str:
    """The first `field` line's value in /proc/cpuinfo; '' where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU's feature flags (avx2, avx512f, amx_tile, ...); '' where /proc/cpuinfo does not say."""
    return _cpuinfo("flags")


def cpu_vendor() -> str:
    """GenuineIntel, AuthenticAMD, ...; '' where /proc/cpuinfo does not say."""
    return _cpuinfo("vendor_id")


def measure_matmul_flops(size: int = PROBE_SIZE, repeats: int = PROBE_REPEATS) -> float:
    """The best float32 matmul rate of this process's threads, in FLOP/s, through the products the model's
    linear layers use (the BLAS or oneDNN: linear.py)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    linear(a, b)  # the first call sets up buffers and threads
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        linear(a, b)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def cpu_peak_flops(directory: Path) -> float:
    """The measured float32 matmul peak of this CPU at the current thread count, cached in `directory` (the data
    cache's) per machine: the best of the first PEAK_PROBES runs' probes. One probe can land in a slow phase of a
    shared machine (seen: 100 against 175 GFLOP/s), which would leave MFU above 100% for good; probes from
    different runs, seconds to hours apart, rarely all do."""
    key = peak_cache_key()
    path = directory / PEAK_FILE
    known = read_machine_cache(path)
    best, probes = _cached_peak(known.get(key))
    if probes >= PEAK_PROBES:
        return best
    peak = max(best, measure_matmul_flops())
    write_machine_cache(path, {**known, key: {"peak": peak, "probes": probes + 1}})
    return peak


def peak_cache_key() -> str:
    """What a cached peak holds for: this machine, thread count, torch version and the linear layers' backend."""
    return f"{cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__} | {cpu_linear_backend()}"


def _cached_peak(entry) -> tuple[float, int]:
    """(best peak so far, probes behind it) of a cache entry; a bare number is an older cache's single probe."""
    if isinstance(entry, (int, float)) and entry > 0:
        return float(entry), 1
    if isinstance(entry, dict) and isinstance(entry.get("peak"), (int, float)) and entry["peak"] > 0 \
            and isinstance(entry.get("probes"), int):
        return float(entry["peak"]), entry["probes"]
    return 0.0, 0


# ----------------------------------------------------------------------------- peak memory of a step

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark: CUDA's allocator statistics, or on Linux the process's peak resident
    set (writing 5 to clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:  # not Linux, or not allowed: the mark is then the process's lifetime peak
        pass


def peak_memory_mib(device: torch.device) -> float:
    """Since the last reset: CUDA's maximum allocated memory, or the CPU process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if platform.system() == "Darwin" else maxrss / 1024  # bytes on macOS, kB elsewhere


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from the heap and are reused; 32 MiB where glibc refuses more (its documented
# maximum; the glibc of the development machines, 2.36, takes 1 GiB)
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a step frees for the next step. By default it hands blocks over
    128 KiB (at most 32 MiB after its own adjustment) back to the kernel, by munmap or by trimming the heap,
    and the next step's tensors of the same sizes then fault in fresh zero-filled pages: at the peers dims
    (docs/benchmarks.md) a transformers Llama step takes 66-77k page faults and 140-180 ms of system time,
    this project's 15k (43 ms); with this setting 7-11k and about 1.2k. Blocks up to 1 GiB then come from
    the heap, and the heap is not trimmed: the resident set stays at its peak instead of dropping between
    steps. It is what PyTorch's CPU tuning guide gets by preloading jemalloc or tcmalloc, without the extra
    library. Left alone where the user tuned the allocator (glibc's MALLOC_* variables, another malloc in
    LD_PRELOAD) or libc is not glibc. Process-wide; returns whether it applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in ALLOCATOR_ENV) or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    libc = ctypes.CDLL(None)
    if not any(libc.mallopt(M_MMAP_THRESHOLD, threshold) for threshold in MMAP_THRESHOLDS):
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
