"""GPU self-check of the CUDA simlse backend (csrc/simlse_cuda.{cu,cpp}, backend="cuda").

0. Build: gammacl._ext.available(cuda=True) compiles csrc/*_cuda.cpp + csrc/*.cu
   (TORCH_CUDA_ARCH_LIST, default "8.0;9.0") and reports the reason if it cannot.
1. Parity: gammacl.ops.simlse(..., backend="cuda") forward (row / column LSE) and backward (grads
   of a, b, scale under random upstream) and gammacl.clip_loss(backend="cuda") against
   gammacl.reference at bf16 / fp16 / fp32 (fp64 on two shapes) for N in {1, 17, 4096, 4097},
   D in {64, 1024} (N = 4096: 16-byte vector path; 4097: scalar path), with the test suite's rule
   (tests/tolerances.py). Also exclude_pos with an offset, cols=False, strided rows, and a small
   GAMMACL_CUDA_CHUNK_MIB so several chunks (and a short last one) are exercised.
2. N = 65536, D = 64 bf16 (N^2 = 4.3e9 > 2^31 entries): forward and backward against the chunked
   fp32 torch backend, with exclude_pos and an offset (int64 index paths).
3. CUDA graph: clip_loss forward + backward captured once, replayed; replays must be bitwise equal
   to each other and match eager.
4. Timing: clip_loss forward + backward at N in {32768, 65536}, D = 1024, bf16, triton.testing.
   do_bench (median, p20, p80 ms) for backend "cuda" (and "triton", "torch" when usable), peak
   extra memory, TFLOP/s from 8 N^2 D (two-pass: 4 GEMMs), and the 4-GEMM floor (4 x one
   N x N x D bf16 torch.mm).

Prints a table and writes JSON to $OUT/check_cuda_gpu.json (or bench/out/ when $OUT is unset).
Refuses to run without a CUDA device.

    python bench/check_cuda_gpu.py            # everything
    python bench/check_cuda_gpu.py --no-time  # correctness only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _refusal() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU"
    return None


def _record(results: list, name: str, fn) -> None:
    t0 = time.time()
    try:
        detail = fn()
        ok = True
    except Exception as exc:  # record and keep going: the table should show every failure
        detail = " | ".join(f"{type(exc).__name__}: {exc}".splitlines()[:3])[:400]
        ok = False
    r = {"check": name, "ok": ok, "detail": detail or "", "s": round(time.time() - t0, 2)}
    results.append(r)
    print(f"  {'ok  ' if ok else 'FAIL'} {name:<58} {r['s']:>6.2f}s  {r['detail']}", flush=True)


class _Env:
    """Temporarily set environment variables (the chunk budgets are read on every call)."""

    def __init__(self, **kv):
        self.kv, self.old = kv, {}

    def __enter__(self):
        for k, v in self.kv.items():
            self.old[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _acc(dtype):
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def _feats(m, n, d, dtype, dev="cuda"):
    import torch

    a = torch.nn.functional.normalize(torch.randn(m, d, device=dev, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d, device=dev, dtype=torch.float64), dim=1)
    return a.to(dtype), b.to(dtype)


def _fwd_bwd(fn, a, b, s, g_row, g_col, cols):
    import torch

    a, b, s = (x.detach().clone().requires_grad_() for x in (a, b, s))
    row, col = fn(a, b, s)
    loss = (torch.where(torch.isfinite(row), row, 0) * g_row.to(row.dtype)).sum()
    if cols:
        loss = loss + (torch.where(torch.isfinite(col), col, 0) * g_col.to(col.dtype)).sum()
    ga, gb, gs = torch.autograd.grad(loss, (a, b, s))
    return [row.detach(), col.detach(), ga, gb, gs]


def _parity_checks(results: list) -> None:
    import torch
    from tolerances import assert_close_dtype, assert_close_fp64

    import gammacl
    from gammacl import reference
    from gammacl.ops.simlse import simlse

    names = ("row", "col", "da", "db", "dscale")

    def simlse_case(dtype, n, d, offset=0, exclude=False, cols=True, scale=14.3, strided=False):
        def run():
            torch.manual_seed(n * 1000 + d)
            a, b = _feats(n, n, d, dtype)
            if strided:  # row stride 2D + 8: the GEMMs take it as their leading dimension
                a = torch.cat([a, a, a[:, :8]], dim=1)[:, :d]
                b = torch.cat([b, b, b[:, :8]], dim=1)[:, :d]
            s = torch.tensor(scale, dtype=_acc(dtype), device="cuda")
            g_row = torch.randn(n, dtype=torch.float64, device="cuda") / n
            g_col = torch.randn(n, dtype=torch.float64, device="cuda") / n
            kw = dict(offset=offset, exclude_pos=exclude, cols=cols)
            ours = _fwd_bwd(
                lambda a, b, s: simlse(a, b, s, backend="cuda", **kw), a, b, s, g_row, g_col, cols
            )
            ref = _fwd_bwd(
                lambda a, b, s: reference.simlse(a, b, s, upcast=True, **kw),
                a.double(), b.double(), s.double(), g_row, g_col, cols,
            )  # fmt: skip
            if dtype == torch.float64:
                for nm, x, y in zip(names, ours, ref, strict=True):
                    assert_close_fp64(x, y, nm)
            else:
                same = _fwd_bwd(
                    lambda a, b, s: reference.simlse(a, b, s, upcast=False, **kw),
                    a, b, s, g_row, g_col, cols,
                )  # fmt: skip
                for nm, x, y, z in zip(names, ours, ref, same, strict=True):
                    assert_close_dtype(x, y, z, dtype, nm)
            errs = []
            for nm, x, y in zip(names, ours, ref, strict=True):
                assert not torch.isnan(x).any(), f"{nm} has NaN"
                fin = torch.isfinite(y)
                if fin.any():
                    errs.append(f"{nm} {float((x.double() - y)[fin].abs().max()):.1e}")
            return "max|err| " + ", ".join(errs)

        return run

    def clip_case(dtype, n, d):
        def run():
            torch.manual_seed(n + d)
            a, b = _feats(n, n, d, dtype)
            s = torch.tensor(30.0, dtype=_acc(dtype), device="cuda")
            args = [x.clone().requires_grad_() for x in (a, b, s)]
            loss = gammacl.clip_loss(*args, backend="cuda")
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

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tag = str(dtype).replace("torch.", "")
        for n in (1, 17, 4096, 4097):
            for d in (64, 1024):
                _record(results, f"simlse {tag} N={n} D={d}", simlse_case(dtype, n, d))
        _record(
            results,
            f"simlse {tag} N=4097 D=512 exclude off=1 s=100",
            simlse_case(dtype, 4097, 512, offset=1, exclude=True, scale=100.0),
        )
        _record(results, f"simlse {tag} N=1 exclude (all excluded)",
                simlse_case(dtype, 1, 64, exclude=True))  # fmt: skip
        _record(results, f"simlse {tag} N=4096 D=1024 cols=False",
                simlse_case(dtype, 4096, 1024, cols=False))  # fmt: skip
        _record(results, f"simlse {tag} N=4096 D=64 strided rows",
                simlse_case(dtype, 4096, 64, strided=True, exclude=True, offset=-3))  # fmt: skip
        with _Env(GAMMACL_CUDA_CHUNK_MIB="3"):  # a few hundred rows per chunk, short last chunk
            _record(results, f"simlse {tag} N=4097 D=64 chunks of ~128 rows",
                    simlse_case(dtype, 4097, 64, offset=2, exclude=True))  # fmt: skip
        _record(results, f"clip_loss {tag} N=4097 D=1024", clip_case(dtype, 4097, 1024))
    for n, d in ((17, 64), (4097, 64)):
        _record(
            results,
            f"simlse float64 N={n} D={d}",
            simlse_case(torch.float64, n, d, offset=-2, exclude=True),
        )


def _large_n_check(results: list) -> None:
    """N = 65536: N^2 = 4.3e9 entries (> 2^31); reference = the chunked fp32 torch backend."""
    import torch

    from gammacl import _ext
    from gammacl.ops import simlse as S

    def run():
        torch.manual_seed(0)
        n, d, off = 65536, 64, 7
        a, b = _feats(n, n, d, torch.bfloat16)
        s = torch.tensor(30.0, device="cuda")
        ops = _ext.load(cuda=True)
        row, col = ops.simlse_fwd(a, b, s, off, True, True)
        with _Env(GAMMACL_CHUNK_MIB="1024"):
            rrow, rcol = S.torch_fwd(a, b, s, off, True, True)
        g_row = torch.randn(n, device="cuda") / n
        g_col = torch.randn(n, device="cuda") / n
        da, db = ops.simlse_bwd(a, b, s, row, col, g_row, g_col, off, True, True)
        with _Env(GAMMACL_CHUNK_MIB="1024"):
            rda, rdb = S.torch_bwd(a, b, s, rrow, rcol, g_row, g_col, off, True, True)
        out = []
        for nm, x, y, tol in (("row", row, rrow, 1e-4), ("col", col, rcol, 1e-4),
                              ("da", da, rda, 1e-3), ("db", db, rdb, 1e-3)):  # fmt: skip
            err = float((x - y).abs().max())
            ref_scale = max(1.0, float(y.abs().max()))
            if not err <= tol * ref_scale:
                raise AssertionError(f"{nm}: max error {err:.3e} > {tol:g} x {ref_scale:.3g}")
            out.append(f"{nm} {err:.1e}")
        return "vs chunked fp32 torch: " + ", ".join(out)

    _record(results, "simlse bf16 N=65536 D=64 (N^2 > 2^31) exclude off=7", run)
    torch.cuda.empty_cache()


def _graph_check(results: list) -> None:
    import torch

    import gammacl

    def run():
        torch.manual_seed(1)
        n, d = 4096, 256
        a0, b0 = _feats(n, n, d, torch.bfloat16)
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        s = torch.tensor(14.3, device="cuda", requires_grad=True)

        def step():
            loss = gammacl.clip_loss(a, b, s, backend="cuda")
            return (loss, *torch.autograd.grad(loss, (a, b, s)))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()
        eager = [x.clone() for x in step()]
        graph.replay()
        first = [x.clone() for x in static_out]
        graph.replay()
        torch.cuda.synchronize()
        for nm, x, y, z in zip(("loss", "da", "db", "dscale"), first, static_out, eager,
                               strict=True):  # fmt: skip
            if not torch.equal(x, y):
                raise AssertionError(f"{nm}: two replays differ")
            torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6, msg=f"{nm}: replay vs eager")
        with torch.no_grad():  # new inputs, same graph
            a.copy_(torch.flip(a0, dims=[0]))
        graph.replay()
        new_eager = step()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out[0], new_eager[0], rtol=1e-5, atol=1e-6)
        return f"loss {float(first[0]):.6f}; replays bitwise equal; follows new inputs"

    _record(results, "CUDA graph capture of clip_loss fwd+bwd (bf16 N=4096 D=256)", run)


def _time_one(n: int, d: int, backend: str) -> dict:
    import torch
    import triton.testing

    import gammacl

    torch.manual_seed(0)
    a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    b = torch.randn(n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    s = torch.tensor(14.3, device="cuda", requires_grad=True)

    def fwd():
        return gammacl.clip_loss(a, b, s, backend=backend)

    def fwd_bwd():
        torch.autograd.grad(fwd(), (a, b, s))

    entry = {"N": n, "D": d, "dtype": "bfloat16", "backend": backend}
    try:
        fwd_bwd()  # build / compile / warm up outside the timed region
        torch.cuda.synchronize()
        q = [0.5, 0.2, 0.8]
        with torch.no_grad():
            f = triton.testing.do_bench(fwd, quantiles=q)
        fb = triton.testing.do_bench(fwd_bwd, quantiles=q, grad_to_none=[a, b, s])
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        entry.update(fwd_ms=f, fwd_bwd_ms=fb, peak_extra_mib=round(peak, 1))
        entry["fwd_bwd_tflops_8N2D"] = round(8 * n * n * d / (fb[0] * 1e-3) / 1e12, 1)
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return entry


def _gemm_floor(n: int, d: int) -> dict:
    """4 x one bf16 N x N x D GEMM (fp32 accumulate, bf16 out): the 4-GEMM floor."""
    import torch
    import triton.testing

    entry = {"N": n, "D": d, "dtype": "bfloat16", "backend": "4-GEMM floor"}
    try:
        a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        ms = triton.testing.do_bench(lambda: torch.mm(a, b.t(), out=c), quantiles=[0.5, 0.2, 0.8])
        entry["fwd_bwd_ms"] = [4 * x for x in ms]
        entry["fwd_bwd_tflops_8N2D"] = round(
            8 * n * n * d / (entry["fwd_bwd_ms"][0] * 1e-3) / 1e12, 1
        )
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    torch.cuda.empty_cache()
    return entry


def _timings() -> list:
    import torch

    from gammacl.dispatch import triton_importable

    backends = ["cuda"] + (["triton"] if triton_importable() else []) + ["torch"]
    rows = []
    for n in (32768, 65536):
        for backend in backends:
            rows.append(_time_one(n, 1024, backend))
            torch.cuda.empty_cache()
        rows.append(_gemm_floor(n, 1024))
        for entry in rows[-len(backends) - 1 :]:

            def fmt(key, entry=entry):
                v = entry.get(key)
                return f"{v[0]:9.3f} [{v[1]:.3f}, {v[2]:.3f}]" if v else "        -"

            tf = entry.get("fwd_bwd_tflops_8N2D")
            print(
                f"  N={n:<6} {entry['backend']:<13} fwd {fmt('fwd_ms')} ms   "
                f"fwd+bwd {fmt('fwd_bwd_ms')} ms   peak +{entry.get('peak_extra_mib', '-')} MiB"
                + (f"   {tf} TFLOP/s (8N^2D)" if tf else "")
                + (f"   {entry['error']}" if "error" in entry else ""),
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-time", action="store_true", help="correctness checks only")
    p.add_argument("--no-parity", action="store_true", help="timings only")
    args = p.parse_args(argv)
    why = _refusal()
    if why:
        print(f"check_cuda_gpu: refusing to run: {why}", file=sys.stderr)
        return 2
    import torch

    sys.path.insert(0, str(ROOT / "tests"))  # the one tolerance table (tests/tolerances.py)
    import gammacl
    from gammacl import _ext

    props = torch.cuda.get_device_properties(0)
    report = {
        "gpu": props.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gammacl": gammacl.__version__,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "chunk_mib": os.environ.get("GAMMACL_CUDA_CHUNK_MIB", "256 (default)"),
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0 (default)"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    print(f"check_cuda_gpu on {props.name} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    t0 = time.time()
    ok, why = _ext.available(cuda=True)
    report["build"] = {"ok": ok, "reason": why, "s": round(time.time() - t0, 1),
                       "library": _ext.library_path(cuda=True)}  # fmt: skip
    print(f"build: {'ok' if ok else 'FAILED'} ({report['build']['s']}s) {why}")
    results: list = []
    if ok and not args.no_parity:
        print("correctness:")
        _parity_checks(results)
        _large_n_check(results)
        _graph_check(results)
    report["checks"] = results
    if ok and not args.no_time:
        print("clip_loss timings (triton.testing.do_bench, ms: median [p20, p80]):")
        report["timings"] = _timings()
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "check_cuda_gpu.json"
    path.write_text(json.dumps(report, indent=2))
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed; JSON: {path}")
    for name in failed:
        print(f"  FAILED: {name}")
    return 1 if failed or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
