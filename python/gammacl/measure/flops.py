"""FLOP formulas and analytic memory models.

FLOP conventions (every bench row names its formula in `flop_formula`):
  two-pass losses (clip, infonce with M = N, gamma update="before", sogclr, every peer of clip):
      fwd 2*N^2*D (one N x N x D GEMM), bwd 6*N^2*D (recompute + dA + dB), fwd+bwd 8*N^2*D.
      A materialising implementation (naive, open_clip) does less arithmetic (no recompute) or
      more (open_clip forms both I T^T and T I^T); the same useful-work count is used for all so
      TFLOP/s compares time directly.
  one-pass (gamma update="after"): fwd+bwd 6*N^2*D (loss and gradient GEMMs in one sweep);
      the fwd / bwd split depends on the implementation, so those rows carry no FLOP count.
  GEMM floor: fwd 1 GEMM 2*N^2*D, bwd 3 GEMMs 6*N^2*D, fwd+bwd the 4 GEMMs 8*N^2*D.

Each loss also names its `scaling` (the term that dominates its work): "N^2*D" for the
contrastive losses (they are drawn against the GEMM floor), "N*D^2" for Gram-form losses,
"N*D" for row-wise ones (no floor: an N^2 GEMM is not their bound).

Memory models return (bytes over inputs + grads, formula); None where not modelled.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from gammacl.measure.cli import acc_bytes

FlopFn = Callable[[int, int, str], tuple[int | None, str]]
N2D, ND2, ND = "N^2*D", "N*D^2", "N*D"


def flops_two_pass(n: int, d: int, mode: str) -> tuple[int, str]:
    k = {"fwd": 2, "bwd": 6, "fwd+bwd": 8}[mode]
    how = {"fwd": "1 GEMM", "bwd": "recompute + dA + dB", "fwd+bwd": "two-pass, recompute counted"}
    return k * n * n * d, f"{k}*N^2*D ({how[mode]})"


def flops_one_pass(n: int, d: int, mode: str) -> tuple[int | None, str]:
    if mode == "fwd+bwd":
        return 6 * n * n * d, "6*N^2*D (one-pass: fwd + gradient GEMMs in one sweep)"
    return None, "n/a (one-pass: the fwd/bwd split depends on the implementation)"


def flops_floor(n: int, d: int, mode: str) -> tuple[int, str]:
    k = {"fwd": 2, "bwd": 6, "fwd+bwd": 8}[mode]
    g = {"fwd": "1 GEMM", "bwd": "3 GEMMs", "fwd+bwd": "4 GEMMs"}[mode]
    return k * n * n * d, f"{k}*N^2*D ({g})"


def flops_none(why: str) -> FlopFn:
    return lambda n, d, mode: (None, why)


def split(fwd_k: float, bwd_k: float, term: str, n2d: Callable[[int, int], float]) -> FlopFn:
    """FLOPs fwd_k * X (fwd), bwd_k * X (bwd), their sum (fwd+bwd) with X = n2d(N, D)."""

    def f(n: int, d: int, mode: str) -> tuple[int, str]:
        k = {"fwd": fwd_k, "bwd": bwd_k, "fwd+bwd": fwd_k + bwd_k}[mode]
        return int(k * n2d(n, d)), f"{k:g}*{term}"

    return f


# Regularisers of gammacl.modality: (FLOPs from the module's docstrings, scaling). D' = D + 2,
# one N x N x D' simlse per modality, rows only: fwd 2 N^2 D', bwd 6 N^2 D'. A regulariser not
# listed here is taken as row-wise O(N*D) with no FLOP count.
MODALITY_COST: dict[str, tuple[FlopFn, str]] = {
    "uniformity_loss": (
        split(4, 12, "N^2*(D+2) (2 modalities, simlse rows)", lambda n, d: n * n * (d + 2)),
        N2D,
    ),
    "inmodal_infonce_loss": (split(2, 6, "N^2*D", lambda n, d: n * n * d), N2D),
    "modality_contrastive_loss": (
        split(6, 18, "N^2*D (clip + 2 in-modal infonce)", lambda n, d: n * n * d),
        N2D,
    ),
    "feature_separation_loss": (
        split(
            8,
            24,
            "N^2*D approx (2 in-modal infonce + uniformity at D+2 ~ D)",
            lambda n, d: n * n * d,
        ),
        N2D,
    ),
    "geometric_consistency_loss": (
        split(6, 8, "N*D^2 (d x d Grams, no N x N)", lambda n, d: n * d * d),
        ND2,
    ),
}
ROW_WISE = (flops_none("n/a (row-wise O(N*D) or not modelled)"), ND)


# ---- analytic memory models: extra bytes over inputs + grads -----------------------------


def _chunk_rows(n: int, dtype: torch.dtype, env: str = "GAMMACL_CHUNK_MIB") -> int:
    budget = int(float(os.environ.get(env, "32")) * 2**20)
    return max(1, min(n, budget // max(1, n * acc_bytes(dtype))))


def expected_chunked(n: int, d: int, dtype: torch.dtype, mode: str, cols: bool = True):
    """gammacl torch backend: C = rows per chunk (GAMMACL_CHUNK_MIB, 32 MiB of N acc values).
    fwd ~2 chunk buffers (S and a temporary); fwd+bwd ~3 (S, W, a temporary; measured 3.0-3.2
    on CPU RSS at N=4096-8192, D=64) + fp32 raw grads dA, dB and one scaled copy (3 N D),
    + fp32 upcasts of the inputs (2 N D) for half inputs."""
    ab, c = acc_bytes(dtype), _chunk_rows(n, dtype)
    up = 2 * n * d * ab if dtype in (torch.float16, torch.bfloat16) else 0
    up_s = " + 2*N*D*4 (upcast)" if up else ""
    if mode == "fwd":
        return 2 * c * n * ab + up, f"2*C*N*{ab} (C={c} chunk rows){up_s}"
    if mode == "fwd+bwd":
        return 3 * c * n * ab + 3 * n * d * ab + up, f"3*C*N*{ab} + 3*N*D*{ab} (C={c}){up_s}"
    return None, "n/a for bwd"


def expected_fused(n: int, d: int, dtype: torch.dtype, mode: str, cols: bool = True):
    """triton / cuda: O(N) statistics; backward adds fp32 raw grads and a scaled copy."""
    ab = acc_bytes(dtype)
    if mode == "fwd":
        return 2 * n * ab, f"2*N*{ab} (row/col LSE)"
    if mode == "fwd+bwd":
        return 3 * n * d * ab + 2 * n * ab, f"3*N*D*{ab} + 2*N*{ab}"
    return None, "n/a for bwd"


def expected_materialised(n: int, d: int, dtype: torch.dtype, mode: str, cols: bool = True):
    """Naive symmetric CE on fp32 logits: fwd holds S, scaled logits, two log-softmax outputs
    (4 N^2); fwd+bwd ~5 N^2 fp32 (calibrated on CPU RSS, N=4096: 322 MiB vs 5*64 MiB)."""
    k = (4 if mode == "fwd" else 5) if cols else (2 if mode == "fwd" else 3)
    if mode == "bwd":
        return None, "n/a for bwd"
    return k * n * n * 4, f"{k}*N^2*4 (fp32 N x N buffers)"


def expected_reference_op(n: int, d: int, dtype: torch.dtype, mode: str, cols: bool = True):
    """gammacl's `reference` backend: each op on its materialised reference (reference/simlse.py).
    fwd holds l and one exp temporary (2 N^2); the backward rebuilds l and forms each direction's
    weights in place, W and the column term beside l (3 N^2 fp32 with column terms; calibrated on
    CPU RSS with the mmap threshold pinned, N=1024: 12.0 MiB = 3 x 4 MiB)."""
    k = (2 if mode == "fwd" else 3) if cols else 2
    if mode == "bwd":
        return None, "n/a for bwd"
    return k * n * n * 4, f"{k}*N^2*4 (fp32 N x N buffers)"


def expected_cpp(n: int, d: int, dtype: torch.dtype, mode: str, cols: bool = True):
    """gammacl cpp backend (csrc/simlse.cpp): one R x N acc buffer (R rows per chunk,
    GAMMACL_CPU_CHUNK_MIB, 32 MiB) turned into the weights in place, column partials
    2 * threads * N; backward adds fp32 raw grads and a scaled copy (3 N D)."""
    ab, c = acc_bytes(dtype), _chunk_rows(n, dtype, "GAMMACL_CPU_CHUNK_MIB")
    up = 2 * n * d * ab if dtype in (torch.float16, torch.bfloat16) else 0
    up_s = f" + 2*N*D*{ab} (upcast)" if up else ""
    if mode == "fwd":
        return c * n * ab + up, f"C*N*{ab} (C={c} chunk rows){up_s}"
    if mode == "fwd+bwd":
        return c * n * ab + 3 * n * d * ab + up, f"C*N*{ab} + 3*N*D*{ab} (C={c}){up_s}"
    return None, "n/a for bwd"


def expected_none(n, d, dtype, mode, cols=True):
    return None, "not modelled"


# the simlse-based losses' model per gammacl backend
EXPECTED_BY_BACKEND = {
    "torch": expected_chunked,
    "cpp": expected_cpp,
    "triton": expected_fused,
    "cuda": expected_fused,
    "reference": expected_reference_op,
}
