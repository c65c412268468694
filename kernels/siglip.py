"""Triton backend of the siglip op: the pairwise sigmoid (SigLIP) loss and its gradient in one
sweep (contract and maths: gammacl.ops.siglip).

Per entry (l = scale * S + bias, z = +1 on the positive (i, i + offset), y = -z l):
    e = e^{-|y|}            (one exp2; fp32 with log2(e) folded in, fp64 uses exp / log)
    softplus(y) = max(y, 0) + log1p(e)       log1p(e) = e log(u) / (u - 1), u = 1 + e
                                             (Goldberg: exact to rounding where log(u) is not)
    W = -z sigmoid(y),  sigmoid(y) = (y >= 0 ? 1 : e) / (1 + e)              |W| <= 1
row_loss_i = sum_j softplus(y_ij), row_wsum_i = sum_j W_ij, row_wdot_i = sum_j W_ij S_ij (from
the accumulation-dtype W, before any 16-bit rounding), da_raw = W @ b, db_raw = W^T @ a.

Two structures, chosen by D (_use_chunked: D > 128 for 16-bit inputs, D > 64 for fp32 / fp64):

1. Small D, flash-style one pass (`_siglip_onepass_kernel`, mirrors kernels/gamma_onepass.py):
   program p owns rows [p*BM, (p+1)*BM) and streams every column tile:
       S = a_blk @ b_tile^T (K loop over D)                          2*BM*BN*D FLOPs
       loss / wsum / wdot rows in registers; W in the operand dtype
       dA[rows] += W @ b_tile   (rows owned by p: read-modify-write, no atomics)
       dB[cols] += W^T @ a_blk  (atomic add: every row block adds)     4*BM*BN*D FLOPs
   6MND FLOPs; bytes: a, b re-read from L2 per tile, dA RMW 8*BM*D and dB atomics 4*BN*D per
   tile (fp32), O(M) statistics, never an M x N buffer. Under torch.use_deterministic_algorithms
   the kernel runs twice without atomics (COLS=False): on (a, b) for the rows and dA, and on the
   transposed problem (b, a, -offset) -- l^T_ji = l_ij and the positive (j, j - offset) is the
   same entry, so W^T_ji = W_ij and its dA is db_raw -- 8MND FLOPs, bitwise reproducible.

2. Large D, chunked (the large-D structure): per chunk of R rows (tiles.RowChunks: R from
   GAMMACL_TRITON_CHUNK_MIB),
       `_siglip_weights_kernel`, grid (R/BM, N/BN): one GEMM tile of S per program (K loop over
       D), W stored in the operand dtype to an [R, N] buffer, the tile's loss / wsum / wdot row
       sums to [R, N/BN] partials (summed afterwards in a fixed order: no atomics)  2RND FLOPs
       the shared GEMM (tiles.gemm) twice: da_c = W @ b and db (+)= W^T @ a_c, fp32 (fp64)
       outputs accumulated in registers, transposes by strides                    4RND FLOPs
   6MND FLOPs in all. Bytes beyond the inputs: W written once (2 B per entry for 16-bit
   inputs) and read by the two GEMMs as ordinary operand streams (compute-bound: K = N for dA,
   K = R for dB), and dB (fp32, N x D) read-modify-written once per chunk. Deterministic (no
   atomics).

fp16 operands: W is stored as W * 2^14 (exact power of two; |W| <= 1 so it stays <= 16384, and
the negatives' sigmoid(l) ~ 4.5e-5 at bias -10, subnormal in fp16, becomes a normal number);
the launchers multiply the fp32 GEMM results by 2^-14 (exact). bf16 / fp32 / fp64 hold W
unscaled. Under the interpreter (a test harness) bf16 tiles are upcast before tl.dot.
Config: one fixed config per dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gammacl.dispatch import interpreter_on
from gammacl.kernels.simlse_checks import check_operands as _check_operands
from gammacl.kernels.tiles import (
    RowChunks,
    _exp_nat,
    _grad_rows,
    _log_nat,
    _scores_chunked,
    chunk_gemms,
)
from gammacl.kernels.tiles import acc_dtype as _acc_dtype
from gammacl.kernels.tiles import device_guard as _device_guard
from gammacl.kernels.tiles import dims as _dims
from gammacl.kernels.tiles import operands as _operands

FP16_W_SCALE = 2.0**14  # W * 2^14 in fp16 (module docstring)
# one-pass (flash-style) kernel up to this D, the chunked GEMM structure above it
_ONEPASS_MAX_D = {torch.float16: 128, torch.bfloat16: 128, torch.float32: 64, torch.float64: 64}


@triton.jit
def _siglip_terms(s, scale, bias, offs_m, offs_n, M, N, offset, BASE2: tl.constexpr):
    """(softplus(y), W) of a tile of raw dots s, both 0 outside [M, N] (module docstring)."""
    valid = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    pos = offs_n[None, :] == offs_m[:, None] + offset
    l = s * scale + bias
    y = tl.where(pos, -l, l)
    ay = tl.abs(y)
    e = _exp_nat(-ay, BASE2)
    u = 1.0 + e
    lg = _log_nat(u, BASE2)
    lp = tl.where(u == 1.0, e, e * lg / tl.where(u == 1.0, 1.0, u - 1.0))
    sp = tl.where(valid, tl.maximum(y, 0.0) + lp, 0.0)
    sig = tl.where(y >= 0, 1.0, e) / u
    w = tl.where(valid, tl.where(pos, -sig, sig), 0.0)
    return sp, w


@triton.jit(do_not_specialize=["offset"])
def _siglip_onepass_kernel(
    X, Y, SCALE, BIAS, ROW_LOSS, ROW_WSUM, ROW_WDOT, DA, DB,
    M, N, D, stride_x, stride_y, stride_da, stride_db, offset, w_scale,
    GRAD: tl.constexpr, COLS: tl.constexpr,
    ACC: tl.constexpr, BASE2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows [pid*BLOCK_M, ...) of X against every row of Y: ROW_LOSS, ROW_WSUM, ROW_WDOT stored;
    with GRAD the DA rows written (w_scale * W @ Y) and, with COLS, DB accumulated atomically
    (w_scale * W^T @ X). w_scale: 2^14 for fp16 operands, else 1."""
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets reach M*D > 2^31
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    scale = tl.load(SCALE).to(ACC)
    bias = tl.load(BIAS).to(ACC)
    loss_i = tl.zeros((BLOCK_M,), dtype=ACC)
    wsum_i = tl.zeros((BLOCK_M,), dtype=ACC)
    wdot_i = tl.zeros((BLOCK_M,), dtype=ACC)
    for j0 in range(0, N, BLOCK_N):
        offs_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        s = _scores_chunked(
            X, Y, offs_m, offs_n, M, N, D, stride_x, stride_y, ACC, UPCAST, PRECISION, BLOCK_D
        )
        sp, w = _siglip_terms(s, scale, bias, offs_m, offs_n, M, N, offset, BASE2)
        loss_i += tl.sum(sp, axis=1)
        wsum_i += tl.sum(w, axis=1)
        if GRAD:
            wdot_i += tl.sum(w * s, axis=1)
            w = (w * w_scale).to(Y.dtype.element_ty)  # operand dtype, fp32 accumulation
            if UPCAST:
                w = w.to(tl.float32)
            _grad_rows(
                w, 1.0, X, Y, DA, DB, offs_m, offs_n, j0, M, N, D, stride_x, stride_y,
                stride_da, stride_db, COLS, False, ACC, UPCAST, PRECISION, BLOCK_D,
            )  # fmt: skip
    tl.store(ROW_LOSS + offs_m, loss_i, mask=row_ok)
    tl.store(ROW_WSUM + offs_m, wsum_i, mask=row_ok)
    if GRAD:
        tl.store(ROW_WDOT + offs_m, wdot_i, mask=row_ok)


@triton.jit(do_not_specialize=["offset", "row0"])
def _siglip_weights_kernel(
    X, Y, SCALE, BIAS, W, PART_LOSS, PART_WSUM, PART_WDOT,
    M, N, D, row0, stride_x, stride_y, stride_w, stride_part, offset, w_scale,
    GRAD: tl.constexpr,
    ACC: tl.constexpr, BASE2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of the chunk's S (X: the chunk's R rows, global row
    row0 + r): W * w_scale stored in the operand dtype (with GRAD), the tile's loss / wsum / wdot
    row sums to PART_*[r, pid_n]."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    scale = tl.load(SCALE).to(ACC)
    bias = tl.load(BIAS).to(ACC)
    s = _scores_chunked(
        X, Y, offs_m, offs_n, M, N, D, stride_x, stride_y, ACC, UPCAST, PRECISION, BLOCK_D
    )
    # positives at global (row0 + r, row0 + r + offset): local offset row0 + offset
    sp, w = _siglip_terms(s, scale, bias, offs_m, offs_n, M, N, row0 + offset, BASE2)
    row_ok = offs_m < M
    tl.store(PART_LOSS + offs_m * stride_part + pid_n, tl.sum(sp, axis=1), mask=row_ok)
    tl.store(PART_WSUM + offs_m * stride_part + pid_n, tl.sum(w, axis=1), mask=row_ok)
    if GRAD:
        tl.store(PART_WDOT + offs_m * stride_part + pid_n, tl.sum(w * s, axis=1), mask=row_ok)
        mask = row_ok[:, None] & (offs_n[None, :] < N)
        w_ptr = W + offs_m[:, None] * stride_w + offs_n[None, :]
        tl.store(w_ptr, (w * w_scale).to(W.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _use_chunked(dtype: torch.dtype, d: int) -> bool:
    return d > _ONEPASS_MAX_D[dtype]


def _onepass_config(dtype: torch.dtype, d: int) -> dict:
    """BLOCK_* >= 16 (tl.dot K >= 16 on H100)."""
    p2 = max(16, triton.next_power_of_2(max(d, 1)))
    if interpreter_on():  # few programs x loop trips, still several of each
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=min(p2, 32), num_warps=4, num_stages=1)
    # 8 warps halve each thread's share of the S / W tiles and of dA (GRAD): 4 warps spilled
    # 116-208 B (16-bit) and up to 2.8 KB (fp32) per thread in the AOT table (sm_90)
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=min(p2, 128), num_warps=8, num_stages=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=min(p2, 16), num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=16, num_warps=4, num_stages=1)


def _tile_config(dtype: torch.dtype) -> dict:
    """Tiles of the chunked path's weights and GEMM kernels (BLOCK_D is the weights kernel's K
    chunk, BLOCK_K the GEMM's)."""
    if interpreter_on():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)


def _w_scale(dtype: torch.dtype) -> float:
    return FP16_W_SCALE if dtype == torch.float16 else 1.0


def _check(a, b, scale, bias) -> None:
    acc = _check_operands("siglip", a, b)
    for name, v in (("scale", scale), ("bias", bias)):
        if v.ndim != 0 or v.dtype != acc or v.device != a.device:
            raise ValueError(
                f"siglip (triton): {name} must be a 0-d {acc} tensor on {a.device}, got shape "
                f"{tuple(v.shape)} {v.dtype} on {v.device}"
            )


def use_deterministic_path() -> bool:
    """Whether the one-pass launch avoids atomics (two launches): exactly when
    torch.use_deterministic_algorithms is on (the chunked path has no atomics at all)."""
    return torch.are_deterministic_algorithms_enabled()


def _launch_onepass(a, b, scale, bias, offset: int, grad: bool, cols: bool):
    """One launch over the rows of a: (row_loss, row_wsum, row_wdot, da_raw, db_raw or None)."""
    m, n, d, acc, dev = _dims(a, b)
    cfg = _onepass_config(a.dtype, d)
    stats = torch.empty(3 if grad else 2, m, dtype=acc, device=dev)  # loss, wsum[, wdot] rows
    da = torch.zeros(m if grad else 0, d, dtype=acc, device=dev)
    db = torch.zeros(n if grad and cols else 0, d, dtype=acc, device=dev)
    ws = _w_scale(a.dtype)
    with _device_guard(dev):
        _siglip_onepass_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            **_operands(a, b),
            SCALE=scale,
            BIAS=bias,
            ROW_LOSS=stats[0],
            ROW_WSUM=stats[1],
            ROW_WDOT=stats[-1],
            DA=da if grad else stats,
            DB=db if grad and cols else stats,
            stride_da=da.stride(0) if grad else 0,
            stride_db=db.stride(0) if grad and cols else 0,
            offset=int(offset),
            w_scale=ws,
            GRAD=bool(grad),
            COLS=bool(cols),
            **cfg,
        )
    if grad and ws != 1.0:  # undo the fp16 weight scaling (exact power of two)
        da.mul_(1.0 / ws)
        db.mul_(1.0 / ws)
    rows = stats.unbind(0) if grad else (*stats.unbind(0), stats.new_empty(0))
    return (*rows, da, db if cols else None)


def _chunks(m: int, n: int, dtype: torch.dtype, size: int | None = None) -> RowChunks:
    """Row chunks of the chunked path: the [R, N] W buffer (operand dtype) + 3 [R, N/BN] partials
    under the one Triton budget (tiles.RowChunks.fit); `size` fixes R (aot_launches)."""
    cfg = _tile_config(dtype)
    if size is not None:
        return RowChunks(m, size)
    per_row = n * dtype.itemsize + 3 * triton.cdiv(n, cfg["BLOCK_N"]) * 8
    return RowChunks.fit(m, per_row, cfg["BLOCK_M"])


def _launch_chunked(a, b, scale, bias, offset: int, grad: bool, size: int | None = None):
    """The chunked structure (module docstring 2): (row_loss, row_wsum, row_wdot, da_raw,
    db_raw)."""
    m, n, d, acc, dev = _dims(a, b)
    cfg = _tile_config(a.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    ws = _w_scale(a.dtype)
    p2 = max(16, triton.next_power_of_2(max(d, 1)))
    chunks = _chunks(m, n, a.dtype, size)
    step = chunks.size
    n_ct = triton.cdiv(n, bn)
    wbuf = torch.empty((step if grad else 0, n), dtype=a.dtype, device=dev)
    k = 3 if grad else 2  # loss, wsum[, wdot]
    part = torch.empty((k, step, n_ct), dtype=acc, device=dev)
    stats = torch.empty(k, m, dtype=acc, device=dev)
    da = torch.empty(m if grad else 0, d, dtype=acc, device=dev)
    db = torch.empty(n if grad else 0, d, dtype=acc, device=dev)
    with _device_guard(dev):
        for i0, rows in chunks:
            a_c = a[i0 : i0 + rows]
            _siglip_weights_kernel[(triton.cdiv(rows, bm), n_ct)](
                **_operands(a_c, b),
                SCALE=scale,
                BIAS=bias,
                W=wbuf if grad else part,
                PART_LOSS=part[0],
                PART_WSUM=part[1],
                PART_WDOT=part[k - 1],
                row0=i0,
                stride_w=wbuf.stride(0) if grad else 0,
                stride_part=part.stride(1),
                offset=int(offset),
                w_scale=ws,
                GRAD=bool(grad),
                BLOCK_M=bm,
                BLOCK_N=bn,
                BLOCK_D=min(p2, cfg["BLOCK_K"]),
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
            )
            stats[:, i0 : i0 + rows] = part[:, :rows].sum(2)
            if grad:
                chunk_gemms(wbuf[:rows], b, a_c, da[i0 : i0 + rows], db, i0)
    if grad and ws != 1.0:  # undo the fp16 weight scaling (a power of two: exact)
        da.mul_(1.0 / ws)
        db.mul_(1.0 / ws)
    rows = stats.unbind(0) if grad else (*stats.unbind(0), stats.new_empty(0))
    return (*rows, da, db)


def siglip_fwd(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
    offset: int, grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(row_loss, row_wsum, row_wdot, da_raw, db_raw), see gammacl.ops.siglip. Small D: the one-pass
    kernel (dB by atomics; under torch.use_deterministic_algorithms two atomic-free launches, the
    second on the transposed problem). Large D: the chunked weights + GEMM structure."""
    _check(a, b, scale, bias)
    m, n, d, acc, _ = _dims(a, b)
    if m == 0 or n == 0:
        z = torch.zeros(m, dtype=acc, device=a.device)
        da = torch.zeros(m if grad else 0, d, dtype=acc, device=a.device)
        db = torch.zeros(n if grad else 0, d, dtype=acc, device=a.device)
        return z, z.clone(), z[: m if grad else 0].clone(), da, db
    if _use_chunked(a.dtype, d):
        return _launch_chunked(a, b, scale, bias, offset, grad)
    if use_deterministic_path():
        row_loss, row_wsum, row_wdot, da, _ = _launch_onepass(
            a, b, scale, bias, offset, grad, False
        )
        db = _launch_onepass(b, a, scale, bias, -offset, grad, False)[3]
        return row_loss, row_wsum, row_wdot, da, db
    return _launch_onepass(a, b, scale, bias, offset, grad, True)


def aot_launches(dtype: torch.dtype, d: int) -> None:
    """Calls every launcher of this file on small CPU tensors of `dtype` and feature dimension d
    in every flag combination (one-pass: GRAD x COLS; chunked: GRAD, and the GEMM's ACCUMULATE
    both ways through two chunks), for the AOT compile check (python -m gammacl.aot)."""
    acc = _acc_dtype(dtype)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, d, generator=g).to(dtype)
    b = torch.randn(4, d, generator=g).to(dtype)
    s, bias = torch.tensor(2.0, dtype=acc), torch.tensor(-1.0, dtype=acc)
    for grad in (False, True):
        if not _use_chunked(dtype, d):  # the one-pass kernel only where the launcher picks it
            for cols in (False, True):
                _launch_onepass(a, b, s, bias, 1, grad, cols)
        # one row per chunk: the dB GEMM runs with and without ACCUMULATE
        _launch_chunked(a, b, s, bias, 1, grad, size=1)
