"""Triton backend of the simlse op, large-D path (GEMM-tiled): D > 128 for 16-bit inputs,
D > 64 for fp32 (tiles.use_large_d). kernels/simlse.py routes here; the maths, the numerics and
the contract (row / column LSE forward, (da_raw, db_raw, dscale_raw) backward) are its.

A fused row block cannot hold a 1024-wide operand or output in registers, so for large D the
work is split into GEMM-shaped kernels, each at a GEMM's FLOP/byte:
  forward  `_simlse_fwd_tile_kernel`: one [BM, BN] tile of S per program, the full-D K loop
           pipelined (num_stages), the row partial LSE of the tile (over its BN columns) and the
           column partial LSE (over its BM rows) in the epilogue, stored to
           ROW_PART[pid_n, i] and COL_PART[pid_m, j]; `_simlse_col_merge_kernel` then
           LSE-merges both buffers (row partials give the row LSE, column partials the column
           LSE, merged across row chunks by logaddexp).  2*BM*BN*D FLOPs per tile; L2 bytes
           (BM + BN)*D*size; partial stores (BM + BN)*4.
  backward per chunk of R rows: `_simlse_bwd_w_kernel` recomputes one S tile per program and
           writes W = g_r*P_row + g_c*P_col (0 on excluded entries) in the operand dtype to a
           [R, N] buffer; then dA_c = W @ B and dB += W^T @ A_c (tiles._gemm_kernel, fp32
           output, dB accumulated in the GEMM epilogue).  2RND + 4RND FLOPs per chunk; W is
           written once and read twice (3*R*N*size bytes).
fp16: W scaled by 1/gmax (power of two, on the device) as in the fused backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gammacl.dispatch import interpreter_on
from gammacl.kernels.tiles import (
    _NEG_INF,
    _exp_nat,
    _scores_chunked,
    _tile_ids,
    _tile_lse_nat,
    _valid,
    chunk_rows,
    gemm,
    merge_lse,
)
from gammacl.kernels.tiles import flags as _flags


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["offset"])
def _simlse_fwd_tile_kernel(
    X,
    Y,
    SCALE,
    ROW_PART,
    COL_PART,
    M,
    N,
    D,
    stride_x,
    stride_y,
    stride_rp,
    stride_cp,
    offset,
    EXCLUDE: tl.constexpr,
    COLS: tl.constexpr,
    ACC: tl.constexpr,
    BASE2: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """ROW_PART[pid_n, i] = LSE_{j in tile} l_ij; with COLS, COL_PART[pid_m, j] = LSE_{i in
    tile} l_ij, for the program's [BLOCK_M, BLOCK_N] tile of l = scale * X @ Y^T."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    scale = tl.load(SCALE).to(ACC)
    s = _scores_chunked(
        X, Y, offs_m, offs_n, M, N, D, stride_x, stride_y, ACC, UPCAST, PRECISION,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    s = tl.where(_valid(offs_m, offs_n, M, N, offset, EXCLUDE), s * scale, _NEG_INF)
    tl.store(ROW_PART + pid_n * stride_rp + offs_m, _tile_lse_nat(s, 1, BASE2), mask=offs_m < M)
    if COLS:
        tl.store(COL_PART + pid_m * stride_cp + offs_n, _tile_lse_nat(s, 0, BASE2), mask=offs_n < N)


@triton.jit(do_not_specialize=["offset"])
def _simlse_bwd_w_kernel(
    X,
    Y,
    SCALE,
    LSE_X,
    LSE_Y,
    G_X,
    G_Y,
    G_INV,
    W,
    DS_PART,
    M,
    N,
    D,
    stride_x,
    stride_y,
    stride_w,
    offset,
    EXCLUDE: tl.constexpr,
    HAS_Y: tl.constexpr,
    G_NORM: tl.constexpr,
    ACC: tl.constexpr,
    BASE2: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """W[i, j] = G_X[i] exp(l_ij - LSE_X[i]) + [HAS_Y] G_Y[j] exp(l_ij - LSE_Y[j]) (times G_INV
    with G_NORM), 0 on excluded entries, stored in W's dtype for one [BLOCK_M, BLOCK_N] tile;
    DS_PART[program] = sum over the tile of W_ij S_ij from the acc-typed W before G_INV and the
    rounding to W's dtype (d loss / d scale; <A, W16 B> would cancel)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    col_ok = offs_n < N
    scale = tl.load(SCALE).to(ACC)
    raw = _scores_chunked(
        X, Y, offs_m, offs_n, M, N, D, stride_x, stride_y, ACC, UPCAST, PRECISION,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    # -inf on excluded / out-of-range entries makes their softmax weights exactly 0
    valid = _valid(offs_m, offs_n, M, N, offset, EXCLUDE)
    s = tl.where(valid, raw * scale, _NEG_INF)
    lse_x = tl.load(LSE_X + offs_m, mask=row_ok, other=0.0)
    lse_x = tl.where(lse_x == _NEG_INF, 0.0, lse_x)  # all-excluded row: all W_ij masked
    g_x = tl.load(G_X + offs_m, mask=row_ok, other=0.0)
    w = g_x[:, None] * _exp_nat(s - lse_x[:, None], BASE2)
    if HAS_Y:
        lse_y = tl.load(LSE_Y + offs_n, mask=col_ok, other=0.0)
        lse_y = tl.where(lse_y == _NEG_INF, 0.0, lse_y)
        g_y = tl.load(G_Y + offs_n, mask=col_ok, other=0.0)
        w += g_y[None, :] * _exp_nat(s - lse_y[None, :], BASE2)
    tl.store(DS_PART + tl.program_id(0), tl.sum(tl.sum(tl.where(valid, w * raw, 0.0), 1), 0))
    if G_NORM:
        w = w * tl.load(G_INV).to(ACC)
    tl.store(
        W + offs_m[:, None] * stride_w + offs_n[None, :],
        w.to(W.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def tile_config(dtype: torch.dtype) -> dict:
    """Fixed config of the large-D tile kernels (GPU choices not measured). 16-bit: 128 x 128
    output tiles, K loop of 64 over D, 3 stages = (128 + 128)*64*2 B*3 = 96 KiB shared memory
    (two CTAs per SM on H100: one's exp epilogue overlaps the other's wgmma main loop), 8
    warps. fp32 (ieee): 64 x 64 x 32. Interpreter: 32 x 32 x 64 (several tiles and K trips)."""
    if interpreter_on():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1)
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)


def large_d_fwd(a, b, scale, offset, exclude_pos, cols, row, col) -> None:
    """Row chunks of R rows: one tile-kernel launch per chunk, row partials [ceil(N/BN), R]
    merged into row[i0:i0+R], column partials [ceil(R/BM), N] merged and logaddexp'd into col.
    R from GAMMACL_TRITON_CHUNK_MIB over the two partial buffers (R*N*4*(1/BN + 1/BM) bytes)."""
    m, d = a.shape
    n = b.shape[0]
    cfg = tile_config(a.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    acc = row.dtype
    isz = row.element_size()
    per_row = isz * (triton.cdiv(n, bn) + (triton.cdiv(n, bm) if cols else 0))
    r = chunk_rows(m, per_row, bm)
    row_part = torch.empty((triton.cdiv(n, bn), r), dtype=acc, device=a.device)
    col_part = torch.empty((triton.cdiv(r, bm), n) if cols else (0, 0), dtype=acc, device=a.device)
    col_c = torch.empty(n if cols else 0, dtype=acc, device=a.device)
    for i0 in range(0, m, r):
        rows = min(r, m - i0)
        x = a[i0 : i0 + rows]
        grid = (triton.cdiv(rows, bm) * triton.cdiv(n, bn),)
        _simlse_fwd_tile_kernel[grid](
            X=x,
            Y=b,
            SCALE=scale,
            ROW_PART=row_part,
            COL_PART=col_part if cols else row_part,
            M=rows,
            N=n,
            D=d,
            stride_x=a.stride(0),
            stride_y=b.stride(0),
            stride_rp=row_part.stride(0),
            stride_cp=col_part.stride(0) if cols else 0,
            offset=offset + i0,  # excluded (i0 + i, i0 + i + offset) in chunk coordinates
            EXCLUDE=exclude_pos,
            COLS=cols,
            **_flags(a.dtype),
            **cfg,
            enable_fp_fusion=False,  # the shift and the exponent from one rounded logit
        )
        merge_lse(row_part[:, :rows], row[i0 : i0 + rows])
        if cols:
            tiles_used = triton.cdiv(rows, bm)
            if i0 == 0:
                merge_lse(col_part[:tiles_used], col)
            else:
                merge_lse(col_part[:tiles_used], col_c)
                torch.logaddexp(col, col_c, out=col)


def large_d_bwd(a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols, g_inv,
                 da, db, ds) -> None:  # fmt: skip
    """Per chunk of R rows: W [R, N] (operand dtype) by _simlse_bwd_w_kernel, then
    da[chunk] = W @ b and db (+)= W^T @ a[chunk], ds (0-d) += sum_ij W_ij S_ij from the
    kernel's per-tile partials. R from GAMMACL_TRITON_CHUNK_MIB over W."""
    m, d = a.shape
    n = b.shape[0]
    cfg = tile_config(a.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    r = chunk_rows(m, n * a.element_size(), bm)
    w = torch.empty((r, n), dtype=a.dtype, device=a.device)
    ds_part = torch.empty(triton.cdiv(r, bm) * triton.cdiv(n, bn), dtype=ds.dtype, device=a.device)
    for i0 in range(0, m, r):
        rows = min(r, m - i0)
        x = a[i0 : i0 + rows]
        grid = (triton.cdiv(rows, bm) * triton.cdiv(n, bn),)
        _simlse_bwd_w_kernel[grid](
            X=x,
            Y=b,
            SCALE=scale,
            LSE_X=row_lse[i0 : i0 + rows],
            LSE_Y=col_lse if cols else row_lse,
            G_X=g_row[i0 : i0 + rows],
            G_Y=g_col if cols else g_row,
            G_INV=g_inv if g_inv is not None else scale,
            W=w,
            DS_PART=ds_part,
            M=rows,
            N=n,
            D=d,
            stride_x=a.stride(0),
            stride_y=b.stride(0),
            stride_w=w.stride(0),
            offset=offset + i0,
            EXCLUDE=exclude_pos,
            HAS_Y=cols,
            G_NORM=g_inv is not None,
            **_flags(a.dtype),
            **cfg,
            enable_fp_fusion=False,  # exponent from the rounded logit (tiles._exp_nat)
        )
        ds += ds_part[: grid[0]].sum()
        wc = w[:rows]
        gemm(wc, b, da[i0 : i0 + rows], accumulate=False)  # dA_c = W @ B
        gemm(wc.t(), x, db, accumulate=i0 > 0)  # dB (+)= W^T @ A_c
