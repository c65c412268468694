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
    _tile_lse_nat,
    _tile_offsets,
    _valid,
    _vec_weights,
    chunk_gemms,
    merge_lse,
)
from gammacl.kernels.tiles import operands as _operands


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["offset"])
def _simlse_fwd_tile_kernel(
    X, Y, SCALE, COL_SCALE, ROW_PART, COL_PART,
    M, N, D, stride_x, stride_y, stride_rp, stride_cp, offset,
    EXCLUDE: tl.constexpr, COLS: tl.constexpr, IS_VEC: tl.constexpr,
    ACC: tl.constexpr, BASE2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """ROW_PART[pid_n, i] = LSE_{j in tile} l_ij; with COLS, COL_PART[pid_m, j] = LSE_{i in
    tile} l'_ij, for the program's [BLOCK_M, BLOCK_N] tile of l = l' = scale * X @ Y^T, or with
    IS_VEC l_ij = SCALE[i] S_ij and l'_ij = COL_SCALE[j] S_ij."""
    # the in-range masks formed after the K loop, so they are not live across it
    pid_m, pid_n, offs_m, offs_n, _, _ = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    s = _scores_chunked(
        X, Y, offs_m, offs_n, M, N, D, stride_x, stride_y, ACC, UPCAST, PRECISION, BLOCK_K
    )
    valid = _valid(offs_m, offs_n, M, N, offset, EXCLUDE)
    if IS_VEC:
        rs = tl.load(SCALE + offs_m, mask=offs_m < M, other=0.0).to(ACC)
        l_row = tl.where(valid, s * rs[:, None], _NEG_INF)
        if COLS:
            cs = tl.load(COL_SCALE + offs_n, mask=offs_n < N, other=0.0).to(ACC)
            l_col = tl.where(valid, s * cs[None, :], _NEG_INF)
    else:
        l_row = tl.where(valid, s * tl.load(SCALE).to(ACC), _NEG_INF)
        l_col = l_row
    tl.store(ROW_PART + pid_n * stride_rp + offs_m, _tile_lse_nat(l_row, 1, BASE2), mask=offs_m < M)
    if COLS:
        tl.store(
            COL_PART + pid_m * stride_cp + offs_n, _tile_lse_nat(l_col, 0, BASE2), mask=offs_n < N
        )


@triton.jit(do_not_specialize=["offset"])
def _simlse_bwd_w_kernel(
    X, Y, SCALE, SCALE_Y, LSE_X, LSE_Y, G_X, G_Y, G_INV, W, DS_PART, DS_COL_PART,
    M, N, D, stride_x, stride_y, stride_w, stride_dsc, offset,
    EXCLUDE: tl.constexpr, HAS_Y: tl.constexpr, G_NORM: tl.constexpr, IS_VEC: tl.constexpr,
    ACC: tl.constexpr, BASE2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """W[i, j] = G_X[i] exp(l_ij - LSE_X[i]) + [HAS_Y] G_Y[j] exp(l_ij - LSE_Y[j]) (times G_INV[i]
    with G_NORM), 0 on excluded entries, stored in W's dtype for one [BLOCK_M, BLOCK_N] tile;
    DS_PART[program] = sum over the tile of W_ij S_ij from the acc-typed W before G_INV and the
    rounding to W's dtype (d loss / d scale; <A, W16 B> would cancel).
    IS_VEC (SCALE [M] row scales, SCALE_Y [N] column scales; tiles._vec_weights): W carries the
    scales, DS_PART[pid_n, i] = sum_{j in tile} p_ij S_ij and DS_COL_PART[pid_m, j] =
    sum_{i in tile} p'_ij S_ij (the launcher sums the tiles and multiplies by g)."""
    pid_m, pid_n, offs_m, offs_n, row_ok, col_ok = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    raw = _scores_chunked(
        X, Y, offs_m, offs_n, M, N, D, stride_x, stride_y, ACC, UPCAST, PRECISION, BLOCK_K
    )
    lse_x = tl.load(LSE_X + offs_m, mask=row_ok, other=0.0)
    g_x = tl.load(G_X + offs_m, mask=row_ok, other=0.0)
    if IS_VEC:
        rs = tl.load(SCALE + offs_m, mask=row_ok, other=0.0).to(ACC)[:, None]
        w, ds_row, ds_col = _vec_weights(
            raw, rs, lse_x, g_x, SCALE_Y, LSE_Y, G_Y, offs_m, offs_n, M, N, offset,
            tl.zeros((BLOCK_M,), dtype=ACC), EXCLUDE, True, HAS_Y, True, ACC, BASE2, HAS_Y,
        )  # fmt: skip
        tl.store(DS_PART + pid_n * M + offs_m, ds_row, mask=row_ok)
        if HAS_Y:
            tl.store(DS_COL_PART + pid_m * stride_dsc + offs_n, ds_col, mask=col_ok)
    else:
        # exponents -inf on excluded / out-of-range entries (an all-excluded row's LSE is -inf:
        # l - LSE = +inf there, never -inf - -inf) and W = 0 there; every valid entry is formed
        # in IEEE arithmetic, g = 0 included, so NaN / inf logits or LSEs give NaN weights
        valid = _valid(offs_m, offs_n, M, N, offset, EXCLUDE)
        s = raw * tl.load(SCALE).to(ACC)
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
def tile_config(dtype: torch.dtype, vec: bool = False) -> dict:
    """Fixed config of the large-D tile kernels. 16-bit: 128 x 128
    output tiles, K loop of 64 over D, 3 stages = (128 + 128)*64*2 B*3 = 96 KiB shared memory
    (two CTAs per SM on H100: one's exp epilogue overlaps the other's wgmma main loop), 8
    warps. fp32 (ieee): 64 x 64 x 32. Interpreter: 32 x 32 x 64 (several tiles and K trips)."""
    if interpreter_on():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1)
    if dtype in (torch.float16, torch.bfloat16):
        # vec (the vector-scale W kernel: two P tiles and two scale gradients live): 128 x 64,
        # 128 x 128 spills 104-144 B (python -m gammacl.aot)
        bn = 64 if vec else 128
        return dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)


def w_tile_config(dtype: torch.dtype, vec: bool = False) -> dict:
    """Config of _simlse_bwd_w_kernel. 16-bit: 64 x 128 x 64, 4 warps, 3 stages = 72 KiB shared
    memory. The CLIP variant (HAS_Y=1) holds S, the two softmax terms and W per element: 255
    registers at tile_config's 128 x 128 / 8 warps (1 CTA per SM, its exp epilogue and pipeline
    fill exposed); at 64 x 128 / 4 warps 167 registers (180 with EXCLUDE) -> 3 CTAs per SM
    (2 with EXCLUDE), HAS_Y=0 127 -> 3 (sm_90, triton 3.6.0, `python -m gammacl.aot`). Other
    dtypes and the interpreter: tile_config. The vector-scale variant (IS_VEC) takes the same
    16-bit tile: 0 spills, async wgmma, 2-3 CTAs per SM on triton 3.6.0 and 3.9.0 (at
    tile_config's 128 x 64 / 8 warps: 1 CTA per SM)."""
    if dtype in (torch.float16, torch.bfloat16) and not interpreter_on():
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    return tile_config(dtype, vec)


def large_d_fwd(a, b, scale, offset, exclude_pos, cols, row, col, col_scale=None) -> None:
    """Row chunks of R rows: one tile-kernel launch per chunk, row partials [ceil(N/BN), R]
    merged into row[i0:i0+R], column partials [ceil(R/BM), N] merged and logaddexp'd into col.
    R from GAMMACL_TRITON_CHUNK_MIB over the two partial buffers (R*N*4*(1/BN + 1/BM) bytes).
    A [M] scale: row scales (col_scale [N] the column scales when cols)."""
    vec = scale.dim() == 1
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
    for i0, rows, x, grid in chunks.tiled(a, n, bm, bn):
        _simlse_fwd_tile_kernel[grid](
            **_operands(x, b),
            SCALE=scale[i0 : i0 + rows] if vec else scale,
            COL_SCALE=col_scale if col_scale is not None else scale,
            ROW_PART=row_part,
            COL_PART=col_part if cols else row_part,
            stride_rp=row_part.stride(0),
            stride_cp=col_part.stride(0) if cols else 0,
            offset=offset + i0,  # excluded (i0 + i, i0 + i + offset) in chunk coordinates
            EXCLUDE=exclude_pos,
            COLS=cols,
            IS_VEC=vec,
            **cfg,
            enable_fp_fusion=False,  # the shift and the exponent from one rounded logit
        )
        merge_lse(row_part[:, :rows], row[i0 : i0 + rows])
        if cols:
            merge_lse(col_part[: triton.cdiv(rows, bm)], col, into=i0 > 0)


def large_d_bwd(a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols, sigma,
                 da, db, ds, col_scale=None) -> None:  # fmt: skip
    """Per chunk of R rows: W [R, N] (operand dtype) by _simlse_bwd_w_kernel, then
    da[chunk] = W @ b and db (+)= W^T @ a[chunk] (db None: skipped), ds (0-d) += sum_ij W_ij S_ij
    from the kernel's per-tile partials. R from GAMMACL_TRITON_CHUNK_MIB over W.
    fp16 (sigma [M], powers of two, simlse.fp16_row_scale): W' = diag(sigma) W, so
    da = diag(1 / sigma) (W' @ b) exactly per row, and db = W^T a = (1 / sigma_min) W'^T (a_s)
    with a_s_i = a_i * sigma_min / sigma_i (a factor <= 1, rounded to fp16: an [R, D] copy).
    A [M] scale (vector mode, col_scale [N] when cols): ds [M + N or M] gets cat(drs, dcs)
    from the kernel's per-tile row / column partials ([ceil(N/BN), R] and [ceil(R/BM), N])."""
    m, d = a.shape
    n = b.shape[0]
    vec = scale.dim() == 1
    cfg = w_tile_config(a.dtype, vec)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    chunks = RowChunks.fit(m, n * a.element_size(), bm)
    r = chunks.size
    w = torch.empty((r, n), dtype=a.dtype, device=a.device)
    n_part = triton.cdiv(r, bm) * triton.cdiv(n, bn)
    ds_part = torch.empty(
        triton.cdiv(n, bn) * r if vec else n_part, dtype=ds.dtype, device=a.device
    )
    dsc_part = torch.empty(
        (triton.cdiv(r, bm), n) if vec and cols else (0, 0), dtype=ds.dtype, device=a.device
    )
    if vec and cols:
        ds[m:].zero_()
    sigma_min = sigma.amin() if sigma is not None else None
    for i0, rows, x, grid in chunks.tiled(a, n, bm, bn):
        _simlse_bwd_w_kernel[grid](
            **_operands(x, b),
            SCALE=scale[i0 : i0 + rows] if vec else scale,
            SCALE_Y=col_scale if col_scale is not None else scale,
            LSE_X=row_lse[i0 : i0 + rows],
            LSE_Y=col_lse if cols else row_lse,
            G_X=g_row[i0 : i0 + rows],
            G_Y=g_col if cols else g_row,
            G_INV=sigma[i0 : i0 + rows] if sigma is not None else scale,
            W=w,
            DS_PART=ds_part,
            DS_COL_PART=dsc_part,
            stride_w=w.stride(0),
            stride_dsc=dsc_part.stride(0),
            offset=offset + i0,
            EXCLUDE=exclude_pos,
            HAS_Y=cols,
            G_NORM=sigma is not None,
            IS_VEC=vec,
            **cfg,
            enable_fp_fusion=False,  # exponent from the rounded logit (tiles._exp_nat)
        )
        if vec:  # drs_i = g_r_i sum_j p_ij S_ij; dcs accumulates sum_i p'_ij S_ij
            ds_rows = ds_part[: triton.cdiv(n, bn) * rows].view(-1, rows).sum(0)
            ds[i0 : i0 + rows] = g_row[i0 : i0 + rows] * ds_rows
            if cols:
                ds[m:] += dsc_part[: triton.cdiv(rows, bm)].sum(0)
        else:
            ds += ds_part[: grid[0]].sum()
        if sigma is not None:  # W' = diag(sigma) W: A's rows pre-scaled, dA's rows unscaled
            sc = sigma[i0 : i0 + rows]
            if db is not None:
                x = (x.float() * (sigma_min / sc)[:, None]).to(x.dtype)
        chunk_gemms(w[:rows], b, x, da[i0 : i0 + rows], db, i0)
        if sigma is not None:
            da[i0 : i0 + rows].div_(sc[:, None])
    if vec and cols:
        ds[m:] *= g_col
    if sigma is not None and db is not None:
        db.div_(sigma_min)
