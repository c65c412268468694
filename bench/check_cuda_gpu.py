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
1b. gamma_onepass (the one-pass gamma / SogCLR negative term, csrc/gamma_onepass_cuda.{cu,cpp})
   against reference.gamma.gamma_onepass at bf16 / fp16 / fp32 / fp64, N in {17, 4096, 4097},
   with the cap biting, an offset, and many chunks.
4. Timing: clip_loss forward + backward at N in {32768, 65536}, D = 1024, bf16, triton.testing.
   do_bench (median, p20, p80 ms) for backend "cuda" (and "triton", "torch" when usable), peak
   extra memory, TFLOP/s from 8 N^2 D (two-pass: 4 GEMMs), and the 4-GEMM floor (4 x one
   N x N x D bf16 torch.mm); a GAMMACL_CUDA_CHUNK_MIB sweep (256..2048) of the cuda backend at
   N = 65536; then the gamma one-pass term (6 N^2 D) on the same backends.

Prints a table and writes JSON to $OUT/check_cuda_gpu.json (or bench/out/ when $OUT is unset).
Refuses to run without a CUDA device.

    python bench/check_cuda_gpu.py            # everything
    python bench/check_cuda_gpu.py --no-time  # correctness only
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_gpucheck.py
import _gpucheck as G  # noqa: E402

TOOL = "check_cuda_gpu"


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


def _parity_checks(results: list) -> None:
    case = functools.partial(G.simlse_case, "cuda", nan_free=True)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tag = G.dtype_tag(dtype)
        for n in (1, 17, 4096, 4097):
            for d in (64, 1024):
                G.record(results, f"simlse {tag} N={n} D={d}", case(dtype, n, d))
        G.record(
            results,
            f"simlse {tag} N=4097 D=512 exclude off=1 s=100",
            case(dtype, 4097, 512, offset=1, exclude=True, scale=100.0),
        )
        G.record(results, f"simlse {tag} N=1 exclude (all excluded)",
                 case(dtype, 1, 64, exclude=True))  # fmt: skip
        G.record(results, f"simlse {tag} N=4096 D=1024 cols=False",
                 case(dtype, 4096, 1024, cols=False))  # fmt: skip
        G.record(results, f"simlse {tag} N=4096 D=64 strided rows",
                 case(dtype, 4096, 64, strided=True, exclude=True, offset=-3))  # fmt: skip
        with _Env(GAMMACL_CUDA_CHUNK_MIB="3"):  # a few hundred rows per chunk, short last chunk
            G.record(results, f"simlse {tag} N=4097 D=64 chunks of ~128 rows",
                     case(dtype, 4097, 64, offset=2, exclude=True))  # fmt: skip
        G.record(results, f"clip_loss {tag} N=4097 D=1024", G.clip_case("cuda", dtype, 4097, 1024))
    G.record_fp64(results, case)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        tag = G.dtype_tag(dtype)
        for n, d in ((17, 64), (4096, 1024), (4097, 256)):
            if dtype == torch.float64 and n > 4096:
                continue
            G.record(
                results, f"gamma_onepass {tag} N={n} D={d}", G.onepass_case("cuda", dtype, n, d)
            )
        G.record(results, f"gamma_onepass {tag} N=4097 D=64 cap bites off=1",
                 G.onepass_case("cuda", dtype, 4097, 64, clamp=-2.0, offset=1))  # fmt: skip
        with _Env(GAMMACL_CUDA_CHUNK_MIB="3"):
            G.record(results, f"gamma_onepass {tag} N=4097 D=64 chunks of ~128 rows",
                     G.onepass_case("cuda", dtype, 4097, 64, offset=-2))  # fmt: skip


def _large_n_check(results: list) -> None:
    """N = 65536: N^2 = 4.3e9 entries (> 2^31); reference = the chunked fp32 torch backend."""
    from gammacl import _ext
    from gammacl.ops import simlse as S

    def run():
        torch.manual_seed(0)
        n, d, off = 65536, 64, 7
        a, b = G.feats(n, n, d, torch.bfloat16)
        s = torch.tensor(30.0, device=G.DEV)
        ops = _ext.load(cuda=True)
        row, col = ops.simlse_fwd(a, b, s, off, True, True)
        with _Env(GAMMACL_CHUNK_MIB="1024"):
            rrow, rcol = S.torch_fwd(a, b, s, off, True, True)
        g_row = torch.randn(n, device=G.DEV) / n
        g_col = torch.randn(n, device=G.DEV) / n
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

    G.record(results, "simlse bf16 N=65536 D=64 (N^2 > 2^31) exclude off=7", run)
    torch.cuda.empty_cache()


def _graph_check(results: list) -> None:
    import gammacl

    def run():
        torch.manual_seed(1)
        n, d = 4096, 256
        a0, b0 = G.feats(n, n, d, torch.bfloat16)
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        s = torch.tensor(14.3, device=G.DEV, requires_grad=True)

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

    G.record(results, "CUDA graph capture of clip_loss fwd+bwd (bf16 N=4096 D=256)", run)


def _gemm_floor(n: int, d: int) -> dict:
    """4 x one bf16 N x N x D GEMM (fp32 accumulate, bf16 out): the 4-GEMM floor."""
    entry = {"N": n, "D": d, "dtype": "bfloat16", "backend": "4-GEMM floor"}
    try:
        a = torch.randn(n, d, device=G.DEV, dtype=torch.bfloat16)
        b = torch.randn(n, d, device=G.DEV, dtype=torch.bfloat16)
        c = torch.empty(n, n, device=G.DEV, dtype=torch.bfloat16)
        entry["fwd_bwd_ms"] = [4 * x for x in G.bench_ms(lambda: torch.mm(a, b.t(), out=c))]
        entry["fwd_bwd_tflops_8N2D"] = G.tflops(8 * n * n * d, entry["fwd_bwd_ms"][0])
    except Exception as exc:
        entry["error"] = G.error_text(exc)
    torch.cuda.empty_cache()
    return entry


def _timings() -> list:
    """clip_loss on cuda (triton when importable) and torch, then the 4-GEMM floor; TFLOP/s from
    8N^2D (two-pass: 4 GEMMs)."""
    from gammacl.dispatch import triton_importable

    backends = ["cuda"] + (["triton"] if triton_importable() else []) + ["torch"]
    rows = []
    for n in (32768, 65536):
        for backend in backends:
            flops = {"fwd_bwd_tflops_8N2D": ("fwd_bwd_ms", 8 * n * n * 1024)}
            rows.append(G.time_clip_loss(n, 1024, backend, flops))
            torch.cuda.empty_cache()
        rows.append(_gemm_floor(n, 1024))
        for entry in rows[-len(backends) - 1 :]:
            G.print_timing(entry, 13, "fwd_bwd_tflops_8N2D", "8N^2D")
    # The dB GEMM (N x D fp32, accumulated with beta = 1 per chunk) reads and writes 8 B per
    # output element per chunk for 2R FLOPs: below R ~ 1200 rows it is bandwidth-bound on an H100
    # (ridge ~295 FLOP/B). At N = 65536 256 MiB gives R = 640, the 512 MiB default R = 1280
    # (bench/NOTES.md).
    print("cuda chunk budget sweep, clip_loss N=65536 D=1024 (GAMMACL_CUDA_CHUNK_MIB):")
    for mib in ("256", "512", "1024", "2048"):
        with _Env(GAMMACL_CUDA_CHUNK_MIB=mib):
            flops = {"fwd_bwd_tflops_8N2D": ("fwd_bwd_ms", 8 * 65536 * 65536 * 1024)}
            entry = G.time_clip_loss(65536, 1024, "cuda", flops)
        entry["chunk_mib"] = int(mib)
        rows.append(entry)
        G.print_timing(entry, 13, "fwd_bwd_tflops_8N2D", f"8N^2D, {mib} MiB chunks")
        torch.cuda.empty_cache()
    print("gamma one-pass negative term fwd+bwd (6N^2D; target <= 3/4 of the 4-GEMM floor):")
    for n in (32768, 65536):
        for backend in backends:
            entry = G.time_onepass(n, 1024, backend)
            entry["op"] = "gamma_onepass"
            rows.append(entry)
            G.print_timing(entry, 13, "fwd_bwd_tflops_6N2D", "6N^2D")
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = G.start(TOOL, __doc__, argv, no_time_help="correctness checks only",
                   compiled_triton=False)  # fmt: skip
    if args is None:
        return 2
    from gammacl import _ext

    report = G.report(
        chunk_mib=os.environ.get("GAMMACL_CUDA_CHUNK_MIB", "256 (default)"),
        arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0 (default)"),
    )
    print(f"{TOOL} on {report['gpu']} (torch {torch.__version__}, CUDA {torch.version.cuda})")
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
        print(G.TIMING_HEADER)
        report["timings"] = _timings()
    return G.finish(TOOL, report, results, what="checks", ok=ok)


if __name__ == "__main__":
    sys.exit(main())
