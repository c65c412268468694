"""Geometric consistency (Paper B, math.md B.4/B.7): Gram form vs the pairwise form.

Times forward + backward of gammacl.geometric_consistency_loss (d x d Grams, O(N D^2)) with and
without the augmented pair, against two yardsticks on the same device and dtype:
  * one N x D^2 GEMM  ([D, N] @ [N, D], 2 N D^2 FLOPs; the Gram form needs 7, or 17 with aug),
  * one N x N GEMM    ([N, D] @ [D, N], 2 N^2 D FLOPs; the pairwise form needs several),
and the materialised pairwise reference (gammacl.reference.modality, in the input dtype) when N
is small enough. Writes <out>/bench_modality.json and .csv, each row naming the device.

    python bench/bench_modality.py                      # CUDA: N=65536 D=1024; CPU: N=8192 D=256
    python bench/bench_modality.py --n 8192 --d 256 --dtype float32 --out bench/out
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import time

import torch

import gammacl
from gammacl.modality import geometric_consistency_loss
from gammacl.reference import modality as ref

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def peak_extra_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=None, help="batch (default 65536 CUDA / 8192 CPU)")
    p.add_argument("--d", type=int, default=None, help="feature dim (default 1024 / 256)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--pairwise-max-n",
        type=int,
        default=None,
        help="largest N for the materialised pairwise form (default 16384 / 8192)",
    )
    p.add_argument("--out", default="bench/out")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (65536 if cuda else 8192)
    d = args.d or (1024 if cuda else 256)
    dtype = DTYPES[args.dtype]
    pair_max = args.pairwise_max_n or (16384 if cuda else 8192)
    torch.manual_seed(0)

    def feat():
        x = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=1)
        return x.to(dtype).requires_grad_()

    v, t, va, ta = feat(), feat(), feat(), feat()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    v_acc = v.detach().to(acc)

    def run(loss_fn, inputs):
        def step():
            for x in inputs:
                x.grad = None
            loss_fn(*inputs).backward()

        return step

    cases = {
        # yardsticks: the unit GEMM of the Gram form (accumulation dtype, as the Grams are
        # formed) and ONE N x N product in the input dtype
        "gemm_n_d2": (lambda: v_acc.t() @ v_acc, 2.0 * n * d * d),
        "gemm_n2_d": (lambda: v.detach() @ t.detach().t(), 2.0 * n * n * d),
        "gc_gram": (run(geometric_consistency_loss, [v, t]), 7 * 2.0 * n * d * d),
        "gc_gram_aug": (run(geometric_consistency_loss, [v, t, va, ta]), 17 * 2.0 * n * d * d),
    }
    if n <= pair_max:
        pair = lambda *x: ref.geometric_consistency_loss(*x, upcast=False)  # noqa: E731
        cases["gc_pairwise"] = (run(pair, [v, t]), None)
        cases["gc_pairwise_aug"] = (run(pair, [v, t, va, ta]), None)

    times = {}
    rows = []
    name = device_name(device)
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    for case, (fn, flops) in cases.items():
        reps = (
            args.repeats
            if not case.startswith(("gc_pairwise", "gemm_n2"))
            else max(1, min(args.repeats, 3))
        )
        ms = statistics.median(time_ms(fn, device, reps))
        times[case] = ms
        rows.append(
            {
                "case": case,
                "n": n,
                "d": d,
                "dtype": args.dtype,
                "ms": round(ms, 4),
                "tflops": round(flops / ms / 1e9, 4) if flops else None,
                "peak_extra_mib": peak_extra_mib(fn, device),
                "repeats": reps,
                "device": name,
                "torch": torch.__version__,
                "gammacl": gammacl.__version__,
                "timestamp": stamp,
            }
        )
    unit, nn_ms = times["gemm_n_d2"], times["gemm_n2_d"]
    for r in rows:
        r["x_gemm_n_d2"] = round(r["ms"] / unit, 3)
        r["x_gemm_n2_d"] = round(r["ms"] / nn_ms, 4)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_modality.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "bench_modality.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"device: {name}   N={n} D={d} {args.dtype}   (fwd+bwd for the losses)")
    print(f"{'case':<18}{'ms':>12}{'x N*D^2 GEMM':>15}{'x N*N GEMM':>13}{'peak MiB':>11}")
    for r in rows:
        peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        print(
            f"{r['case']:<18}{r['ms']:>12.2f}{r['x_gemm_n_d2']:>15.2f}"
            f"{r['x_gemm_n2_d']:>13.3f}{peak:>11}"
        )
    return rows


if __name__ == "__main__":
    main()
