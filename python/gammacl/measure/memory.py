"""Peak memory of one call: the torch CUDA allocator, NVML (gammacl.measure.nvml) and, on CPU,
the process peak resident set (Linux /proc: VmHWM, reset per call through clear_refs).

RSS deltas are clamped at 0 (`delta_mib`): a call served from memory malloc already holds, or
smaller than a page, raises the peak by nothing, and subtracting the inputs' grads from such a
figure would read negative (-0.125 MiB at N=256, D=64 before this clamp). The clamp is said in
bench/README.md; below the resolution a row reads 0, never a negative size.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from typing import Any

import torch

from gammacl.measure.inputs import Step
from gammacl.measure.nvml import NvmlSampler, NvmlView
from gammacl.measure.timing import sync

MIB = float(2**20)
MALLOC_PINNED = False  # set by pin_malloc_mmap_threshold (the profile CLI entry point only)
MALLOC_TOGGLE = False  # set by the bench CLI entry point: exact_rss() pins around each probe
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc_call(name: str, *args: int) -> bool:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(getattr(libc, name)(*[int(a) for a in args]))
    except (OSError, AttributeError):
        return False


def _mallopt(param: int, value: int) -> bool:
    return _libc_call("mallopt", param, value)


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def meminfo_mib(key: str) -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def pin_malloc_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """glibc: serve every allocation >= nbytes by mmap and unmap it on free (fixes the dynamic
    M_MMAP_THRESHOLD, which otherwise grows after frees up to 32 MiB and keeps freed buffers in
    the heap), so peak RSS deltas follow the live large buffers of each step. Costs page faults
    per large allocation: the profiler uses it, the timing benchmark does not."""
    global MALLOC_PINNED
    MALLOC_PINNED = _mallopt(_M_MMAP_THRESHOLD, nbytes)
    return MALLOC_PINNED


@contextlib.contextmanager
def exact_rss():
    """The bench CLI on CPU (MALLOC_TOGGLE): glibc releases its free heap pages (malloc_trim)
    and serves allocations >= 128 KiB by mmap during a memory probe, so its RSS delta counts the
    step's large buffers even where they reuse heap chunks freed by the timed calls. Afterwards
    it goes back to timing-friendly fixed thresholds (mmap at 32 MiB, glibc's dynamic maximum;
    trim at 64 MiB), so timed calls reuse heap memory as a long-running process does. Yields
    whether the probe is exact; a no-op when the profile pinned glibc."""
    if MALLOC_PINNED or not MALLOC_TOGGLE:
        yield MALLOC_PINNED
        return
    ok = _mallopt(_M_MMAP_THRESHOLD, 128 * 1024) and _mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    _libc_call("malloc_trim", 0)
    try:
        yield ok
    finally:
        _mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        _mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


def device_capacity(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def delta_mib(peak: int | None, before: int | None, minus: int = 0) -> float | None:
    """(peak - before - minus) bytes in MiB, clamped at 0 (see the module docstring)."""
    if peak is None or before is None:
        return None
    return max(0.0, (peak - before - minus) / MIB)


def measure_memory(
    fn: Callable[[], Any],
    step: Step,
    device: torch.device,
    *,
    nvml: NvmlView | None = None,
    sample_ms: float = 2.0,
) -> dict[str, Any]:
    """One call of fn: torch allocator peaks over what was allocated before it (CUDA), NVML
    device-used peak (CUDA with NVML), process peak RSS over the RSS before it (CPU). Columns a
    device cannot provide are None (null), never 0."""
    out: dict[str, Any] = {
        "base_allocated": None,
        "peak_allocated": None,
        "peak_reserved": None,
        "nvml_before": None,
        "nvml_peak": None,
        "nvml_samples": None,
        "rss_before": None,
        "rss_peak": None,
        "rss_reset": None,
    }
    step.clear_grads()
    if device.type == "cuda":
        sync(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        out["base_allocated"] = torch.cuda.memory_allocated(device)
        sampler = NvmlSampler(nvml, sample_ms) if nvml is not None and nvml.ok else None
        if sampler is not None:
            with sampler:
                res = fn()
                sync(device)
            out.update(
                nvml_before=sampler.before, nvml_peak=sampler.peak, nvml_samples=sampler.samples
            )
        else:
            res = fn()
            sync(device)
        out["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved"] = torch.cuda.max_memory_reserved(device)
        del res
    else:
        gc.collect()
        out["rss_reset"] = reset_peak_rss()
        rss0 = _proc_status_kib("VmRSS")
        res = fn()
        hwm = _proc_status_kib("VmHWM")
        del res
        if rss0 is not None and hwm is not None:
            out["rss_before"], out["rss_peak"] = rss0 * 1024, hwm * 1024
    return out
