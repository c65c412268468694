"""GPU self-check of the Triton simlse backend (kernels/simlse.py).

1. Parity: gammacl.ops.simlse(..., backend="triton") forward (row / column LSE) and backward
   (grads of a, b, scale under random upstream) and gammacl.clip_loss(backend="triton") against
   gammacl.reference, at bf16 / fp16 / fp32 (plus fp64 on two shapes) for N in {1, 17, 4097},
   D in {64, 512, 1024}, with the test suite's rule (tests/tolerances.py: error <= 2 x PyTorch's
   own error in that dtype + TOL[dtype] x scale; fp64 rtol 1e-9). Also: exclude_pos with an
   offset, cols=False, the transposed column sweep, and row offsets beyond 2^31 elements.
2. Timing: clip_loss forward and forward+backward at N in {8192, 32768}, D = 1024, bf16, with
   triton.testing.do_bench (median, p20, p80 in ms), for backend="triton", the chunked "torch"
   backend and the materialised reference; peak memory; TFLOP/s of triton from 10*N^2*D FLOPs
   (forward 2N^2D + backward 8N^2D; the column LSE uses the partials buffer at these sizes).

Prints a table and writes JSON to $OUT/check_triton_gpu.json (or bench/out/ when $OUT is unset).
Refuses to run without CUDA or under TRITON_INTERPRET (timings there would mean nothing).

    python bench/check_triton_gpu.py            # everything
    python bench/check_triton_gpu.py --no-time  # parity only
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
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: this GPU check must run compiled Triton kernels"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU"
    return None


def _record(results: list, name: str, fn) -> None:
    t0 = time.time()
    try:
        detail = fn()
        results.append(
            {"check": name, "ok": True, "detail": detail or "", "s": round(time.time() - t0, 2)}
        )
    except Exception as exc:  # record and keep going: the table should show every failure
        msg = f"{type(exc).__name__}: {exc}".splitlines()
        results.append(
            {
                "check": name,
                "ok": False,
                "detail": " | ".join(msg[:3])[:400],
                "s": round(time.time() - t0, 2),
            }
        )
    r = results[-1]
    print(
        f"  {'ok  ' if r['ok'] else 'FAIL'} {name:<58} {r['s']:>6.2f}s  {r['detail']}", flush=True
    )


def _parity_checks(results: list) -> None:
    import torch
    from tolerances import assert_close_dtype, assert_close_fp64

    import gammacl
    from gammacl import reference
    from gammacl.kernels import simlse as K
    from gammacl.ops.simlse import simlse

    dev = "cuda"

    def acc(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    def feats(m, n, d, dtype):
        a = torch.nn.functional.normalize(torch.randn(m, d, device=dev, dtype=torch.float64), dim=1)
        b = torch.nn.functional.normalize(torch.randn(n, d, device=dev, dtype=torch.float64), dim=1)
        return a.to(dtype), b.to(dtype)

    def fwd_bwd(fn, a, b, s, g_row, g_col, cols):
        a, b, s = (x.detach().clone().requires_grad_() for x in (a, b, s))
        row, col = fn(a, b, s)
        loss = (torch.where(torch.isfinite(row), row, 0) * g_row.to(row.dtype)).sum()
        if cols:
            loss = loss + (torch.where(torch.isfinite(col), col, 0) * g_col.to(col.dtype)).sum()
        ga, gb, gs = torch.autograd.grad(loss, (a, b, s))
        return [row.detach(), col.detach(), ga, gb, gs]

    def simlse_case(dtype, n, d, offset=0, exclude=False, cols=True, scale=14.3):
        def run():
            torch.manual_seed(n * 1000 + d)
            a, b = feats(n, n, d, dtype)
            s = torch.tensor(scale, dtype=acc(dtype), device=dev)
            g_row = torch.randn(n, dtype=torch.float64, device=dev) / n
            g_col = torch.randn(n, dtype=torch.float64, device=dev) / n
            kw = dict(offset=offset, exclude_pos=exclude, cols=cols)
            ours = fwd_bwd(
                lambda a, b, s: simlse(a, b, s, backend="triton", **kw), a, b, s, g_row, g_col, cols
            )
            ref = fwd_bwd(
                lambda a, b, s: reference.simlse(a, b, s, upcast=True, **kw),
                a.double(),
                b.double(),
                s.double(),
                g_row,
                g_col,
                cols,
            )
            names = ("row", "col", "da", "db", "dscale")
            errs = []
            if dtype == torch.float64:
                for nm, x, y in zip(names, ours, ref, strict=True):
                    assert_close_fp64(x, y, nm)
            else:
                same = fwd_bwd(
                    lambda a, b, s: reference.simlse(a, b, s, upcast=False, **kw),
                    a,
                    b,
                    s,
                    g_row,
                    g_col,
                    cols,
                )
                for nm, x, y, z in zip(names, ours, ref, same, strict=True):
                    assert_close_dtype(x, y, z, dtype, nm)
            for nm, x, y in zip(names, ours, ref, strict=True):
                fin = torch.isfinite(y)
                if fin.any():
                    errs.append(f"{nm} {float((x.double() - y)[fin].abs().max()):.1e}")
            return "max|err| " + ", ".join(errs)

        return run

    def clip_case(dtype, n, d):
        def run():
            torch.manual_seed(n + d)
            a, b = feats(n, n, d, dtype)
            s = torch.tensor(30.0, dtype=acc(dtype), device=dev)
            args = [x.clone().requires_grad_() for x in (a, b, s)]
            loss = gammacl.clip_loss(*args, backend="triton")
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

    def transposed_sweep():
        old = K._COL_PART_MAX_BYTES
        K._COL_PART_MAX_BYTES = 0
        try:
            return simlse_case(torch.bfloat16, 4097, 512, offset=3, exclude=True)()
        finally:
            K._COL_PART_MAX_BYTES = old

    def int64_offsets():
        # rows 2^20 elements apart: row offsets pass 2^31 from row 2048 on
        n, d, pitch = 4097, 64, 2**20
        big_a = torch.randn(n, pitch, device=dev, dtype=torch.bfloat16)
        big_b = torch.randn(n, pitch, device=dev, dtype=torch.bfloat16)
        a, b = big_a[:, :d], big_b[:, :d]
        s = torch.tensor(10.0, device=dev)
        out = K.simlse_fwd(a, b, s, 0, True, True)
        out_c = K.simlse_fwd(a.contiguous(), b.contiguous(), s, 0, True, True)
        g_row = torch.randn(n, device=dev) / n
        g_col = torch.randn(n, device=dev) / n
        gr = K.simlse_bwd(a, b, s, *out, g_row, g_col, 0, True, True)
        gr_c = K.simlse_bwd(a.contiguous(), b.contiguous(), s, *out_c, g_row, g_col, 0, True, True)
        for nm, x, y in zip(("row", "col", "da", "db"), (*out, *gr), (*out_c, *gr_c), strict=True):
            if not torch.equal(x, y):
                raise AssertionError(
                    f"{nm}: strided (row pitch 2^20) != contiguous, "
                    f"max diff {float((x - y).abs().max()):.3e}"
                )
        del big_a, big_b
        torch.cuda.empty_cache()
        return "strided == contiguous (bitwise)"

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tag = str(dtype).replace("torch.", "")
        for n in (1, 17, 4097):
            for d in (64, 512, 1024):
                _record(results, f"simlse {tag} N={n} D={d}", simlse_case(dtype, n, d))
        _record(
            results,
            f"simlse {tag} N=4097 D=512 exclude off=1",
            simlse_case(dtype, 4097, 512, offset=1, exclude=True, scale=100.0),
        )
        _record(
            results,
            f"simlse {tag} N=4097 D=1024 cols=False",
            simlse_case(dtype, 4097, 1024, cols=False),
        )
        _record(results, f"clip_loss {tag} N=4097 D=1024", clip_case(dtype, 4097, 1024))
    for n, d in ((17, 64), (4097, 64)):
        _record(
            results,
            f"simlse float64 N={n} D={d}",
            simlse_case(torch.float64, n, d, offset=-2, exclude=True),
        )
    _record(results, "simlse bf16 transposed column sweep N=4097 D=512", transposed_sweep)
    _record(results, "simlse bf16 int64 row offsets (pitch 2^20)", int64_offsets)


def _time_one(n: int, d: int, backend: str) -> dict:
    """do_bench of clip_loss forward and forward+backward for one backend (bf16 inputs)."""
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
        fwd_bwd()  # compile / warm up outside the timed region
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
        if backend == "triton":
            entry["fwd_tflops"] = round(2 * n * n * d / (f[0] * 1e-3) / 1e12, 1)
            entry["fwd_bwd_tflops"] = round(10 * n * n * d / (fb[0] * 1e-3) / 1e12, 1)
    except Exception as exc:  # e.g. the materialised reference running out of memory
        entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return entry


def _timings() -> list:
    import torch

    rows = []
    for n in (8192, 32768):
        for backend in ("triton", "torch", "reference"):
            entry = _time_one(n, 1024, backend)
            torch.cuda.empty_cache()
            rows.append(entry)

            def fmt(key, entry=entry):
                v = entry.get(key)
                return f"{v[0]:9.3f} [{v[1]:.3f}, {v[2]:.3f}]" if v else "        -"

            tflops = entry.get("fwd_bwd_tflops")
            print(
                f"  N={n:<6} {backend:<10} fwd {fmt('fwd_ms')} ms   "
                f"fwd+bwd {fmt('fwd_bwd_ms')} ms   "
                f"peak +{entry.get('peak_extra_mib', '-')} MiB"
                + (f"   {tflops} TFLOP/s (10N^2D)" if tflops else "")
                + (f"   {entry['error']}" if "error" in entry else ""),
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-time", action="store_true", help="parity checks only")
    p.add_argument("--no-parity", action="store_true", help="timings only")
    args = p.parse_args(argv)
    why = _refusal()
    if why:
        print(f"check_triton_gpu: refusing to run: {why}", file=sys.stderr)
        return 2
    import torch
    import triton

    sys.path.insert(0, str(ROOT / "tests"))  # the one tolerance table (tests/tolerances.py)
    import gammacl

    props = torch.cuda.get_device_properties(0)
    report = {
        "gpu": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "gammacl": gammacl.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "autotune": os.environ.get("GAMMACL_AUTOTUNE", "0"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    print(
        f"check_triton_gpu on {props.name} (torch {torch.__version__}, triton {triton.__version__})"
    )
    results: list = []
    if not args.no_parity:
        print("parity vs gammacl.reference:")
        _parity_checks(results)
    report["parity"] = results
    if not args.no_time:
        print("clip_loss timings (triton.testing.do_bench, ms: median [p20, p80]):")
        report["timings"] = _timings()
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "check_triton_gpu.json"
    path.write_text(json.dumps(report, indent=2))
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} parity checks passed; JSON: {path}")
    for name in failed:
        print(f"  FAILED: {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
