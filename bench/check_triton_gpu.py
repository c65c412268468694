"""GPU self-check of the Triton backend (kernels/simlse.py, kernels/gamma_onepass.py).

1. Parity: gammacl.ops.simlse(..., backend="triton") forward (row / column LSE) and backward
   (grads of a, b, scale under random upstream) and gammacl.clip_loss(backend="triton") against
   gammacl.reference, at bf16 / fp16 / fp32 (plus fp64 on two shapes) for N in {1, 17, 4097},
   D in {64, 512, 1024}, with the test suite's rule (tests/tolerances.py: error <= 2 x PyTorch's
   own error in that dtype + TOL[dtype] x scale; fp64 rtol 1e-9). Also: exclude_pos with an
   offset, cols=False, the transposed column sweep, and row offsets beyond 2^31 elements; the
   one-pass gamma op (kernels/gamma_onepass.py) against reference.gamma.gamma_onepass.
2. Timing: clip_loss forward and forward+backward at N in {8192, 32768}, D = 1024, bf16, with
   triton.testing.do_bench (median, p20, p80 in ms), for backend="triton", the chunked "torch"
   backend and the materialised reference; peak memory; TFLOP/s of triton from 10*N^2*D FLOPs
   (forward 2N^2D + backward 8N^2D; the column LSE uses the partials buffer at these sizes); then
   the gamma one-pass term on triton and torch (6N^2D).

Prints a table and writes JSON to $OUT/check_triton_gpu.json (or bench/out/ when $OUT is unset).
Refuses to run without CUDA or under TRITON_INTERPRET (timings there would mean nothing).

    python bench/check_triton_gpu.py            # everything
    python bench/check_triton_gpu.py --no-time  # parity only
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_gpucheck.py
import _gpucheck as G  # noqa: E402

TOOL = "check_triton_gpu"


def _parity_checks(results: list) -> None:
    from gammacl.kernels import simlse as K

    case = functools.partial(G.simlse_case, "triton")

    def transposed_sweep():
        old = K._COL_PART_MAX_BYTES
        K._COL_PART_MAX_BYTES = 0
        try:
            return case(torch.bfloat16, 4097, 512, offset=3, exclude=True)()
        finally:
            K._COL_PART_MAX_BYTES = old

    def int64_offsets():
        # rows 2^20 elements apart: row offsets pass 2^31 from row 2048 on
        n, d, pitch = 4097, 64, 2**20
        big_a = torch.randn(n, pitch, device=G.DEV, dtype=torch.bfloat16)
        big_b = torch.randn(n, pitch, device=G.DEV, dtype=torch.bfloat16)
        a, b = big_a[:, :d], big_b[:, :d]
        s = torch.tensor(10.0, device=G.DEV)
        out = K.simlse_fwd(a, b, s, 0, True, True)
        out_c = K.simlse_fwd(a.contiguous(), b.contiguous(), s, 0, True, True)
        g_row = torch.randn(n, device=G.DEV) / n
        g_col = torch.randn(n, device=G.DEV) / n
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
        tag = G.dtype_tag(dtype)
        for n in (1, 17, 4097):
            for d in (64, 512, 1024):
                G.record(results, f"simlse {tag} N={n} D={d}", case(dtype, n, d))
        G.record(
            results,
            f"simlse {tag} N=4097 D=512 exclude off=1",
            case(dtype, 4097, 512, offset=1, exclude=True, scale=100.0),
        )
        G.record(
            results, f"simlse {tag} N=4097 D=1024 cols=False", case(dtype, 4097, 1024, cols=False)
        )
        G.record(
            results, f"clip_loss {tag} N=4097 D=1024", G.clip_case("triton", dtype, 4097, 1024)
        )
    G.record_fp64(results, case)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tag = G.dtype_tag(dtype)
        for n, d in ((17, 64), (4097, 1024)):
            G.record(results, f"gamma_onepass {tag} N={n} D={d}",
                     G.onepass_case("triton", dtype, n, d))  # fmt: skip
        G.record(results, f"gamma_onepass {tag} N=4097 D=64 cap bites off=1",
                 G.onepass_case("triton", dtype, 4097, 64, clamp=-2.0, offset=1))  # fmt: skip
    G.record(results, "simlse bf16 transposed column sweep N=4097 D=512", transposed_sweep)
    G.record(results, "simlse bf16 int64 row offsets (pitch 2^20)", int64_offsets)


def _timings() -> list:
    """clip_loss on triton, the chunked torch backend and the materialised reference; TFLOP/s of
    triton from 2N^2D (fwd) and 10N^2D (fwd+bwd)."""
    rows = []
    for n in (8192, 32768):
        for backend in ("triton", "torch", "reference"):
            flops = (
                {"fwd_tflops": ("fwd_ms", 2 * n * n * 1024),
                 "fwd_bwd_tflops": ("fwd_bwd_ms", 10 * n * n * 1024)}
                if backend == "triton"
                else {}
            )  # fmt: skip
            entry = G.time_clip_loss(n, 1024, backend, flops)
            torch.cuda.empty_cache()
            rows.append(entry)
            G.print_timing(entry, 10, "fwd_bwd_tflops", "10N^2D")
    print("gamma one-pass negative term fwd+bwd (6N^2D; target <= 3/4 of the 4-GEMM floor):")
    for n in (8192, 32768):
        for backend in ("triton", "torch"):
            entry = G.time_onepass(n, 1024, backend)
            entry["op"] = "gamma_onepass"
            rows.append(entry)
            G.print_timing(entry, 10, "fwd_bwd_tflops_6N2D", "6N^2D")
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = G.start(TOOL, __doc__, argv, no_time_help="parity checks only", compiled_triton=True)
    if args is None:
        return 2
    import triton

    report = G.report(triton=triton.__version__, autotune=os.environ.get("GAMMACL_AUTOTUNE", "0"))
    print(f"{TOOL} on {report['gpu']} (torch {torch.__version__}, triton {triton.__version__})")
    results: list = []
    if not args.no_parity:
        print("parity vs gammacl.reference:")
        _parity_checks(results)
    report["parity"] = results
    if not args.no_time:
        print(G.TIMING_HEADER)
        report["timings"] = _timings()
    return G.finish(TOOL, report, results, what="parity checks")


if __name__ == "__main__":
    sys.exit(main())
