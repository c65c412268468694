"""Timing one step: GPU through `triton.testing.do_bench` (CUDA events, L2 flushed per rep),
CPU through `time.perf_counter` around each call with the modes of one step interleaved.

CPU timing is a careful median with its spread rather than `torch.utils.benchmark`: its
`blocked_autorange` times blocks of calls back to back, one mode after another, so a load spike
on a shared host lands on one mode only (the committed quick run once showed clip/torch N=1024
fwd 22.2 ms > fwd+bwd 16.8 ms). Here the modes of one (impl, N, D, dtype) take turns call by
call, so a spike hits all of them, grads are cleared between calls untimed, and every row keeps
min / p20 / p50 / p80 / max of its calls.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gammacl.measure.inputs import Step

QUANTILES = (0.0, 0.2, 0.5, 0.8, 1.0)
TIME_KEYS = ("time_ms_min", "time_ms_p20", "time_ms_p50", "time_ms_p80", "time_ms_max")
NOISY = 0.5  # (p80 - p20) / p50 above this: the row is flagged noisy


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:  # a faulted context: nothing more to free here
            pass
        torch.cuda.empty_cache()


def classify_error(exc: BaseException) -> tuple[str, str]:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    low = str(exc).lower()
    oom = isinstance(exc, torch.OutOfMemoryError) or any(
        s in low for s in ("out of memory", "can't allocate memory", "cublas_status_alloc_failed")
    )
    if oom:
        return "OOM", msg[:300]
    return "error", f"{type(exc).__name__}: {msg}"[:300]


def quantiles(xs: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Linear-interpolation quantiles of xs (numpy's default method)."""
    s = sorted(xs)
    out = []
    for q in qs:
        pos = q * (len(s) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(s) - 1)
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out


@dataclasses.dataclass
class TimingConfig:
    warmup: int = 1  # CPU: untimed calls per mode first
    min_reps: int = 5  # CPU: at least this many timed calls per mode
    min_time_s: float = 0.2  # CPU: and until this much time per mode is spent
    max_reps: int = 50
    gpu_warmup_ms: int = 25  # triton.testing.do_bench
    gpu_rep_ms: int = 100


def timer_name(device: torch.device) -> str:
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is not None:
            return "triton.testing.do_bench (CUDA events, L2 flushed per rep)"
        return "CUDA events"
    return "time.perf_counter (CPU wall clock, modes interleaved call by call)"


def summarise(times_ms: Sequence[float]) -> dict[str, Any]:
    vals = quantiles(times_ms, QUANTILES)
    out: dict[str, Any] = dict(zip(TIME_KEYS, vals, strict=True))
    out["reps"] = len(times_ms)
    return out


def spread(row: dict[str, Any]) -> float | None:
    """(p80 - p20) / p50 of a timed row, None when it has no timing."""
    p20, p50, p80 = row.get("time_ms_p20"), row.get("time_ms_p50"), row.get("time_ms_p80")
    if p20 is None or p50 is None or p80 is None or p50 <= 0:
        return None
    return (p80 - p20) / p50


def _gpu(fn: Callable[[], Any], step: Step, device: torch.device, cfg: TimingConfig) -> dict:
    from gammacl.dispatch import interpreter_on

    if interpreter_on():
        raise RuntimeError("refusing to time on CUDA with TRITON_INTERPRET=1 set")
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        vals = do_bench(
            fn,
            warmup=cfg.gpu_warmup_ms,
            rep=cfg.gpu_rep_ms,
            grad_to_none=step.leaves or None,
            quantiles=list(QUANTILES),
        )
        return {**dict(zip(TIME_KEYS, vals, strict=True)), "reps": None}
    times = []
    for i in range(cfg.warmup + max(cfg.min_reps, 10)):
        step.clear_grads()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        if i >= cfg.warmup:
            times.append(start.elapsed_time(end))
    return summarise(times)


def time_modes(
    fns: dict[str, Callable[[], Any]], step: Step, device: torch.device, cfg: TimingConfig
) -> dict[str, dict[str, Any] | BaseException]:
    """Per mode: {time_ms_min, _p20, _p50, _p80, _max, reps} of one call, or the exception it
    raised. GPU: do_bench per mode. CPU: the modes take turns call by call (see the module
    docstring) until each has >= min_reps calls and min_time_s seconds, or max_reps calls."""
    out: dict[str, dict[str, Any] | BaseException] = {}
    if device.type == "cuda":
        for mode, fn in fns.items():
            try:
                out[mode] = _gpu(fn, step, device, cfg)
            except Exception as exc:
                out[mode] = exc
        return out
    live = dict(fns)
    for mode, fn in list(live.items()):
        try:
            for _ in range(cfg.warmup):
                step.clear_grads()
                fn()
        except Exception as exc:
            out[mode] = exc
            del live[mode]
    times: dict[str, list[float]] = {m: [] for m in live}
    spent = dict.fromkeys(live, 0.0)

    def more(m: str) -> bool:
        n = len(times[m])
        return n < cfg.min_reps or (spent[m] < cfg.min_time_s and n < cfg.max_reps)

    while any(more(m) for m in list(live)):
        for mode, fn in list(live.items()):
            if not more(mode):
                continue
            step.clear_grads()
            try:
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
            except Exception as exc:
                out[mode] = exc
                del live[mode], times[mode]
                continue
            times[mode].append(dt * 1e3)
            spent[mode] += dt
    step.clear_grads()
    for mode, ts in times.items():
        out[mode] = summarise(ts)
    return {m: out[m] for m in fns}


def time_call(
    fn: Callable[[], Any], step: Step, device: torch.device, cfg: TimingConfig
) -> dict[str, Any]:
    """One mode's {time_ms_min .. time_ms_max, reps} (time_modes with a single mode)."""
    res = time_modes({"call": fn}, step, device, cfg)["call"]
    if isinstance(res, BaseException):
        raise res
    return res
