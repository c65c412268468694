"""What the gpu_session.sh bench scripts that measure one N x D problem (grad_check.py,
kernel_split.py) share: the size options, and the CUDA run's problem or its refusal."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parser(doc: str | None, out: str, dry_run_help: str) -> argparse.ArgumentParser:
    """--n, --d, --dtype (the CUDA run's problem), --out (CSV path, default `out`), --dry-run."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--out", default=out)
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)
    return p


def cuda_problem(args: argparse.Namespace, tool: str) -> tuple[int, int, torch.dtype] | None:
    """(N, D, dtype) of the CUDA run; None, said on stderr, when no CUDA device is visible."""
    if not torch.cuda.is_available():
        print(f"{tool}: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return None
    return args.n, args.d, DTYPES[args.dtype]
