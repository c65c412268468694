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
fp16: W rows scaled by powers of two sigma_i (simlse.fp16_row_scale), as in the fused backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gammacl.dispatch import interpreter_on
from gammacl.kernels.tiles import (
    _NEG_INF,
    RowChunks,
    _exp_nat,
    _scores_chunked,
    _tile_ids,
    _tile_lse_nat,
    _valid,
    chunk_gemms,
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
    """W[i, j] = G_X[i] exp(l_ij - LSE_X[i]) + [HAS_Y] G_Y[j] exp(l_ij - LSE_Y[j]) (times G_INV[i]
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
    # exponents -inf on excluded / out-of-range entries (an all-excluded row's LSE is -inf:
    # l - LSE = +inf there, never -inf - -inf) and W = 0 there; every valid entry is formed in
    # IEEE arithmetic, g = 0 included, so NaN / inf logits or LSEs give NaN weights (as torch's)
    valid = _valid(offs_m, offs_n, M, N, offset, EXCLUDE)
    s = raw * scale
    lse_x = tl.load(LSE_X + offs_m, mask=row_ok, other=0.0)
    g_x = tl.load(G_X + offs_m, mask=row_ok, other=0.0)
    w = g_x[:, None] * _exp_nat(tl.where(valid, s - lse_x[:, None], _NEG_INF), BASE2)
    if HAS_Y:
        lse_y = tl.load(LSE_Y + offs_n, mask=col_ok, other=0.0)
        g_y = tl.load(G_Y + offs_n, mask=col_ok, other=0.0)
        w += g_y[None, :] * _exp_nat(tl.where(valid, s - lse_y[None, :], _NEG_INF), BASE2)
    w = tl.where(valid, w, 0.0)
    tl.store(DS_PART + tl.program_id(0), tl.sum(tl.sum(w * raw, 1), 0))
    if G_NORM:
        w = w * tl.load(G_INV + offs_m, mask=row_ok, other=1.0).to(ACC)[:, None]
    tl.store(
        W + offs_m[:, None] * stride_w + offs_n[None, :],
        w.to(W.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def tile_config(dtype: torch.dtype) -> dict:
    """Fixed config of the large-D tile kernels. 16-bit: 128 x 128
    output tiles, K loop of 64 over D, 3 stages = (128 + 128)*64*2 B*3 = 96 KiB shared memory
    (two CTAs per SM on H100: one's exp epilogue overlaps the other's wgmma main loop), 8
    warps. fp32 (ieee): 64 x 64 x 32. Interpreter: 32 x 32 x 64 (several tiles and K trips)."""
    if interpreter_on():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1)
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)


def w_tile_config(dtype: torch.dtype) -> dict:
    """Config of _simlse_bwd_w_kernel. 16-bit: 64 x 128 x 64, 4 warps, 3 stages = 72 KiB shared
    memory. The CLIP variant (HAS_Y=1) holds S, the two softmax terms and W per element: 255
    registers at tile_config's 128 x 128 / 8 warps (1 CTA per SM, its exp epilogue and pipeline
    fill exposed); at 64 x 128 / 4 warps 167 registers (180 with EXCLUDE) -> 3 CTAs per SM
    (2 with EXCLUDE), HAS_Y=0 127 -> 3 (sm_90, triton 3.6.0, `python -m gammacl.aot`). Other
    dtypes and the interpreter: tile_config."""
    if dtype in (torch.float16, torch.bfloat16) and not interpreter_on():
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    return tile_config(dtype)


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
    chunks = RowChunks.fit(m, per_row, bm)
    r = chunks.size
    row_part = torch.empty((triton.cdiv(n, bn), r), dtype=acc, device=a.device)
    col_part = torch.empty((triton.cdiv(r, bm), n) if cols else (0, 0), dtype=acc, device=a.device)
    for i0, rows in chunks:
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
            merge_lse(col_part[: triton.cdiv(rows, bm)], col, into=i0 > 0)


def large_d_bwd(a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols, sigma,
                 da, db, ds) -> None:  # fmt: skip
    """Per chunk of R rows: W [R, N] (operand dtype) by _simlse_bwd_w_kernel, then
    da[chunk] = W @ b and db (+)= W^T @ a[chunk], ds (0-d) += sum_ij W_ij S_ij from the
    kernel's per-tile partials. R from GAMMACL_TRITON_CHUNK_MIB over W.
    fp16 (sigma [M], powers of two, simlse.fp16_row_scale): W' = diag(sigma) W, so
    da = diag(1 / sigma) (W' @ b) exactly per row, and db = W^T a = (1 / sigma_min) W'^T (a_s)
    with a_s_i = a_i * sigma_min / sigma_i (a factor <= 1, rounded to fp16: an [R, D] copy)."""
    m, d = a.shape
    n = b.shape[0]
    cfg = w_tile_config(a.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    chunks = RowChunks.fit(m, n * a.element_size(), bm)
    r = chunks.size
    w = torch.empty((r, n), dtype=a.dtype, device=a.device)
    ds_part = torch.empty(triton.cdiv(r, bm) * triton.cdiv(n, bn), dtype=ds.dtype, device=a.device)
    sigma_min = sigma.amin() if sigma is not None else None
    for i0, rows in chunks:
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
            G_INV=sigma[i0 : i0 + rows] if sigma is not None else scale,
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
            G_NORM=sigma is not None,
            **_flags(a.dtype),
            **cfg,
            enable_fp_fusion=False,  # exponent from the rounded logit (tiles._exp_nat)
        )
        ds += ds_part[: grid[0]].sum()
        if sigma is not None:  # W' = diag(sigma) W: A's rows pre-scaled, dA's rows unscaled
            sc = sigma[i0 : i0 + rows]
            x = (x.float() * (sigma_min / sc)[:, None]).to(x.dtype)
        chunk_gemms(w[:rows], b, x, da[i0 : i0 + rows], db, i0)
        if sigma is not None:
            da[i0 : i0 + rows].div_(sc[:, None])
    if sigma is not None:
        db.div_(sigma_min)
