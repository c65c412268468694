"""Gradients of the fused backends against the torch backend at a training size, many chunks
(gpu_session.sh step M6): clip_loss and gamma_onepass, dA / dB / d scale, relative L2 error
||g - g_torch|| / ||g_torch|| per backend; one CSV row per (loss, backend, gradient), appended as
measured. Exit 1 when a backend that ran exceeds the tolerance (bf16/fp16 2e-2, fp32 1e-4).

    python bench/grad_check.py --n 65536 --d 1024 --dtype bf16 --backend triton,cuda --out g.csv
    python bench/grad_check.py --dry-run --out g.csv      # CPU, tiny, reference vs torch
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import torch
from _sizes import cuda_problem, parser

COLUMNS = ("loss", "backend", "grad", "N", "D", "dtype", "status", "rel_l2_err", "tol", "note")
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}


def _grads(loss: str, backend: str, a, b, s) -> list[torch.Tensor]:
    import gammacl
    from gammacl.ops.gamma_onepass import gamma_onepass

    a, b, s = (t.detach().clone().requires_grad_() for t in (a, b, s))
    if loss == "clip":
        out = gammacl.clip_loss(a, b, s, backend=backend)
    else:
        n = a.shape[0]
        al = torch.full((n,), -math.log(n), device=a.device)
        out = gamma_onepass(a, b, s, al, al, w_row=0.5, w_col=0.5, backend=backend)[0].sum()
    return [g.float() for g in torch.autograd.grad(out, (a, b, s))]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, "grad_check.csv", "CPU, N=300 D=64 fp32, reference vs torch")
    p.add_argument("--backend", default="triton,cuda")
    args = p.parse_args(argv)
    if args.dry_run:
        # the materialised reference: nothing to compile (a cold C++ build can outlast the step)
        dev, n, d, dtype, backends = "cpu", 300, 64, torch.float32, ["reference"]
    else:
        if (problem := cuda_problem(args, "grad_check")) is None:
            return 2
        dev, (n, d, dtype) = "cuda", problem
        backends = [x for x in args.backend.split(",") if x]
    from gammacl.dispatch import resolve_backend

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerow(COLUMNS)
    g = torch.Generator(device=dev).manual_seed(0)
    a, b = (
        torch.nn.functional.normalize(torch.randn(n, d, device=dev, generator=g), dim=1).to(dtype)
        for _ in range(2)
    )
    s = torch.tensor(1 / 0.07, device=dev)
    bad = 0
    for loss in ("clip", "gamma_onepass"):
        ref = _grads(loss, "torch", a, b, s)
        for be in backends:
            base = dict(loss=loss, backend=be, N=n, D=d, dtype=str(dtype).split(".")[-1])
            try:
                resolve_backend(be, a.device)
                got = _grads(loss, be, a, b, s)
            except Exception as exc:  # an unavailable backend or a failing kernel is a row
                rows = [dict(base, grad="-", status="unavailable" if "unavailable" in str(exc)
                             else "error", note=f"{type(exc).__name__}: {exc}"[:200])]  # fmt: skip
                bad += rows[0]["status"] == "error"
            else:
                rows = []
                for name, x, r in zip(("dA", "dB", "dscale"), got, ref, strict=True):
                    err = float((x - r).norm() / r.norm().clamp_min(1e-30))
                    ok = err <= TOL[dtype]
                    bad += not ok
                    rows.append(dict(base, grad=name, status="ok" if ok else "MISMATCH",
                                     rel_l2_err=f"{err:.3e}", tol=TOL[dtype]))  # fmt: skip
            with open(out, "a", newline="") as fh:
                for row in rows:
                    csv.writer(fh).writerow([row.get(c, "") for c in COLUMNS])
                    print(" | ".join(f"{c}={row.get(c, '')}" for c in COLUMNS))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
