"""Shared parts of the GPU self-checks bench/check_triton_gpu.py and bench/check_cuda_gpu.py.

* `start`: the command line (--no-time, --no-parity) and the refusal without a CUDA device;
* `record`: run one check, keep its failure, print its table line;
* `feats`, `fwd_bwd`, `simlse_case`, `clip_case`: simlse forward (row / column LSE) and
  backward (grads of a, b, scale under random upstream) and clip_loss on one backend against
  gammacl.reference with the test suite's rule (tests/tolerances.py);
* `onepass_case`: the gamma_onepass backend function against reference.gamma.gamma_onepass;
* `time_clip_loss`, `time_onepass`, `bench_ms`, `print_timing`: timings with gammacl.measure
  (time_call: triton.testing.do_bench, median [p20, p80] ms; measure_memory: peak allocated
  over what was allocated before the step);
* `report`, `finish`: the JSON report ($OUT/TOOL.json, or bench/out/ when $OUT is unset), the
  summary and the exit code.

Module level imports only the standard library and torch, so the refusal works wherever torch
imports; gammacl and tests/tolerances.py are imported after it, where they are used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEV = "cuda"  # every tensor of a check lives on the current CUDA device
NAMES = ("row", "col", "da", "db", "dscale")  # the outputs of fwd_bwd
TIMING_HEADER = "clip_loss timings (triton.testing.do_bench, ms: median [p20, p80]):"


# ------------------------------------------------------------------------------------------
# command line, refusal, report
# ------------------------------------------------------------------------------------------


def refusal(*, compiled_triton: bool) -> str | None:
    """Why this process cannot run a GPU check, or None. compiled_triton: the check times and
    tests compiled Triton kernels, so TRITON_INTERPRET must be unset too."""
    if compiled_triton and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: this GPU check must run compiled Triton kernels"
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU"
    return None


def start(
    tool: str, doc: str, argv: list[str] | None, *, no_time_help: str, compiled_triton: bool
) -> argparse.Namespace | None:
    """Parses --no-time / --no-parity; None after printing the refusal when there is no usable
    CUDA device (the caller exits 2). Puts tests/ on sys.path for tests/tolerances.py."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--no-time", action="store_true", help=no_time_help)
    p.add_argument("--no-parity", action="store_true", help="timings only")
    args = p.parse_args(argv)
    why = refusal(compiled_triton=compiled_triton)
    if why:
        print(f"{tool}: refusing to run: {why}", file=sys.stderr)
        return None
    sys.path.insert(0, str(ROOT / "tests"))  # the one tolerance table (tests/tolerances.py)
    return args


def report(**settings: Any) -> dict[str, Any]:
    """The report's header: GPU, versions, host and time, then `settings`, then the float32
    matmul precision."""
    import gammacl

    return {
        "gpu": torch.cuda.get_device_properties(0).name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gammacl": gammacl.__version__,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **settings,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def finish(tool: str, body: dict[str, Any], results: list, *, what: str, ok: bool = True) -> int:
    """Writes body to $OUT/TOOL.json (bench/out/ when $OUT is unset) and prints the summary.
    Exit code: 1 when a check failed or `ok` is False, else 0."""
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{tool}.json"
    path.write_text(json.dumps(body, indent=2))
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} {what} passed; JSON: {path}")
    for name in failed:
        print(f"  FAILED: {name}")
    return 1 if failed or not ok else 0


def record(results: list, name: str, fn: Callable[[], str | None]) -> None:
    """Runs one check and appends {check, ok, detail, s}; an exception is recorded (its first
    3 lines, 400 characters) and the run goes on, so the table shows every failure."""
    t0 = time.time()
    try:
        detail = fn()
        ok = True
    except Exception as exc:
        detail = " | ".join(f"{type(exc).__name__}: {exc}".splitlines()[:3])[:400]
        ok = False
    r = {"check": name, "ok": ok, "detail": detail or "", "s": round(time.time() - t0, 2)}
    results.append(r)
    print(f"  {'ok  ' if ok else 'FAIL'} {name:<58} {r['s']:>6.2f}s  {r['detail']}", flush=True)


def dtype_tag(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------
# parity against gammacl.reference
# ------------------------------------------------------------------------------------------


def acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def feats(m: int, n: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm rows drawn in float64 on DEV (global RNG), then cast to dtype."""
    a = torch.nn.functional.normalize(torch.randn(m, d, device=DEV, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d, device=DEV, dtype=torch.float64), dim=1)
    return a.to(dtype), b.to(dtype)


def fwd_bwd(fn, a, b, s, g_row, g_col, cols: bool) -> list[torch.Tensor]:
    """[row, col, grad a, grad b, grad scale]: tests/tolerances.simlse_fwd_bwd as a list."""
    from tolerances import simlse_fwd_bwd

    return list(simlse_fwd_bwd(fn, a, b, s, g_row, g_col, cols))


def simlse_case(
    backend: str,
    dtype: torch.dtype,
    n: int,
    d: int,
    *,
    offset: int = 0,
    exclude: bool = False,
    cols: bool = True,
    scale: float = 14.3,
    strided: bool = False,
    nan_free: bool = False,
) -> Callable[[], str]:
    """A check of simlse(backend=...) on [n, d] x [n, d] features against reference.simlse: fp64
    within rtol 1e-9, lower precision by assert_close_dtype (2 x torch's own error in the dtype
    + TOL[dtype]). strided: rows 2D + 8 elements apart. nan_free: also fail on a NaN where the
    reference is +-inf (the rule compares the finite entries only). Returns max|err| per output."""
    from tolerances import assert_close_dtype, assert_close_fp64

    from gammacl import reference
    from gammacl.ops.simlse import simlse

    def run() -> str:
        torch.manual_seed(n * 1000 + d)
        a, b = feats(n, n, d, dtype)
        if strided:  # row stride 2D + 8: the GEMMs take it as their leading dimension
            a = torch.cat([a, a, a[:, :8]], dim=1)[:, :d]
            b = torch.cat([b, b, b[:, :8]], dim=1)[:, :d]
        s = torch.tensor(scale, dtype=acc(dtype), device=DEV)
        g_row = torch.randn(n, dtype=torch.float64, device=DEV) / n
        g_col = torch.randn(n, dtype=torch.float64, device=DEV) / n
        kw = dict(offset=offset, exclude_pos=exclude, cols=cols)
        ours = fwd_bwd(
            lambda a, b, s: simlse(a, b, s, backend=backend, **kw), a, b, s, g_row, g_col, cols
        )
        ref = fwd_bwd(
            lambda a, b, s: reference.simlse(a, b, s, upcast=True, **kw),
            a.double(), b.double(), s.double(), g_row, g_col, cols,
        )  # fmt: skip
        if dtype == torch.float64:
            for nm, x, y in zip(NAMES, ours, ref, strict=True):
                assert_close_fp64(x, y, nm)
        else:
            same = fwd_bwd(
                lambda a, b, s: reference.simlse(a, b, s, upcast=False, **kw),
                a, b, s, g_row, g_col, cols,
            )  # fmt: skip
            for nm, x, y, z in zip(NAMES, ours, ref, same, strict=True):
                assert_close_dtype(x, y, z, dtype, nm)
        errs = []
        for nm, x, y in zip(NAMES, ours, ref, strict=True):
            if nan_free:
                assert not torch.isnan(x).any(), f"{nm} has NaN"
            fin = torch.isfinite(y)
            if fin.any():
                errs.append(f"{nm} {float((x.double() - y)[fin].abs().max()):.1e}")
        return "max|err| " + ", ".join(errs)

    return run


ONEPASS_NAMES = ("row_lse", "col_lse", "row_term", "col_term", "da_raw", "db_raw")


def onepass_case(
    backend: str, dtype: torch.dtype, n: int, d: int, *, clamp: float = 30.0, offset: int = 0
) -> Callable[[], str]:
    """A check of the gamma_onepass backend function (gammacl.ops.gamma_onepass._backend_impl:
    row / column LSE, row / column terms, da_raw, db_raw) on [n, d] x [n, d] features against
    reference.gamma.gamma_onepass, with the test suite's rule. Scale 14.3, alphas ~ N(-log n, 1)
    (weights ~ 1/n, as the gamma loss makes them); clamp < 30 makes the cap bite."""
    import math

    from tolerances import assert_close_dtype, assert_close_fp64

    from gammacl.ops.gamma_onepass import _backend_impl
    from gammacl.reference import gamma as ref

    def run() -> str:
        torch.manual_seed(n * 1000 + d + 7)
        a, b = feats(n, n, d, dtype)
        s = torch.tensor(14.3, dtype=acc(dtype), device=DEV)
        ar = (torch.randn(n, device=DEV, dtype=torch.float64) - math.log(n)).to(acc(dtype))
        ac = (torch.randn(n, device=DEV, dtype=torch.float64) - math.log(n)).to(acc(dtype))
        args = (s, ar, ac, 0.3, 0.7, clamp, offset)
        ours = _backend_impl(backend)(a, b, *args, True)
        r64 = ref.gamma_onepass(a, b, *args, upcast=True)
        errs = []
        if dtype == torch.float64:
            for nm, x, y in zip(ONEPASS_NAMES, ours, r64, strict=True):
                assert_close_fp64(x, y, nm)
        else:
            same = ref.gamma_onepass(a, b, *args, upcast=False)
            for nm, x, y, z in zip(ONEPASS_NAMES, ours, r64, same, strict=True):
                assert_close_dtype(x, y, z, dtype, nm)
        for nm, x, y in zip(ONEPASS_NAMES, ours, r64, strict=True):
            assert not torch.isnan(x).any(), f"{nm} has NaN"
            errs.append(f"{nm} {float((x.double() - y.double()).abs().max()):.1e}")
        return "max|err| " + ", ".join(errs)

    return run


def clip_case(backend: str, dtype: torch.dtype, n: int, d: int) -> Callable[[], str]:
    """A check of gammacl.clip_loss(backend=...) value and grads (a, b, scale 30) against
    reference.clip_loss, by assert_close_dtype."""
    from tolerances import assert_close_dtype

    import gammacl
    from gammacl import reference

    def run() -> str:
        torch.manual_seed(n + d)
        a, b = feats(n, n, d, dtype)
        s = torch.tensor(30.0, dtype=acc(dtype), device=DEV)
        args = [x.clone().requires_grad_() for x in (a, b, s)]
        loss = gammacl.clip_loss(*args, backend=backend)
        grads = torch.autograd.grad(loss, args)
        args64 = [x.detach().double().requires_grad_() for x in (a, b, s)]
        ref = reference.clip_loss(*args64)
        ref_g = torch.autograd.grad(ref, args64)
        argsd = [x.detach().clone().requires_grad_() for x in (a, b, s)]
        same = reference.clip_loss(*argsd, upcast=False)
        same_g = torch.autograd.grad(same, argsd)
        assert_close_dtype(loss.detach(), ref.detach(), same.detach(), dtype, "loss")
        for nm, x, y, z in zip(("da", "db", "dscale"), grads, ref_g, same_g, strict=True):
            assert_close_dtype(x, y, z, dtype, nm)
        return f"loss {float(loss.detach()):.6f} ref {float(ref.detach()):.6f}"

    return run


def record_fp64(results: list, case: Callable[..., Callable[[], str]]) -> None:
    """The float64 checks of both scripts: N in {17, 4097}, D = 64, exclude_pos, offset -2."""
    for n, d in ((17, 64), (4097, 64)):
        record(
            results,
            f"simlse float64 N={n} D={d}",
            case(torch.float64, n, d, offset=-2, exclude=True),
        )


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


def tflops(flops: float, ms: float) -> float:
    return round(flops / (ms * 1e-3) / 1e12, 1)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def bench_ms(fn: Callable[[], Any], leaves: Sequence[torch.Tensor] = ()) -> list[float]:
    """[median, p20, p80] ms of fn: gammacl.measure.timing.time_call, i.e. triton.testing.do_bench
    (25 ms warm-up, 100 ms budget, L2 flushed per rep, .grad of `leaves` reset between reps)."""
    from gammacl.measure.inputs import Step
    from gammacl.measure.timing import TimingConfig, time_call

    t = time_call(fn, Step(fn, leaves), torch.device(DEV), TimingConfig())
    return [t["time_ms_p50"], t["time_ms_p20"], t["time_ms_p80"]]


def _peak_extra_mib(step: Callable[[], Any]) -> float | None:
    """MiB allocated at the peak of one step over what was allocated before it (torch's CUDA
    allocator); None where the allocator keeps no such count (CPU)."""
    from gammacl.measure.inputs import Step
    from gammacl.measure.memory import measure_memory

    mem = measure_memory(step, Step(step, ()), torch.device(DEV))
    if mem.get("peak_allocated") is None or mem.get("base_allocated") is None:
        return None
    return round((mem["peak_allocated"] - mem["base_allocated"]) / 2**20, 1)


def time_clip_loss(
    n: int, d: int, backend: str, flops: dict[str, tuple[str, int]]
) -> dict[str, Any]:
    """clip_loss forward (under no_grad) and forward+backward (grads of a, b, scale) of seeded
    [n, d] bf16 features on one backend: {N, D, dtype, backend, fwd_ms, fwd_bwd_ms ([median,
    p20, p80]), peak_extra_mib (allocated during one fwd+bwd over what was allocated before),
    then KEY: TFLOP/s at the median for each KEY: (timing key, FLOPs) of `flops`}; `error`
    instead when a step fails (e.g. the materialised reference running out of memory)."""
    import gammacl
    from gammacl.measure.timing import sync

    torch.manual_seed(0)
    a = torch.randn(n, d, device=DEV, dtype=torch.bfloat16).requires_grad_()
    b = torch.randn(n, d, device=DEV, dtype=torch.bfloat16).requires_grad_()
    s = torch.tensor(14.3, device=DEV, requires_grad=True)

    def fwd():
        return gammacl.clip_loss(a, b, s, backend=backend)

    def fwd_bwd():
        torch.autograd.grad(fwd(), (a, b, s))

    entry: dict[str, Any] = {"N": n, "D": d, "dtype": "bfloat16", "backend": backend}
    try:
        fwd_bwd()  # build / compile / warm up outside the timed region
        sync(torch.device(DEV))
        with torch.no_grad():
            f = bench_ms(fwd)
        fb = bench_ms(fwd_bwd, (a, b, s))
        peak = _peak_extra_mib(fwd_bwd)
        entry.update(fwd_ms=f, fwd_bwd_ms=fb, peak_extra_mib=peak)
        for key, (timing, count) in flops.items():
            entry[key] = tflops(count, entry[timing][0])
    except Exception as exc:
        entry["error"] = error_text(exc)
    return entry


def time_onepass(n: int, d: int, backend: str) -> dict[str, Any]:
    """The gamma one-pass negative term (gammacl.ops.gamma_onepass.gamma_onepass: value and
    gradient in one sweep, 6 N^2 D FLOPs) forward + backward of seeded [n, d] bf16 features on one
    backend: {N, D, dtype, backend, fwd_bwd_ms, peak_extra_mib, fwd_bwd_tflops_6N2D} or error."""
    import math

    from gammacl.measure.timing import sync
    from gammacl.ops.gamma_onepass import gamma_onepass

    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, d, device=DEV), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d, device=DEV), dim=1)
    a = a.to(torch.bfloat16).requires_grad_()
    b = b.to(torch.bfloat16).requires_grad_()
    s = torch.tensor(14.3, device=DEV, requires_grad=True)
    ar = torch.full((n,), -math.log(n), device=DEV)
    ac = torch.full((n,), -math.log(n), device=DEV)

    def fwd_bwd():
        neg = gamma_onepass(a, b, s, ar, ac, w_row=0.5, w_col=0.5, backend=backend)[0]
        torch.autograd.grad(neg, (a, b, s))

    entry: dict[str, Any] = {"N": n, "D": d, "dtype": "bfloat16", "backend": backend}
    try:
        fwd_bwd()
        sync(torch.device(DEV))
        fb = bench_ms(fwd_bwd, (a, b, s))
        peak = _peak_extra_mib(fwd_bwd)
        entry.update(fwd_bwd_ms=fb, peak_extra_mib=peak)
        entry["fwd_bwd_tflops_6N2D"] = tflops(6 * n * n * d, fb[0])
    except Exception as exc:
        entry["error"] = error_text(exc)
    return entry


def print_timing(entry: dict[str, Any], width: int, tflops_key: str, formula: str) -> None:
    """One table line: fwd and fwd+bwd median [p20, p80] ms, peak extra MiB, TFLOP/s, error."""

    def fmt(key: str) -> str:
        v = entry.get(key)
        return f"{v[0]:9.3f} [{v[1]:.3f}, {v[2]:.3f}]" if v else "        -"

    tf = entry.get(tflops_key)
    print(
        f"  N={entry['N']:<6} {entry['backend']:<{width}} fwd {fmt('fwd_ms')} ms   "
        f"fwd+bwd {fmt('fwd_bwd_ms')} ms   peak +{entry.get('peak_extra_mib', '-')} MiB"
        + (f"   {tf} TFLOP/s ({formula})" if tf else "")
        + (f"   {entry['error']}" if "error" in entry else ""),
        flush=True,
    )
