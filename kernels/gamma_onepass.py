"""Triton backend of the gamma_onepass op: the decomposable negative term's value AND gradient in
one sweep over S (contract: gammacl.ops.gamma_onepass).

Maths (a: [M, D], b: [N, D], l_ij = scale * <a_i, b_j>, entries (i, i + offset) excluded):
    row_lse_i  = LSE_j l_ij                      col_lse_j  = LSE_i l_ij
    row_term_i = sum_j e^{min(l_ij + alpha_row_i, clamp)}
    col_term_j = sum_i e^{min(l_ij + alpha_col_j, clamp)}
    W_ij = w_row e^{min(l_ij + alpha_row_i, clamp)} + w_col e^{min(l_ij + alpha_col_j, clamp)}
    da_raw = W @ b,  db_raw = W^T @ a            (acc dtype: fp32, fp64 for fp64 inputs)
The weights need only per-row / per-column scalars known before the sweep, so each S tile is
final when computed: no normaliser pass, no recompute.

One kernel (`_gamma_onepass_fwd_kernel`): program p owns rows [p*BM, (p+1)*BM) and streams all
column tiles. Per tile:
    S = a_blk @ b_tile^T          (tl.dot over D in BLOCK_D chunks, fp32 accumulation)  2*BM*BN*D
    online row LSE (running max m, sum l, rescaled by exp(m_old - m_new)), row_term
    column partial LSE of this row block, cm_j + log sum_i e^{l_ij - cm_j}, stored to a
    [ceil(M/BM), N] buffer (acc dtype) and LSE-merged afterwards by
    kernels.simlse._simlse_col_merge_kernel (log space: any logit range; when the buffer would
    pass _COL_PART_MAX_BYTES the atomic-free transposed two-launch path runs instead),
    col_term by an atomic add
    W (cast to the operand dtype) ->  dA[rows] += W @ b_tile   (rows owned by p: read-modify-write
                                                                per D chunk, no atomics)
                                      dB[cols] += W^T @ a_blk  (atomic add: every row block adds)
    FLOPs: 6MND in all (3 GEMM-equivalents; the two-pass LSE + gradient path costs 8MND).
    Bytes: a read ~3x per column tile from L2, b likewise per row block; dA RMW 8*BM*D per tile
    (L2); dB atomics 4*BN*D per tile, i.e. (M/BM)*N*D fp32 atomic adds in all (one per 2*BM
    GEMM FLOPs); O(M + N) statistics; never an M x N buffer. A wider row panel per program
    (larger BM) cuts the dB atomics as 1/BM.
Atomics make col_term and dB sums run-to-run order dependent at fp32 rounding level on
GPU (the interpreter runs programs in order). Determinism: under
torch.use_deterministic_algorithms(True) gamma_onepass_fwd launches the kernel twice with
COLS=False (no atomics): once on (a, b) for the row outputs and dA, once on the transposed
problem (b, a, alpha_col, alpha_row, w_col, w_row, -offset), whose row outputs are the column
outputs and whose dA is dB. Every sum then runs in a fixed order (bitwise reproducible), for
8MND FLOPs instead of 6MND (S is formed twice).

Numerics: excluded / out-of-range entries are -inf before any exp (weight exactly 0); a running
max of -inf is replaced by 0 as the shift, so an all-excluded row has LSE -inf and term 0.
Every shift, LSE and exponent is formed in natural units from one rounded logit l = scale*S
(tiles._exp_nat: exp2(x log2 e) of the exact difference on the fp32 path; exp / log for fp64), and
the kernels are compiled with enable_fp_fusion=False, as simlse's: alpha = -LSE gives exactly
e^0 = 1 at a row's maximum (tests/test_large_logits.py; log2 e folded into the scale: 1e-3).
fp16 operands: W (~0.5/B^2 at batch B, below fp16's normal range) is scaled per tile by an
exact power of two putting max|W| near 2^14 before the fp16 cast, and the dot products are
scaled back exactly; NaN propagates, inf saturates at 65504. bf16 / fp32 hold W unscaled.
Large D (fp32 / bf16 with tiles.use_large_d): `_gamma_onepass_tile_kernel` per [BM, BN] tile of
S writes the tile's partial LSEs and terms and its block of W to a [R, N] buffer, then
dA_c = W @ B and dB += W^T @ A_c run as two GEMMs: 3 GEMMs (6MND) in all, no atomics (every
sum in a fixed order, so this path is deterministic in either mode).
Config: one fixed config per dtype (_config). Under the
interpreter (a test harness) bf16 tiles are upcast before tl.dot, as in kernels/simlse.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gammacl.dispatch import interpreter_on
from gammacl.kernels.simlse import _COL_PART_MAX_BYTES
from gammacl.kernels.simlse_checks import check_operands as _check_operands
from gammacl.kernels.simlse_tiled import tile_config as _simlse_tile_config
from gammacl.kernels.tiles import (
    _NEG_INF,
    RowChunks,
    _exp_nat,
    _grad_rows,
    _log_nat,
    _online_lse_nat,
    _scores_chunked,
    _tile_lse_nat,
    _tile_offsets,
    _valid,
    chunk_gemms,
    merge_lse,
    use_large_d,
)
from gammacl.kernels.tiles import acc_dtype as _acc_dtype
from gammacl.kernels.tiles import device_guard as _device_guard
from gammacl.kernels.tiles import dims as _dims
from gammacl.kernels.tiles import operands as _operands


@triton.jit
def _exp_capped(x, cap, BASE2: tl.constexpr):
    """e^{min(x, cap)} of natural-unit x; NaN propagates (a NaN batch stays visible)."""
    return _exp_nat(tl.minimum(x, cap, propagate_nan=tl.PropagateNan.ALL), BASE2)


@triton.jit(do_not_specialize=["offset"])
def _gamma_onepass_fwd_kernel(
    X, Y, SCALE,
    w_row_hi, w_row_lo, w_col_hi, w_col_lo, cap_hi, cap_lo,
    ALPHA_R, ALPHA_C, ROW_LSE, ROW_TERM, COL_PART, COL_TERM, DA, DB,
    M, N, D, stride_x, stride_y, stride_da, stride_db, stride_part, offset,
    GRAD: tl.constexpr, COLS: tl.constexpr, SAT_FP16: tl.constexpr,
    ACC: tl.constexpr, BASE2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows [pid*BLOCK_M, ...) of X against every row of Y: ROW_LSE, ROW_TERM stored; DA rows
    written; with COLS, COL_PART[pid, j] = LSE_{i in block} l_ij stored (merged afterwards by
    _simlse_col_merge_kernel), COL_TERM and DB accumulated atomically (without COLS no atomics:
    the deterministic path's row-only launch). w_row, w_col, clamp arrive as fp32 (hi, lo)
    pairs, value = hi + lo: Triton passes Python floats as fp32, and the pair keeps ~48 bits
    for the fp64 path without a per-call host-to-device copy (CUDA-graph capturable)."""
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets reach M*D > 2^31
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    scale = tl.load(SCALE).to(ACC)
    alpha_r = tl.load(ALPHA_R + offs_m, mask=row_ok, other=_NEG_INF).to(ACC)
    w_row = tl.cast(w_row_hi, ACC) + tl.cast(w_row_lo, ACC)
    w_col = tl.cast(w_col_hi, ACC) + tl.cast(w_col_lo, ACC)
    cap = tl.cast(cap_hi, ACC) + tl.cast(cap_lo, ACC)
    m_i = tl.full((BLOCK_M,), _NEG_INF, dtype=ACC)  # running row max
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)  # running sum of exp(l - m_i)
    t_i = tl.zeros((BLOCK_M,), dtype=ACC)  # row_term
    for j0 in range(0, N, BLOCK_N):
        offs_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = offs_n < N
        s = _scores_chunked(
            X, Y, offs_m, offs_n, M, N, D, stride_x, stride_y, ACC, UPCAST, PRECISION, BLOCK_D
        )
        s = tl.where(_valid(offs_m, offs_n, M, N, offset, True), s * scale, _NEG_INF)
        # online row LSE; a shift of -inf (nothing valid yet) is replaced by 0
        m_i, l_i = _online_lse_nat(m_i, l_i, s, BASE2)
        if COLS:  # column partial of this row block: LSE_i l_ij = cm_j + log sum_i e^{l_ij - cm_j}
            part = _tile_lse_nat(s, 0, BASE2)
            tl.store(COL_PART + pid * stride_part + offs_n, part, mask=col_ok)
        # weights: e^{min(l + alpha, clamp)} (NaN propagates so a NaN batch stays visible)
        alpha_c = tl.load(ALPHA_C + offs_n, mask=col_ok, other=_NEG_INF).to(ACC)
        er = _exp_capped(s + alpha_r[:, None], cap, BASE2)
        ec = _exp_capped(s + alpha_c[None, :], cap, BASE2)
        t_i += tl.sum(er, axis=1)
        if COLS:
            tl.atomic_add(COL_TERM + offs_n, tl.sum(ec, axis=0), mask=col_ok)
        if GRAD:
            w = w_row * er + w_col * ec
            w_inv = 1.0  # unused unless SAT_FP16
            if SAT_FP16:
                # fp16 operands: W ~ 0.5/B^2 underflows fp16 (normal >= 6.1e-5). Scale the tile
                # by 2^(14 - e), e = ceil(log2 max|W|) clamped to [-112, 127], so max|W| lands
                # in (2^13, 2^14]; the products are multiplied by 2^(e - 14) afterwards. Both
                # factors are built from their exponent bits: exact powers of two, so the
                # scaling is undone exactly (fp32 accumulation). NaN kept, inf saturates.
                wmax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
                ok = (wmax > 0) & (wmax < 3.0e38)
                e = tl.where(ok, tl.ceil(tl.log2(tl.where(ok, wmax, 1.0))), 0.0)
                e = tl.minimum(tl.maximum(e, -112.0), 127.0).to(tl.int32)
                w_sc = ((141 - e) << 23).to(tl.float32, bitcast=True)  # 2^(14 - e)
                w_inv = ((113 + e) << 23).to(tl.float32, bitcast=True)  # 2^(e - 14)
                w = tl.clamp(w * w_sc, -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL)
            w = w.to(Y.dtype.element_ty)  # operand dtype for tl.dot, fp32 accumulation
            if UPCAST:
                w = w.to(tl.float32)
            # dA rows (this program's), dB rows by atomics; SAT_FP16 undoes the tile scaling
            _grad_rows(
                w, w_inv, X, Y, DA, DB, offs_m, offs_n, j0, M, N, D, stride_x, stride_y,
                stride_da, stride_db, COLS, SAT_FP16, ACC, UPCAST, PRECISION, BLOCK_D,
            )  # fmt: skip
    row = tl.where(l_i > 0, m_i + _log_nat(tl.where(l_i > 0, l_i, 1.0), BASE2), _NEG_INF)
    row = tl.where(l_i != l_i, l_i, row)  # NaN sum stays NaN
    tl.store(ROW_LSE + offs_m, row, mask=row_ok)
    tl.store(ROW_TERM + offs_m, t_i, mask=row_ok)


def _config(dtype: torch.dtype, d: int) -> dict:
    """Fixed launch config. BLOCK_M, BLOCK_N, BLOCK_D >= 16 (tl.dot needs K >= 16 on H100: the
    S product has K = BLOCK_D, dA has K = BLOCK_N, dB has K = BLOCK_M)."""
    p2 = max(16, triton.next_power_of_2(max(d, 1)))
    if interpreter_on():  # ~1-2 ms per program x loop trip: small tiles still give several trips
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=min(p2, 32), num_warps=4, num_stages=1)
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=min(p2, 64), num_warps=4, num_stages=2)
    if dtype == torch.float32:  # FMA dot: 8 warps x 16-wide D chunks spill nothing on sm_90
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=16, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=16, num_warps=4, num_stages=1)


def _check(a, b, scale, alpha_row, alpha_col) -> None:
    acc = _check_operands("gamma_onepass", a, b)
    if scale.ndim != 0 or scale.dtype != acc or scale.device != a.device:
        raise ValueError(
            f"gamma_onepass (triton): scale must be a 0-d {acc} tensor on "
            f"{a.device}, got shape {tuple(scale.shape)} {scale.dtype}"
        )
    for name, v, n in (("alpha_row", alpha_row, a.shape[0]), ("alpha_col", alpha_col, b.shape[0])):
        if v.shape != (n,) or v.dtype != acc or v.device != a.device:
            raise ValueError(
                f"gamma_onepass (triton): {name} must be [{n}] {acc} on {a.device},"
                f" got {tuple(v.shape)} {v.dtype} on {v.device}"
            )


def use_deterministic_path() -> bool:
    """Whether gamma_onepass_fwd takes the atomic-free two-launch path: exactly when
    torch.use_deterministic_algorithms is on (also with warn_only), on every device (the
    interpreter runs it too, so CPU tests cover it)."""
    return torch.are_deterministic_algorithms_enabled()


def _split_fp32(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo fp32-representable (lo = 0 for non-finite x): kernel scalars
    without a host-to-device copy (Triton passes Python floats as fp32)."""
    x = float(x)
    hi = float(torch.tensor(x, dtype=torch.float32))
    lo = x - hi if math.isfinite(x) and math.isfinite(hi) else 0.0
    return hi, float(torch.tensor(lo, dtype=torch.float32))


def _weight_args(scale, alpha_row, alpha_col, w_row: float, w_col: float, clamp: float) -> dict:
    """The weight arguments both kernels take: SCALE, ALPHA_R, ALPHA_C and the fp32 (hi, lo)
    pairs of w_row, w_col and the clamp (_split_fp32)."""
    (wr_hi, wr_lo), (wc_hi, wc_lo), (c_hi, c_lo) = map(_split_fp32, (w_row, w_col, clamp))
    return dict(
        SCALE=scale, ALPHA_R=alpha_row, ALPHA_C=alpha_col,
        w_row_hi=wr_hi, w_row_lo=wr_lo, w_col_hi=wc_hi, w_col_lo=wc_lo, cap_hi=c_hi, cap_lo=c_lo,
    )  # fmt: skip


def _col_part_fits(m: int, n: int, dtype: torch.dtype) -> bool:
    """Whether the [ceil(M/BM), N] column-partial buffer stays under _COL_PART_MAX_BYTES."""
    bm = _config(dtype, 1)["BLOCK_M"]
    itemsize = 8 if _acc_dtype(dtype) == torch.float64 else 4
    return triton.cdiv(m, bm) * n * itemsize <= _COL_PART_MAX_BYTES


def _launch(a, b, scale, alpha_row, alpha_col, w_row, w_col, clamp, offset, grad, cols):
    """One launch of the kernel over the rows of a: (row_lse, row_term, da) and, with cols,
    (col_lse, col_term, db): column LSE from the per-row-block partials (merged by
    _simlse_col_merge_kernel, no overflow at any logit range), col_term and db from atomics;
    without cols those three are None."""
    m, n, d, acc, dev = _dims(a, b)
    cfg = _config(a.dtype, d)
    r = triton.cdiv(m, cfg["BLOCK_M"])
    row_lse = torch.empty(m, dtype=acc, device=dev)
    row_term = torch.zeros(m, dtype=acc, device=dev)
    col_part = torch.empty((r, n) if cols else (0, 0), dtype=acc, device=dev)  # every entry written
    col_term = torch.zeros(n if cols else 0, dtype=acc, device=dev)
    da = torch.zeros(m if grad else 0, d, dtype=acc, device=dev)
    db = torch.zeros(n if grad and cols else 0, d, dtype=acc, device=dev)
    with _device_guard(dev):
        _gamma_onepass_fwd_kernel[(r,)](
            **_operands(a, b),
            **_weight_args(scale, alpha_row, alpha_col, w_row, w_col, clamp),
            ROW_LSE=row_lse,
            ROW_TERM=row_term,
            COL_PART=col_part if cols else row_term,
            COL_TERM=col_term if cols else row_term,
            DA=da if grad else row_term,
            DB=db if grad and cols else row_term,
            stride_da=da.stride(0) if grad else 0,
            stride_db=db.stride(0) if grad and cols else 0,
            stride_part=col_part.stride(0) if cols else 0,
            offset=int(offset),
            GRAD=bool(grad),
            COLS=bool(cols),
            SAT_FP16=a.dtype == torch.float16,
            **cfg,
            enable_fp_fusion=False,  # the shift and the exponent from one rounded logit
        )
        if not cols:
            return row_lse, row_term, da, None, None, None
        col_lse = torch.empty(n, dtype=acc, device=dev)
        merge_lse(col_part, col_lse)
    return row_lse, row_term, da, col_lse, col_term, db


# ----------------------------------------------------------------------------------------------
# large-D path (GEMM structure, fp32 / bf16 inputs with tiles.use_large_d; fp16 and fp64 keep
# the fused kernel above): 3 GEMMs, 6MND FLOPs, no atomics (deterministic)
# ----------------------------------------------------------------------------------------------
# Per chunk of R rows:
#   `_gamma_onepass_tile_kernel`, one [BM, BN] tile of S per program (full-D K loop):
#       row / column partial LSE of the tile  -> ROW_PART[pid_n, i], COL_PART[pid_m, j]
#       row / column partial terms            -> ROW_TPART[pid_n, i], COL_TPART[pid_m, j]
#       W = w_row e^{min(l + alpha_r, cap)} + w_col e^{min(l + alpha_c, cap)} -> W [R, N] (operand
#       dtype), written once
#   partials merged (LSE by _simlse_col_merge_kernel, terms by a fixed-order sum), then
#   dA_c = W @ B, dB (+)= W^T @ A_c (tiles._gemm_kernel, fp32 outputs).
# FLOPs 2RND (tile) + 4RND (GEMMs); bytes per entry: W written once, read twice (3 * size).
# The weights need no normaliser, so W is final when its tile is computed. fp16 would need W
# scaled into fp16's range by a factor known before the sweep (the per-tile factor of the fused
# kernel cannot be undone after a GEMM over many tiles): fp16 keeps the fused kernel.
@triton.jit(do_not_specialize=["offset"])
def _gamma_onepass_tile_kernel(
    X, Y, SCALE,
    w_row_hi, w_row_lo, w_col_hi, w_col_lo, cap_hi, cap_lo,
    ALPHA_R, ALPHA_C, ROW_PART, ROW_TPART, COL_PART, COL_TPART, W,
    M, N, D, stride_x, stride_y, stride_rp, stride_cp, stride_w, offset,
    GRAD: tl.constexpr,
    ACC: tl.constexpr, BASE2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of l = scale * X @ Y^T (entries (i, i + offset) excluded):
    the tile's row / column partial LSEs and terms, and (GRAD) its block of W."""
    pid_m, pid_n, offs_m, offs_n, row_ok, col_ok = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    scale = tl.load(SCALE).to(ACC)
    alpha_r = tl.load(ALPHA_R + offs_m, mask=row_ok, other=_NEG_INF).to(ACC)
    alpha_c = tl.load(ALPHA_C + offs_n, mask=col_ok, other=_NEG_INF).to(ACC)
    w_row = tl.cast(w_row_hi, ACC) + tl.cast(w_row_lo, ACC)
    w_col = tl.cast(w_col_hi, ACC) + tl.cast(w_col_lo, ACC)
    cap = tl.cast(cap_hi, ACC) + tl.cast(cap_lo, ACC)
    s = _scores_chunked(
        X, Y, offs_m, offs_n, M, N, D, stride_x, stride_y, ACC, UPCAST, PRECISION, BLOCK_K
    )
    s = tl.where(_valid(offs_m, offs_n, M, N, offset, True), s * scale, _NEG_INF)
    tl.store(ROW_PART + pid_n * stride_rp + offs_m, _tile_lse_nat(s, 1, BASE2), mask=row_ok)
    tl.store(COL_PART + pid_m * stride_cp + offs_n, _tile_lse_nat(s, 0, BASE2), mask=col_ok)
    # weights e^{min(l + alpha, cap)} (NaN propagates so a NaN batch stays visible)
    er = _exp_capped(s + alpha_r[:, None], cap, BASE2)
    ec = _exp_capped(s + alpha_c[None, :], cap, BASE2)
    tl.store(ROW_TPART + pid_n * stride_rp + offs_m, tl.sum(er, axis=1), mask=row_ok)
    tl.store(COL_TPART + pid_m * stride_cp + offs_n, tl.sum(ec, axis=0), mask=col_ok)
    if GRAD:
        w = w_row * er + w_col * ec
        tl.store(
            W + offs_m[:, None] * stride_w + offs_n[None, :],
            w.to(W.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )


def _tile_config(dtype: torch.dtype) -> dict:
    """Config of _gamma_onepass_tile_kernel: simlse's large-D tile config, except 16-bit on GPU:
    128 x 64 tiles, 8 warps. The epilogue (4 exponentials, 4 partial vectors and W) of a
    128 x 128 tile needs more than 255 registers at 8 warps (sm_90 AOT: 252 registers + 12 B
    spilled; 16 warps cap at 128 registers and spill 84 B); 128 x 64 compiles to 140 registers,
    no spills, 72 KiB shared memory."""
    cfg = _simlse_tile_config(dtype)
    if not interpreter_on() and dtype in (torch.float16, torch.bfloat16):
        cfg = dict(cfg, BLOCK_N=64)
    return cfg


def _large_d_fwd(a, b, scale, alpha_row, alpha_col, w_row, w_col, clamp, offset, grad):
    """The large-D path of gamma_onepass_fwd (same outputs), chunked over rows of a: R from
    GAMMACL_TRITON_CHUNK_MIB over W [R, N] plus the four partial buffers."""
    m, n, d, acc, dev = _dims(a, b)
    cfg = _tile_config(a.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    isz = 8 if acc == torch.float64 else 4
    per_row = (n * a.element_size() if grad else 0) + 2 * isz * (
        triton.cdiv(n, bn) + triton.cdiv(n, bm)
    )
    chunks = RowChunks.fit(m, per_row, bm)
    r = chunks.size
    n_rt, n_ct = triton.cdiv(n, bn), triton.cdiv(r, bm)
    row_part = torch.empty((n_rt, r), dtype=acc, device=dev)
    row_tpart = torch.empty((n_rt, r), dtype=acc, device=dev)
    col_part = torch.empty((n_ct, n), dtype=acc, device=dev)
    col_tpart = torch.empty((n_ct, n), dtype=acc, device=dev)
    w = torch.empty((r if grad else 0, n), dtype=a.dtype, device=dev)
    row_lse = torch.empty(m, dtype=acc, device=dev)
    row_term = torch.empty(m, dtype=acc, device=dev)
    col_lse = torch.empty(n, dtype=acc, device=dev)
    col_term = torch.zeros(n, dtype=acc, device=dev)
    da = torch.empty(m if grad else 0, d, dtype=acc, device=dev)
    db = torch.zeros(n if grad else 0, d, dtype=acc, device=dev)
    weights = _weight_args(scale, alpha_row, alpha_col, w_row, w_col, clamp)
    for i0, rows, x, grid in chunks.tiled(a, n, bm, bn):
        _gamma_onepass_tile_kernel[grid](
            **_operands(x, b),
            **dict(weights, ALPHA_R=alpha_row[i0 : i0 + rows]),
            ROW_PART=row_part,
            ROW_TPART=row_tpart,
            COL_PART=col_part,
            COL_TPART=col_tpart,
            W=w if grad else row_part,
            stride_rp=row_part.stride(0),
            stride_cp=col_part.stride(0),
            stride_w=w.stride(0) if grad else 0,
            offset=int(offset) + i0,  # excluded (i0 + i, i0 + i + offset) in chunk coordinates
            GRAD=bool(grad),
            **cfg,
            enable_fp_fusion=False,  # the shift and the exponent from one rounded logit
        )
        used = triton.cdiv(rows, bm)
        merge_lse(row_part[:, :rows], row_lse[i0 : i0 + rows])
        torch.sum(row_tpart[:, :rows], dim=0, out=row_term[i0 : i0 + rows])
        col_term += col_tpart[:used].sum(dim=0)
        merge_lse(col_part[:used], col_lse, into=i0 > 0)
        if grad:
            chunk_gemms(w[:rows], b, x, da[i0 : i0 + rows], db, i0)
    return row_lse, col_lse, row_term, col_term, da, db


def gamma_onepass_fwd(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
    alpha_row: torch.Tensor, alpha_col: torch.Tensor, w_row: float, w_col: float, clamp: float,
    offset: int, grad: bool,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(row_lse, col_lse, row_term, col_term, da_raw, db_raw), see the module docstring.

    Default: one launch, column statistics and dB merged across row blocks by atomics (6MND;
    the fp32 atomic order makes col_term / col_lse / dB vary at rounding level run to run on
    GPU). Under torch.use_deterministic_algorithms: two launches without atomics, the second on
    the transposed problem, (b, a, alpha_col, alpha_row, w_col, w_row, -offset), whose row
    outputs are exactly the column outputs (l^T_ji = l_ij, W^T_ji = W_ij, so its dA = W^T @ a =
    db_raw); every sum then has a fixed order (bitwise reproducible) for 8MND FLOPs."""
    _check(a, b, scale, alpha_row, alpha_col)
    m, n, d, acc, dev = _dims(a, b)
    alpha_row, alpha_col = alpha_row.contiguous(), alpha_col.contiguous()
    if m == 0 or n == 0:
        row_lse = torch.full((m,), float("-inf"), dtype=acc, device=dev)
        col_lse = torch.full((n,), float("-inf"), dtype=acc, device=dev)
        da = torch.zeros(m if grad else 0, d, dtype=acc, device=dev)
        db = torch.zeros(n if grad else 0, d, dtype=acc, device=dev)
        return row_lse, col_lse, row_lse.new_zeros(m), col_lse.new_zeros(n), da, db
    if use_large_d(a.dtype, d) and a.dtype != torch.float16:
        with _device_guard(dev):
            return _large_d_fwd(
                a, b, scale, alpha_row, alpha_col, w_row, w_col, clamp, offset, grad
            )
    # atomic-free two-launch path: deterministic mode, or a column-partial buffer too large
    if use_deterministic_path() or not _col_part_fits(m, n, a.dtype):
        row_lse, row_term, da, *_ = _launch(
            a, b, scale, alpha_row, alpha_col, w_row, w_col, clamp, offset, grad, False
        )
        col_lse, col_term, db, *_ = _launch(
            b, a, scale, alpha_col, alpha_row, w_col, w_row, clamp, -offset, grad, False
        )
    else:
        row_lse, row_term, da, col_lse, col_term, db = _launch(
            a, b, scale, alpha_row, alpha_col, w_row, w_col, clamp, offset, grad, True
        )
    return row_lse, col_lse, row_term, col_term, da, db
