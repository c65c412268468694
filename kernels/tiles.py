"""Shared Triton tile helpers of every gammacl kernel (kernels/simlse.py, simlse_tiled.py,
gamma_onepass.py, siglip.py): exp / log in natural units, masked tile loads, tl.dot wrappers, the
S = X @ Y^T K loop, the row-block dA / dB loop of the one-pass kernels, the validity mask, the
online / per-tile LSE blocks, the grouped tile order, the LSE-partial merge kernel, a tiled GEMM
with fp32 (fp64) output for the large-D paths, and the launch helpers (dtype flags, the shared
operand arguments, the row-chunk driver).

One unit system: every logit, shift and LSE is in natural units, formed from one rounded logit
l = scale * S; BASE2 (the fp32 path) only changes how exp / log are evaluated, exp2(x log2 e) /
log2(x) ln 2 of the exact natural-unit argument (_exp_nat, _log_nat). Folding log2 e into the
scale instead rounds the logit twice (8e-5 .. 1e-3 relative gradient error at |l| ~ 1e3,
tests/test_large_logits.py).

Maths of the LSE blocks:
    online row LSE   m' = max(m, max_j s_ij),  l' = l * e^{m - m'} + sum_j e^{s_ij - m'}
    tile LSE         LSE_k s = mx + log sum_k e^{s_k - mx}     (mx = max_k s_k)
A shift of -inf (nothing valid yet) is replaced by 0 so exp never sees -inf - -inf; an empty
sum gives -inf, a NaN sum stays NaN.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gammacl._validate import acc_dtype  # the one definition (kernels import it from here)
from gammacl.dispatch import interpreter_on

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * log2 e)
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2):    log(x) = log2(x) * ln 2
_NEG_INF = tl.constexpr(float("-inf"))


# ----------------------------------------------------------------------------------------------
# elementwise, loads, products
# ----------------------------------------------------------------------------------------------
@triton.jit
def _exp_nat(x, BASE2: tl.constexpr):
    """exp(x) of x = l - shift formed in natural units: exp2(x log2 e) on the fp32 path. The
    shift and the exponent then come from one rounded logit (exp(0) = 1 exactly at the row
    maximum; tests/test_large_logits.py); folding log2 e into the scale rounds the logit twice."""
    if BASE2:
        y = tl.exp2(x * _LOG2E)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _log_nat(x, BASE2: tl.constexpr):
    """log(x): log2(x) ln 2 on the fp32 path."""
    if BASE2:
        y = tl.log2(x) * _LN2
    else:
        y = tl.log(x)
    return y


@triton.jit
def _load_rows(PTR, offs_r, offs_d, stride, n_rows, D):
    """[len(offs_r), len(offs_d)] tile of a row-major matrix, zeros outside [n_rows, D]."""
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < D)
    return tl.load(PTR + offs_r[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _dot_nt(x, y, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + x @ y^T (x: [BM, BD], y: [BN, BD])."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    # out_dtype = the accumulator's (fp64 for fp64 inputs): triton 3.6 asserts they agree
    return tl.dot(x, tl.trans(y), acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _dot_nn(w, y, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + w @ y (w: [BM, BN] already in the operand dtype, y: [BN, BD])."""
    if UPCAST:
        y = y.to(tl.float32)
    return tl.dot(w, y, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _scores_chunked(
    X, Y, offs_m, offs_n, M, N, D, stride_x, stride_y,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """S = X[offs_m] @ Y[offs_n]^T with the K loop over D in BLOCK_D chunks (2*BM*BN*D FLOPs)."""
    offs_d = tl.arange(0, BLOCK_D)
    s = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=ACC)
    for k0 in range(0, D, BLOCK_D):
        x = _load_rows(X, offs_m, k0 + offs_d, stride_x, M, D)
        y = _load_rows(Y, offs_n, k0 + offs_d, stride_y, N, D)
        s = _dot_nt(x, y, s, UPCAST, PRECISION)
    return s


@triton.jit
def _grad_rows(
    w, w_inv, X, Y, DA, DB, offs_m, offs_n, j0, M, N, D, stride_x, stride_y, stride_da, stride_db,
    COLS: tl.constexpr, SCALED: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One column tile's share of the row-block gradients, w [BM, BN] in the operand dtype:
    DA[offs_m] (+)= W @ Y[offs_n] (the rows belong to one program: read-modify-write per D
    chunk, the first column tile j0 = 0 stores) and with COLS DB[offs_n] += W^T @ X[offs_m] by
    atomics (every row block adds). SCALED: both products times w_inv (undoes a tile scaling
    of W). FLOPs 2*BM*BN*D per product."""
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < M
    wt = tl.trans(w)  # dB only (COLS); dead code otherwise
    for k0 in range(0, D, BLOCK_D):
        offs_k = k0 + offs_d
        k_ok = offs_k < D
        y = _load_rows(Y, offs_n, offs_k, stride_y, N, D)
        o_ptr = DA + offs_m[:, None] * stride_da + offs_k[None, :]
        o_mask = row_ok[:, None] & k_ok[None, :]
        o = tl.load(o_ptr, mask=o_mask & (j0 > 0), other=0.0)
        if SCALED:
            zero = tl.zeros((offs_m.shape[0], BLOCK_D), dtype=ACC)
            o = o + _dot_nn(w, y, zero, UPCAST, PRECISION) * w_inv
        else:
            o = _dot_nn(w, y, o, UPCAST, PRECISION)
        tl.store(o_ptr, o, mask=o_mask)
        if COLS:
            x = _load_rows(X, offs_m, offs_k, stride_x, M, D)
            zero_t = tl.zeros((offs_n.shape[0], BLOCK_D), dtype=ACC)
            p = _dot_nn(wt, x, zero_t, UPCAST, PRECISION)
            if SCALED:
                p = p * w_inv
            tl.atomic_add(
                DB + offs_n[:, None] * stride_db + offs_k[None, :],
                p,
                mask=(offs_n < N)[:, None] & k_ok[None, :],
            )
    tl.debug_barrier()  # DA stores visible to every thread before the next tile's loads


@triton.jit
def _valid(offs_m, offs_n, M, N, offset, EXCLUDE: tl.constexpr):
    """In-range entries, minus (i, i + offset) when EXCLUDE."""
    ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if EXCLUDE:
        ok = ok & (offs_n[None, :] != offs_m[:, None] + offset)
    return ok


# ----------------------------------------------------------------------------------------------
# LSE blocks
# ----------------------------------------------------------------------------------------------
@triton.jit
def _online_lse_nat(m_i, l_i, s, BASE2: tl.constexpr):
    """One natural-unit column tile s [BM, BN] folded into the running row LSE (m_i, l_i):
    m' = max(m, max_j s_ij), l' = l e^{m - m'} + sum_j e^{s_ij - m'}; returns (m', l')."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_shift = tl.where(m_new == _NEG_INF, 0.0, m_new)
    l_new = l_i * _exp_nat(m_i - m_shift, BASE2) + tl.sum(
        _exp_nat(s - m_shift[:, None], BASE2), axis=1
    )
    return m_new, l_new


@triton.jit
def _tile_lse_nat(s, AXIS: tl.constexpr, BASE2: tl.constexpr):
    """LSE of a natural-unit tile s along AXIS (0: per column, 1: per row), via _exp_nat."""
    mx = tl.max(s, axis=AXIS)
    sh = tl.where(mx == _NEG_INF, 0.0, mx)
    if AXIS == 0:
        tot = tl.sum(_exp_nat(s - sh[None, :], BASE2), axis=0)
    else:
        tot = tl.sum(_exp_nat(s - sh[:, None], BASE2), axis=1)
    return tl.where(tot == 0, _NEG_INF, sh + _log_nat(tl.where(tot == 0, 1.0, tot), BASE2))


@triton.jit
def _vec_weights(
    s_raw, sx, lse_x, g_x,
    SCALE_Y, LSE_Y, G_Y,
    offs_m, offs_n, M, N, offset, ds_acc,
    EXCLUDE: tl.constexpr, HAS_X: tl.constexpr, HAS_Y: tl.constexpr, HAS_DS: tl.constexpr,
    ACC: tl.constexpr, BASE2: tl.constexpr,
    DS_Y: tl.constexpr = False,
):  # fmt: skip
    """Vector-scale weights of one tile (ops/simlse.py): W_ij = [HAS_X] g_x_i sx_i p_ij +
    [HAS_Y] G_Y[j] SCALE_Y[j] p'_ij, p_ij = exp(sx_i S_ij - lse_x_i), p'_ij = exp(SCALE_Y[j]
    S_ij - LSE_Y[j]), 0 on excluded / out-of-range entries; with HAS_DS also
    ds_acc_i += sum_j p_ij S_ij, and with DS_Y the third result is sum_i p'_ij S_ij (else 0).
    Each logit is rounded once (the forward's product). Shared by the fused backward
    (kernels/simlse.py) and the large-D W kernel (kernels/simlse_tiled.py)."""
    valid = _valid(offs_m, offs_n, M, N, offset, EXCLUDE)
    w = tl.zeros(s_raw.shape, dtype=ACC)
    # exponents -inf on excluded / out-of-range entries (never -inf - -inf on an all-excluded
    # row); valid entries in IEEE arithmetic, so a NaN / inf logit or LSE gives NaN (torch's)
    if HAS_X:
        p = _exp_nat(tl.where(valid, s_raw * sx - lse_x[:, None], _NEG_INF), BASE2)
        w += (g_x[:, None] * sx) * p
        if HAS_DS:
            ds_acc += tl.sum(p * s_raw, axis=1)
    if HAS_Y:
        col_ok = offs_n < N
        sy = tl.load(SCALE_Y + offs_n, mask=col_ok, other=0.0).to(ACC)
        lse_y = tl.load(LSE_Y + offs_n, mask=col_ok, other=0.0)
        g_y = tl.load(G_Y + offs_n, mask=col_ok, other=0.0)
        p_y = _exp_nat(tl.where(valid, s_raw * sy[None, :] - lse_y[None, :], _NEG_INF), BASE2)
        w += (g_y * sy)[None, :] * p_y
        if DS_Y:
            ds_y = tl.sum(p_y * s_raw, axis=0)
        else:
            ds_y = tl.zeros((s_raw.shape[1],), dtype=ACC)
    else:
        ds_y = tl.zeros((s_raw.shape[1],), dtype=ACC)
    w = tl.where(valid, w, 0.0)  # 0 also where g is non-finite, as torch's zeroing
    return w, ds_acc, ds_y


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a 1-D launch in grouped order: GROUP_M row tiles sweep the column tiles
    together, so the operand tiles of consecutive programs are shared in L2."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m.to(tl.int64), pid_n.to(tl.int64)


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The program's [BLOCK_M, BLOCK_N] tile of a 1-D tiled launch (grouped order, _tile_ids):
    (pid_m, pid_n, offs_m, offs_n, row_ok = offs_m < M, col_ok = offs_n < N)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_n, offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _simlse_col_merge_kernel(
    PART, COL_LSE,
    R, N, stride_part,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """COL_LSE[j] = LSE_p PART[p, j] (online over the R row-block partials; -inf stays -inf)."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    m = tl.full((BLOCK_N,), _NEG_INF, dtype=ACC)
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        offs_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (offs_r[:, None] < R) & col_ok[None, :]
        p = tl.load(
            PART + offs_r[:, None] * stride_part + offs_n[None, :], mask=mask, other=_NEG_INF
        )
        m_new = tl.maximum(m, tl.max(p, axis=0))
        m_shift = tl.where(m_new == _NEG_INF, 0.0, m_new)
        acc = acc * tl.exp(m - m_shift) + tl.sum(tl.exp(p - m_shift[None, :]), axis=0)
        m = m_new
    out = tl.where(acc == 0, _NEG_INF, m + tl.log(tl.where(acc == 0, 1.0, acc)))
    tl.store(COL_LSE + offs_n, out, mask=col_ok)


def merge_lse(
    part: torch.Tensor, out: torch.Tensor, into: bool = False, interp_block_r: int = 32
) -> None:
    """out[j] = LSE_p part[p, j] (the merge kernel over the rows of a [P, n] partials buffer);
    `into`: out[j] = logaddexp(out[j], LSE_p part[p, j]) (a later row chunk's partials).
    interp_block_r: partial rows per loop trip under the interpreter (16 on GPU)."""
    if into:
        new = torch.empty_like(out)
        merge_lse(part, new, interp_block_r=interp_block_r)
        torch.logaddexp(out, new, out=out)
        return
    n = part.shape[1]
    block_r, block_n = (interp_block_r, 64) if interpreter_on() else (16, 256)
    _simlse_col_merge_kernel[(triton.cdiv(n, block_n),)](
        PART=part,
        COL_LSE=out,
        R=part.shape[0],
        N=n,
        stride_part=part.stride(0),
        ACC=tl.float64 if part.dtype == torch.float64 else tl.float32,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        num_warps=4,
    )


# ----------------------------------------------------------------------------------------------
# GEMM with an accumulation-dtype output (large-D backward: dA = W @ B, dB += W^T @ A)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gemm_kernel(
    A, B, C,
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
    ACCUM: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C[M, N] (+= when ACCUM) A[M, K] @ B[K, N]; operands in the input dtype, accumulation and
    C in ACC (tensor cores for 16-bit operands). 2*BM*BN*K FLOPs per tile; bytes per tile
    (BM + BN)*K*size from L2 plus BM*BN*4 (x2 with ACCUM) for C: with ACCUM the C round trip
    is 2*K FLOPs per 8 B, K/4 FLOP/B."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(
            A + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            B + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    c_ptr = C + offs_m[:, None] * stride_cm + offs_n[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    if ACCUM:
        acc += tl.load(c_ptr, mask=c_mask, other=0.0)
    tl.store(c_ptr, acc, mask=c_mask)


def gemm_config(dtype: torch.dtype) -> dict:
    """Fixed config of _gemm_kernel (chosen from the compiled facts,
    `python -m gammacl.aot`, sm_90, triton 3.6.0 and 3.9). 16-bit: 64 x 128 x 64 tiles, 4 warps
    (one warpgroup), 3 stages = (64*64 + 64*128)*2 B*3 = 72 KiB shared memory; 118-126 registers
    (184 with ACCUM) -> 3 CTAs per SM (2 with ACCUM), wgmma async. The 128 x 128 x 64 / 8-warp
    tile (stages 2-4) compiles with ptxas C7515 (wgmma serialised) on triton 3.6; 128 x 256 x 64
    / 8 warps is async but spills 256 B with ACCUM at 255 registers (1 CTA per SM). Tile reuse:
    2*64*128*64 FLOPs per (64 + 128)*64*2 B = 43 FLOP/B (128 x 128: 64), paid for by 3 resident
    CTAs whose mainloops hide one another's epilogue (the C store, and with ACCUM the fp32 C
    read-modify-write, 8 B per element per chunk)."""
    if interpreter_on():  # few programs (the interpreter costs per program x K trip)
        return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    # fp32: 8 warps. AOT table (sm_90, triton 3.9), fp32-ieee: at 4 warps 4 B spilled without
    # ACCUM and 10 KB with ACCUM (the table's tiny launches, 4-element row strides); at 8 warps
    # 0 B and 296 B; with 16-aligned strides (real shapes) 0 B at either count (a probe).
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)


def gemm(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out (+)= x @ y for 2-D views with any strides (out: unit column stride), out in the
    accumulation dtype, x and y in the operand dtype."""
    m, k = x.shape
    n = y.shape[1]
    cfg = gemm_config(x.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    fl = flags(x.dtype)
    # A, B, C, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm
    _gemm_kernel[grid](
        x, y, out, m, n, k, *x.stride(), *y.stride(), out.stride(0),
        ACCUM=accumulate, ACC=fl["ACC"], UPCAST=fl["UPCAST"], PRECISION=fl["PRECISION"], **cfg,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------
def flags(dtype: torch.dtype) -> dict:
    """ACC / BASE2 / UPCAST / PRECISION constexprs for inputs of `dtype`."""
    acc = acc_dtype(dtype)
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        precision = "tf32"  # opt-in, PyTorch's own switch
    elif dtype in (torch.float16, torch.bfloat16):
        precision = "tf32"  # ignored for 16-bit operands (the backend default)
    else:
        precision = "ieee"
    return dict(
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BASE2=acc == torch.float32,
        UPCAST=dtype == torch.bfloat16 and interpreter_on(),
        PRECISION=precision,
    )


def operands(x: torch.Tensor, y: torch.Tensor) -> dict:
    """The launch arguments every S = X @ Y^T kernel shares: X, Y, M, N, D, their row strides
    and the dtype flags (x may be a row slice of a larger operand: same row stride)."""
    (m, d), n = x.shape, y.shape[0]
    strides = dict(stride_x=x.stride(0), stride_y=y.stride(0))
    return dict(X=x, Y=y, M=m, N=n, D=d, **strides, **flags(x.dtype))


def dims(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int, torch.dtype, torch.device]:
    """(M, N, D, accumulation dtype, device) of a launcher's operands a [M, D], b [N, D]."""
    return a.shape[0], b.shape[0], a.shape[1], acc_dtype(a.dtype), a.device


def device_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# large-D path: choice and chunk budget
# ----------------------------------------------------------------------------------------------
TRITON_CHUNK_MIB = 256.0  # default of GAMMACL_TRITON_CHUNK_MIB


def use_large_d(dtype: torch.dtype, d: int) -> bool:
    """The GEMM-structured path for D above what a fused row block holds in registers: D > 128
    for 16-bit inputs, D > 64 for fp32; fp64 always takes the fused path."""
    if dtype in (torch.float16, torch.bfloat16):
        return d > 128
    return dtype == torch.float32 and d > 64


@dataclass(frozen=True)
class RowChunks:
    """The chunk driver of the large-D launchers (simlse_tiled, gamma_onepass, siglip): rows
    [0, m) of the left operand in chunks of `size` rows, iterated as (i0, rows). Each chunk's
    [size, N] buffers (W, partials) are allocated once and reused; a chunk's entry (i, j) is the
    full problem's (i0 + i, j), so an excluded diagonal offset becomes offset + i0."""

    m: int
    size: int

    @classmethod
    def fit(cls, m: int, bytes_per_row: int, multiple: int) -> RowChunks:
        """The one row-budget rule: chunk_rows under GAMMACL_TRITON_CHUNK_MIB."""
        return cls(m, chunk_rows(m, bytes_per_row, multiple))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i0 in range(0, self.m, self.size):
            yield i0, min(self.size, self.m - i0)

    def tiled(
        self, a: torch.Tensor, n: int, bm: int, bn: int
    ) -> Iterator[tuple[int, int, torch.Tensor, tuple[int]]]:
        """(i0, rows, a[i0 : i0 + rows], the 1-D grid of its [bm, bn] tiles against n columns)
        per chunk: the loop of the tiled large-D launchers."""
        for i0, rows in self:
            yield i0, rows, a[i0 : i0 + rows], (triton.cdiv(rows, bm) * triton.cdiv(n, bn),)


def chunk_gemms(w: torch.Tensor, b: torch.Tensor, a_c: torch.Tensor, da_c, db, i0: int) -> None:
    """A chunk's two gradient GEMMs from its weights W [rows, N]: dA_c = W @ B and
    dB (+)= W^T @ A_c (the first chunk stores, later ones accumulate in the GEMM epilogue;
    db None: no dB GEMM)."""
    gemm(w, b, da_c, accumulate=False)
    if db is not None:
        gemm(w.t(), a_c, db, accumulate=i0 > 0)


def chunk_rows(m: int, bytes_per_row: int, multiple: int) -> int:
    """Rows per chunk: the largest multiple of `multiple` whose buffers (bytes_per_row each) fit
    GAMMACL_TRITON_CHUNK_MIB (default 256 MiB), at least `multiple`, at most m."""

    mib = float(os.environ.get("GAMMACL_TRITON_CHUNK_MIB", TRITON_CHUNK_MIB))
    rows = int(mib * 2**20) // max(1, bytes_per_row)
    rows = max(multiple, rows // multiple * multiple)
    return max(1, min(m, rows))
