"""Where the time of one Triton CLIP fwd+bwd goes (gpu_session.sh step M2).

1. torch.profiler over one fwd+bwd of gammacl.clip_loss(backend="triton") at N x D: per-kernel
   device time (rows kind=profile).
2. The backward's plain GEMMs alone, at their shapes in the chunked backward (R = the chunk's
   rows): dA_c = W[R, N] @ B[N, D] and dB += W[R, N]^T @ A_c[R, D] (ACCUM), in every candidate
   _gemm_kernel config (kernels/tiles.py) and in cuBLAS (torch.mm; fp32 output where torch.mm
   takes out_dtype), TFLOP/s from 2*R*N*D (rows kind=gemm).

Every row is appended to --out (CSV) as it is measured. --dry-run: CPU, tiny sizes, the torch
backend and torch.mm only (the Triton rows say why they are not run).

    python bench/kernel_split.py --n 65536 --d 1024 --dtype bf16 --out split.csv
"""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import torch
from _sizes import cuda_problem, parser

COLUMNS = ("kind", "name", "shape", "config", "status", "time_ms", "tflops", "calls", "note")
# candidate _gemm_kernel configs (sm_90, triton 3.6.0, bench/NOTES.md): the shipped one first
# (async, 0 spills, 3 CTAs/SM), the one it replaced (wgmma serialised, ptxas C7515), and the two
# async tiles with better reuse that spill with ACCUM (128 x 128 / 4 warps: 92 B; 128 x 256: 256 B)
CANDIDATES = {
    "64x128x64/w4/s3": dict(
        BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3
    ),
    "128x128x64/w8/s4": dict(
        BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4
    ),
    "128x128x64/w4/s3": dict(
        BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3
    ),
    "128x256x64/w8/s3": dict(
        BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3
    ),
}


class Sink:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerow(COLUMNS)

    def add(self, **row) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([row.get(c, "") for c in COLUMNS])
        print(" | ".join(f"{c}={row[c]}" for c in COLUMNS if row.get(c) not in (None, "")))


def _time_ms(fn, gpu: bool) -> float:
    if gpu:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=50))
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3 * 1e3


def profile_step(sink: Sink, n: int, d: int, dtype: torch.dtype, dev: str, backend: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    import gammacl

    g = torch.Generator(device=dev).manual_seed(0)
    a, b = (
        torch.nn.functional.normalize(torch.randn(n, d, device=dev, generator=g), dim=1)
        .to(dtype)
        .requires_grad_()
        for _ in range(2)
    )
    s = torch.tensor(1 / 0.07, device=dev, requires_grad=True)
    step = lambda: gammacl.clip_loss(a, b, s, backend=backend).backward()  # noqa: E731
    step()  # compile / load outside the profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, attr, 0.0))
    total = sum(getattr(e, attr, 0.0) for e in events)
    for e in events[:15]:
        us = getattr(e, attr, 0.0)
        if us <= 0:
            continue
        sink.add(kind="profile", name=e.key[:80], shape=f"N={n} D={d}", config=backend,
                 status="ok", time_ms=f"{us / 1e3:.4g}", calls=e.count,
                 note=f"{100 * us / total:.1f}% of {total / 1e3:.4g} ms")  # fmt: skip


def gemm_rows(sink: Sink, n: int, d: int, dtype: torch.dtype, dev: str, rows: int) -> None:
    """dA_c = W @ B and dB += W^T @ A_c at the chunk's shapes, per config and in cuBLAS."""
    from gammacl.kernels import tiles

    gpu = dev == "cuda"
    w = torch.randn(rows, n, device=dev).to(dtype)
    bm, am = torch.randn(n, d, device=dev).to(dtype), torch.randn(rows, d, device=dev).to(dtype)
    da = torch.empty(rows, d, device=dev, dtype=torch.float32)
    db = torch.zeros(n, d, device=dev, dtype=torch.float32)
    flops = 2.0 * rows * n * d
    shapes = {
        "dA = W @ B": (w, bm, da, False, f"[{rows},{n}]@[{n},{d}]"),
        "dB += W^T @ A": (w.t(), am, db, True, f"[{n},{rows}]@[{rows},{d}] +="),
    }
    for name, (x, y, out, acc, shape) in shapes.items():
        for label, cfg in CANDIDATES.items():
            if not gpu:
                sink.add(kind="gemm", name=name, shape=shape, config=label, status="skipped",
                         note="Triton GEMM timed on a GPU only")  # fmt: skip
                continue
            saved = tiles.gemm_config
            tiles.gemm_config = lambda dt, cfg=cfg: dict(cfg)
            try:
                ms = _time_ms(lambda x=x, y=y, out=out, acc=acc: tiles.gemm(x, y, out, acc), gpu)
                sink.add(kind="gemm", name=name, shape=shape, config=label, status="ok",
                         time_ms=f"{ms:.4g}", tflops=f"{flops / ms / 1e9:.4g}")  # fmt: skip
            except Exception as exc:  # a config that fails to compile or launch is a row
                sink.add(kind="gemm", name=name, shape=shape, config=label, status="error",
                         note=f"{type(exc).__name__}: {exc}"[:200])  # fmt: skip
            finally:
                tiles.gemm_config = saved
        for label, fn in _cublas(x, y, out, acc).items():
            ms = _time_ms(fn, gpu)
            sink.add(kind="gemm", name=name, shape=shape, config=label, status="ok",
                     time_ms=f"{ms:.4g}", tflops=f"{flops / ms / 1e9:.4g}",
                     note="cuBLAS" if gpu else "CPU torch.mm")  # fmt: skip


def _cublas(x, y, out, acc) -> dict:
    fns = {"torch.mm (operand-dtype out)": lambda: torch.mm(x, y)}
    try:
        torch.mm(x[:16, :16], y[:16, :16], out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return fns
    if acc:
        fns["torch.mm fp32 out, + C"] = lambda: out.add_(torch.mm(x, y, out_dtype=torch.float32))
    else:
        fns["torch.mm fp32 out"] = lambda: torch.mm(x, y, out_dtype=torch.float32)
    return fns


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, "kernel_split.csv", "CPU, tiny sizes, torch backend").parse_args(argv)
    sink = Sink(Path(args.out))
    if args.dry_run:
        dev, backend, n, d, dtype = "cpu", "torch", 256, 32, torch.float32
    else:
        if (problem := cuda_problem(args, "kernel_split")) is None:
            return 2
        dev, backend, (n, d, dtype) = "cuda", "triton", problem
    profile_step(sink, n, d, dtype, dev, backend)
    from gammacl.kernels.simlse_tiled import w_tile_config
    from gammacl.kernels.tiles import chunk_rows

    rows = chunk_rows(n, n * torch.empty((), dtype=dtype).element_size(),
                      w_tile_config(dtype)["BLOCK_M"])  # fmt: skip
    print(f"kernel_split: backward chunk R = {rows} rows (GAMMACL_TRITON_CHUNK_MIB="
          f"{os.environ.get('GAMMACL_TRITON_CHUNK_MIB', 'default')})")  # fmt: skip
    gemm_rows(sink, n, d, dtype, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
