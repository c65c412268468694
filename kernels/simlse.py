"""Triton backend of the simlse op: row / column log-sum-exp of l = scale * a @ b.T, fused.

Maths (a: [M, D], b: [N, D], l_ij = scale * <a_i, b_j>; entries (i, i + offset) are -inf when
exclude_pos):
    forward   r_i = log sum_j exp(l_ij)              c_j = log sum_i exp(l_ij)     (cols=True)
    backward  W_ij = g_r_i exp(l_ij - r_i) + g_c_j exp(l_ij - c_j)   (0 on excluded entries)
              da_raw = W @ b,  db_raw = W^T @ a       (statistics and raw grads fp32; fp64 inputs
                                                       -> fp64 throughout)
The caller (gammacl.ops.simlse.SimLSE) turns (da_raw, db_raw) into dA = scale*da_raw,
dB = scale*db_raw, dscale = <a, da_raw>_F.

Forward, one sweep (`_simlse_fwd_kernel`): program p owns rows [p*BM, (p+1)*BM) and streams all
column tiles. Per tile: S = a_blk @ b_tile^T (tl.dot, operands in the input dtype, fp32
accumulation; fp64 operands and accumulator for fp64 inputs), l = scale*S rounded once in
the accumulation dtype, an online row LSE (running max m, sum l_sum, rescaled by
exp(m_old - m_new)) and the tile's column partial
    part[p, j] = log sum_{i in block p} exp(l_ij)
written to a [ceil(M/BM), N] buffer in the accumulation dtype; `_simlse_col_merge_kernel`
then LSE-merges the R = ceil(M/BM) partials of each column. Memory: R*N*4 bytes
(N = M = 65536, BM = 128: 128 MiB). When that buffer would exceed _COL_PART_MAX_BYTES
(256 MiB) the forward instead runs a second, transposed sweep (rows of b against a, offset
-> -offset, COLS off): O(N) extra memory, 2MND extra FLOPs. Never an M x N buffer.
    FLOPs: 2MND (+2MND with the transposed sweep); exps: 2 per entry with cols (row and column
    shifts differ), 1 without.
    Bytes: a read once, b read ceil(M/BM) times (mostly from L2); writes 4M (+4RN partials,
    read back once by the merge).

Backward, one kernel launched twice, no atomics, deterministic (`_simlse_bwd_kernel`):
    launch 1 (rows of a):    da_raw_i = sum_j W_ij b_j
    launch 2 (rows of b):    db_raw_j = sum_i W_ij a_i   = the same kernel on (b, a, c, r, g_c,
                                                           g_r, -offset): W^T has the same form;
                             TRANS: its S tiles are (a_tile @ b_blk^T)^T, the forward's operand
                             order, so each logit is bitwise the one its LSE came from
    with dscale, launch 1 also sums W_ij <a_i, b_j> in fp32 (before W is rounded to the operand
    dtype) into one partial per program: dscale_raw, exact where dscale cancels.
Each program owns BM output rows, recomputes its S tiles (2 recomputes in all) and multiplies
W (cast to the input dtype, as flash-attention does with P) by the other operand's tile.
    FLOPs: 2 x (2MND recompute + 2MND product) = 8MND; forward + backward = 10MND (12MND with
    the transposed column sweep). exps: 2 per entry per launch with cols.
Large D: the S recompute loops over D in BLOCK_D chunks. When D <= BLOCK_D ("single chunk":
D <= 128 for 16-bit inputs, 32 for fp32 and fp64) the row block of the input is held in
registers and the output accumulates in registers. Otherwise the program accumulates its own
output rows in the fp32 output buffer itself (read-modify-write per column tile and D chunk;
rows are owned by one program, so there is no race and no atomics; the first column tile
stores without reading).
That adds 8*BM*D bytes of (mostly L2) traffic per (row block, column tile) but keeps the
8MND FLOP floor for any D; a full-D register tile is impossible at D = 1024.

Numerics: every shift (row / column max, LSE) and every exponent come from the same rounded
logit l = scale*S in natural units; the fp32 path takes exp(x) = exp2(x log2 e) of the exact
difference x = l - shift. Folding log2 e into scale instead (l2 = S * (scale log2 e)) and
converting the LSE to natural units and back (r * ln2 * log2 e) shifts the maximum entry's
exponent by ~ulp(l2): 8e-5 relative gradient error at |l| ~ 1e3 (tests/test_large_logits.py).
The kernels are compiled with enable_fp_fusion=False for the same reason: fused into
fma(S, scale, -m), the exponent would see the unrounded product.
Forward: excluded and out-of-range entries are -inf before any exp; running maxima and LSEs
that are -inf (an all-excluded row or column) are replaced by 0 as the exp shift, so the
all-excluded row gets LSE -inf. Backward: every valid W_ij is formed in IEEE arithmetic (g = 0
too: a NaN / inf feature gives NaN weights, as on the torch backend) and excluded /
out-of-range entries are then set to 0 (an all-excluded row: W = 0, never NaN). fp16 only:
W = g * P with g ~ 1/N (mean losses) would fall below fp16's range when cast for the product,
so the backward scales each W row by its own power of two sigma_i (fp16_row_scale: the row's
bound at <= 2^14, on the device, no host sync) and divides the fp32 output row by it; rows whose
g differs by 2^-24 and more all keep their gradient, and a true gradient beyond fp16's range
comes out as inf when rounded, as on torch. bf16 has fp32's exponent range and needs no scaling.
fp32 inputs use input_precision="ieee" (matches an fp32 reference on GPU); TF32 is an opt-in that
follows PyTorch's own switch, torch.set_float32_matmul_precision("high" or "medium").

Large D (D > 128 for 16-bit inputs, D > 64 for fp32; tiles.use_large_d): the fused kernels above
would re-read their fp32 output rows per column tile (~18 FLOP/B of L2 traffic at D = 1024), so
the launchers switch to the GEMM-structured path in kernels/simlse_tiled.py: a tiled
forward with the row / column partial LSE in its epilogue, and a backward per chunk of R rows
(W tile kernel + two GEMMs, R from GAMMACL_TRITON_CHUNK_MIB, default 256 MiB of W). Extra memory
O(R*N + N*D); FLOPs 2MND + 6MND, at a GEMM's FLOP/byte (bench/NOTES.md, "Large-D paths").

Configs: one fixed config per (dtype, D range) (_config); GAMMACL_AUTOTUNE=1 (read at import,
ignored under TRITON_INTERPRET) wraps the kernels in triton.autotune over a small list.
Under the interpreter (a test harness: ~1-2 ms per program x loop trip) tiles are 64 x 64 and
bf16 tiles are upcast to fp32 before tl.dot (the interpreter multiplies raw bf16 bit patterns);
bf16 x bf16 products are exact in fp32, so the maths is that of the GPU path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gammacl.dispatch import interpreter_on
from gammacl.kernels import simlse_tiled as _tiled
from gammacl.kernels.simlse_checks import check_features as _check_features
from gammacl.kernels.simlse_checks import check_vector as _check_vector
from gammacl.kernels.tiles import (
    _NEG_INF,
    _dot_nn,
    _dot_nt,
    _exp_nat,
    _load_rows,
    _log_nat,
    _online_lse_nat,
    _scores_chunked,
    _simlse_col_merge_kernel,  # noqa: F401 (gammacl.aot looks the merge kernel up here)
    _tile_lse_nat,
    _valid,
    _vec_weights,
    merge_lse,
    use_large_d,
)
from gammacl.kernels.tiles import acc_dtype as _acc_dtype
from gammacl.kernels.tiles import device_guard as _device_guard
from gammacl.kernels.tiles import dims as _dims
from gammacl.kernels.tiles import operands as _operands

# Column partials buffer [ceil(M/BLOCK_M), N] allowed up to this size; beyond it the forward
# computes the column LSE with a second, transposed sweep instead.
_COL_PART_MAX_BYTES = 256 * 2**20

_AUTOTUNE = os.environ.get("GAMMACL_AUTOTUNE", "0") == "1" and not interpreter_on()


def _autotune_configs(kind: str) -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)
    shapes = {
        "fwd": [
            (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 32, 4, 4),
            (64, 64, 64, 4, 3), (64, 64, 32, 4, 2), (32, 32, 16, 4, 1),
        ],
        "bwd": [
            (64, 64, 64, 4, 2), (64, 128, 64, 8, 2), (128, 64, 64, 8, 2), (64, 64, 128, 4, 2),
            (64, 64, 32, 4, 2), (32, 32, 16, 4, 1),
        ],
    }[kind]  # fmt: skip
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d}, num_warps=w, num_stages=s)
        for m, n, d, w, s in shapes
    ]


def _autotune_prune(configs, named_args, **kwargs):
    """Keep configs whose D chunk suits the operand width (wide chunks for 16-bit only) and is
    not wider than D needs."""
    args = {**named_args, **kwargs}
    size = args["X"].element_size()
    d_cap = max(16, triton.next_power_of_2(args["D"]))
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_D"] * size <= 256
        and c.kwargs["BLOCK_D"] <= d_cap
        and (size < 8 or c.kwargs["BLOCK_M"] <= 64)
    ]
    return keep or configs[-1:]


_AUTOTUNE_MIN_BLOCK_M = 32  # smallest BLOCK_M in the autotune lists (sizes the partials buffer)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.heuristics({"SINGLE_D": lambda args: args["D"] <= args["BLOCK_D"]})
@triton.jit(do_not_specialize=["offset"])
def _simlse_fwd_kernel(
    X, Y, SCALE, COL_SCALE, ROW_LSE, COL_PART,
    M, N, D, stride_x, stride_y, stride_part, offset,
    EXCLUDE: tl.constexpr, COLS: tl.constexpr, IS_VEC: tl.constexpr,
    ACC: tl.constexpr, BASE2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
):  # fmt: skip
    """ROW_LSE[i] = LSE_j l_ij for this program's BLOCK_M rows of X; with COLS, also
    COL_PART[pid, j] = LSE_{i in block} l'_ij for every column j. l = l' = scale * S, or with
    IS_VEC l_ij = SCALE[i] S_ij (row scales) and l'_ij = COL_SCALE[j] S_ij (column scales)."""
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets reach M*D, R*N > 2^31
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if IS_VEC:
        scale = tl.load(SCALE + offs_m, mask=offs_m < M, other=0.0).to(ACC)[:, None]
    else:
        scale = tl.load(SCALE).to(ACC)
    m_i = tl.full((BLOCK_M,), _NEG_INF, dtype=ACC)  # running row max
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)  # running sum of exp(l - m_i)
    if SINGLE_D:
        x = _load_rows(X, offs_m, offs_d, stride_x, M, D)  # held for the whole sweep
    for j0 in range(0, N, BLOCK_N):
        offs_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        if SINGLE_D:
            y = _load_rows(Y, offs_n, offs_d, stride_y, N, D)
            s = _dot_nt(x, y, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), UPCAST, PRECISION)
        else:
            s = _scores_chunked(
                X, Y, offs_m, offs_n, M, N, D, stride_x, stride_y, ACC, UPCAST, PRECISION, BLOCK_D
            )
        valid = _valid(offs_m, offs_n, M, N, offset, EXCLUDE)
        if IS_VEC and COLS:  # the column logits cs_j S_ij, before S becomes the row logits
            cs = tl.load(COL_SCALE + offs_n, mask=offs_n < N, other=0.0).to(ACC)
            sc = tl.where(valid, s * cs[None, :], _NEG_INF)
        s = tl.where(valid, s * scale, _NEG_INF)
        if not IS_VEC:
            sc = s
        # online row LSE: m' = max(m, max_j s), l' = l * exp(m - m') + sum_j exp(s - m');
        # a shift of -inf (nothing valid yet) is replaced by 0 so exp never sees -inf - -inf.
        m_i, l_i = _online_lse_nat(m_i, l_i, s, BASE2)
        if COLS:
            # column partial of this row block: LSE_i s_ij = cm_j + log sum_i exp(s_ij - cm_j)
            part = _tile_lse_nat(sc, 0, BASE2)
            tl.store(COL_PART + pid * stride_part + offs_n, part, mask=offs_n < N)
    row = tl.where(l_i == 0, _NEG_INF, m_i + _log_nat(tl.where(l_i == 0, 1.0, l_i), BASE2))
    tl.store(ROW_LSE + offs_m, row, mask=offs_m < M)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.heuristics({"SINGLE_D": lambda args: args["D"] <= args["BLOCK_D"]})
@triton.jit(do_not_specialize=["offset"])
def _simlse_bwd_kernel(
    X, Y, SCALE, SCALE_Y, LSE_X, LSE_Y, G_X, G_Y, G_INV, OUT, DS_PART,
    M, N, D, stride_x, stride_y, stride_out, offset,
    EXCLUDE: tl.constexpr, HAS_X: tl.constexpr, HAS_Y: tl.constexpr, G_NORM: tl.constexpr,
    TRANS: tl.constexpr, HAS_DS: tl.constexpr, IS_VEC: tl.constexpr,
    ACC: tl.constexpr, BASE2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
):  # fmt: skip
    """OUT[i] = sum_j W_ij Y[j] for this program's BLOCK_M rows of X, with
    W_ij = [HAS_X] G_X[i] exp(l_ij - LSE_X[i]) + [HAS_Y] G_Y[j] exp(l_ij - LSE_Y[j]),
    l_ij = scale * <X_i, Y_j>, W = 0 on excluded (j == i + offset) and out-of-range entries.
    With G_NORM, OUT = (diag(G_INV) W) @ Y (G_INV [M] = fp16_row_scale's sigma, powers of two;
    the launcher divides it back out): fp16 W = g * P with g ~ 1/N would otherwise flush to zero.
    IS_VEC (vector scales, SCALE [M] over X's rows, SCALE_Y [N] over Y's): the X term reads
    l_ij = SCALE[i] S_ij and carries SCALE[i], the Y term l'_ij = SCALE_Y[j] S_ij and SCALE_Y[j]
    (W_ij = G_X[i] SCALE[i] p_ij + G_Y[j] SCALE_Y[j] p'_ij); with HAS_DS, DS_PART[i] =
    G_X[i] sum_j p_ij S_ij (this launch's rows' scale gradient).
    Per column tile: 2*BM*BN*D FLOPs to recompute S and 2*BM*BN*D for W @ Y."""
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    if IS_VEC:  # SCALE: [rows of X], read by the X term only
        if HAS_X:
            scale = tl.load(SCALE + offs_m, mask=row_ok, other=0.0).to(ACC)[:, None]
        else:
            scale = tl.zeros((BLOCK_M, 1), dtype=ACC)
    else:
        scale = tl.load(SCALE).to(ACC)
    if HAS_X:
        lse_x = tl.load(LSE_X + offs_m, mask=row_ok, other=0.0)
        g_x = tl.load(G_X + offs_m, mask=row_ok, other=0.0)
    else:
        lse_x = tl.zeros((BLOCK_M,), dtype=ACC)
        g_x = tl.zeros((BLOCK_M,), dtype=ACC)
    if SINGLE_D:
        x = _load_rows(X, offs_m, offs_d, stride_x, M, D)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    ds_acc = tl.zeros((BLOCK_M,), dtype=ACC)
    for j0 in range(0, N, BLOCK_N):
        offs_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        # TRANS (the db launch, X = b): S = (Y_tile @ X_blk^T)^T, the forward's operand order,
        # so every recomputed logit is bitwise the one its LSE was taken from (Numerics)
        if SINGLE_D:
            y = _load_rows(Y, offs_n, offs_d, stride_y, N, D)
            if TRANS:
                s = _dot_nt(y, x, tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC), UPCAST, PRECISION)
                s = tl.trans(s)
            else:
                s = _dot_nt(x, y, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), UPCAST, PRECISION)
        elif TRANS:
            s = _scores_chunked(
                Y, X, offs_n, offs_m, N, M, D, stride_y, stride_x, ACC, UPCAST, PRECISION, BLOCK_D
            )
            s = tl.trans(s)
        else:
            s = _scores_chunked(
                X, Y, offs_m, offs_n, M, N, D, stride_x, stride_y, ACC, UPCAST, PRECISION, BLOCK_D
            )
        s_raw = s  # <X_i, Y_j> (0 out of range)
        if IS_VEC:
            w, ds_acc, _ = _vec_weights(
                s_raw, scale, lse_x, g_x, SCALE_Y, LSE_Y, G_Y, offs_m, offs_n, M, N, offset,
                ds_acc, EXCLUDE, HAS_X, HAS_Y, HAS_DS, ACC, BASE2,
            )  # fmt: skip
        else:
            valid = _valid(offs_m, offs_n, M, N, offset, EXCLUDE)
            s = s * scale
            w = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            # exponents -inf on excluded / out-of-range entries (an all-excluded row's LSE is
            # -inf: l - LSE = +inf there, never -inf - -inf); every valid entry is formed in
            # IEEE arithmetic, g = 0 included, so a NaN / inf logit or LSE reaches OUT as NaN
            if HAS_X:  # row-softmax term: g_r_i * P_row_ij
                w += g_x[:, None] * _exp_nat(tl.where(valid, s - lse_x[:, None], _NEG_INF), BASE2)
            if HAS_Y:  # column-softmax term: g_c_j * P_col_ij
                col_ok = offs_n < N
                lse_y = tl.load(LSE_Y + offs_n, mask=col_ok, other=0.0)
                g_y = tl.load(G_Y + offs_n, mask=col_ok, other=0.0)
                w += g_y[None, :] * _exp_nat(tl.where(valid, s - lse_y[None, :], _NEG_INF), BASE2)
            w = tl.where(valid, w, 0.0)  # 0 also where g is non-finite, as torch's zeroing
        if HAS_DS and not IS_VEC:
            # dscale_raw = sum_ij W_ij <X_i, Y_j> from the fp32 W, before W is rounded to the
            # operand dtype: <X, W16 @ Y> loses ~ulp(bf16) of the summands, and dscale cancels
            # against the positive / smoothing terms (bf16, scale 1e-3, smoothing 1: 78% error)
            ds_acc += tl.sum(w * s_raw, axis=1)
        if G_NORM:
            w = w * tl.load(G_INV + offs_m, mask=row_ok, other=1.0).to(ACC)[:, None]
        # W in the operand dtype for the tensor-core product (fp32 accumulation)
        w = w.to(Y.dtype.element_ty)
        if UPCAST:
            w = w.to(tl.float32)
        if SINGLE_D:
            acc = _dot_nn(w, y, acc, UPCAST, PRECISION)
        else:
            # this program alone owns OUT rows offs_m: accumulate there chunk by chunk
            # (read-modify-write; the first column tile writes without reading)
            for k0 in range(0, D, BLOCK_D):
                offs_k = k0 + offs_d
                y = _load_rows(Y, offs_n, offs_k, stride_y, N, D)
                o_ptr = OUT + offs_m[:, None] * stride_out + offs_k[None, :]
                o_mask = row_ok[:, None] & (offs_k[None, :] < D)
                o = tl.load(o_ptr, mask=o_mask & (j0 > 0), other=0.0)
                o = _dot_nn(w, y, o, UPCAST, PRECISION)
                tl.store(o_ptr, o, mask=o_mask)
            tl.debug_barrier()  # stores visible to every thread before the next tile's loads
    if SINGLE_D:
        o_ptr = OUT + offs_m[:, None] * stride_out + offs_d[None, :]
        tl.store(o_ptr, acc, mask=row_ok[:, None] & (offs_d[None, :] < D))
    if HAS_DS:
        if IS_VEC:
            tl.store(DS_PART + offs_m, g_x * ds_acc, mask=row_ok)
        else:
            tl.store(DS_PART + pid, tl.sum(ds_acc, axis=0))


if _AUTOTUNE:
    _simlse_fwd_kernel = triton.autotune(
        configs=_autotune_configs("fwd"),
        key=["M", "N", "D"],
        prune_configs_by={"early_config_prune": _autotune_prune},
        restore_value=["COL_PART"],  # partial rows of a config are left for the next config
    )(_simlse_fwd_kernel)
    _simlse_bwd_kernel = triton.autotune(
        configs=_autotune_configs("bwd"),
        key=["M", "N", "D"],
        prune_configs_by={"early_config_prune": _autotune_prune},
    )(_simlse_bwd_kernel)  # OUT is rewritten from scratch by every run (first tile stores)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _config(kind: str, dtype: torch.dtype, d: int, vec: bool = False) -> dict:
    """The fixed launch config for kernel `kind` ("fwd" or "bwd"), input dtype and D.

    BLOCK_D >= 16 always (tl.dot needs K >= 16 on H100; D is padded with masked zeros). D up to
    BLOCK_D is one chunk held in registers; larger D loops in BLOCK_D chunks."""
    p2 = max(16, triton.next_power_of_2(max(d, 1)))
    if interpreter_on():
        # few programs x loop trips (~1-2 ms each); D > 32 exercises the chunked path
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=min(p2, 32), num_warps=4, num_stages=1)
    if dtype in (torch.float16, torch.bfloat16):
        # bwd: 1 stage -- at 2 stages triton 3.6 serialises its wgmma (ptxas C7515) at D = 64
        # (TRANS=1, HAS_Y=1, scalar and vector); 1 stage compiles async (python -m gammacl.aot)
        bm, bn, warps, stages = (128, 64, 8, 3) if kind == "fwd" else (64, 64, 4, 1)
        bd = p2 if d <= 128 else 64
        if vec and kind == "bwd":  # two P tiles live at once: 4 warps spill (python -m gammacl.aot)
            warps = 8
    elif dtype == torch.float32:
        # "ieee" fp32 is an FMA dot (operand rows per thread in registers): 4 warps or a
        # 64-wide D chunk spill on sm_90 (up to 2 KB/thread); 8 warps x 32-wide chunks do not
        # (python -m gammacl.aot, bench/NOTES.md)
        bm, bn, warps, stages = 64, 64, 8, 2
        bd = p2 if d <= 32 else 32
    else:  # float64
        bm, bn, warps, stages = 32, 32, 4, 1
        bd = p2 if d <= 32 else 16
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)


def _row_lse(x, y, scale, offset, exclude_pos, out, col_part=None, col_scale=None) -> None:
    """Launches the forward sweep of x's rows against y: out[i] = LSE_j l_ij; with col_part
    ([ceil(M/BLOCK_M), N]) also the per-row-block column partials. A 1-D scale: x's row scales
    (and col_scale y's, for the column partials)."""
    m, d = x.shape
    cols = col_part is not None
    kw = {} if _AUTOTUNE else _config("fwd", x.dtype, d)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _simlse_fwd_kernel[grid](
        **_operands(x, y),
        SCALE=scale,
        COL_SCALE=col_scale if col_scale is not None else scale,
        ROW_LSE=out,
        COL_PART=col_part if cols else out,
        stride_part=col_part.stride(0) if cols else 0,
        offset=offset,
        EXCLUDE=exclude_pos,
        COLS=cols,
        IS_VEC=scale.ndim == 1,
        **kw,
        enable_fp_fusion=False,  # max and exponent from the same rounded logit (Numerics)
    )


def simlse_fwd(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
    offset: int, exclude_pos: bool, cols: bool, col_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(row_lse [M], col_lse [N] or [0]) of l = scale * a @ b.T, excluded (i, i+offset); with a
    [M] scale the row LSE reads scale[i] S_ij and the column LSE col_scale[j] S_ij."""
    vec = _check_features(a, b, scale, col_scale, cols)
    cs = col_scale if vec and cols else None
    offset, exclude_pos, cols = int(offset), bool(exclude_pos), bool(cols)
    m, n = a.shape[0], b.shape[0]
    acc = _acc_dtype(a.dtype)
    dev = a.device
    row = torch.empty(m, dtype=acc, device=dev)
    col = torch.empty(n if cols else 0, dtype=acc, device=dev)
    if m == 0 or n == 0:  # LSE over an empty set
        return row.fill_(float("-inf")), col.fill_(float("-inf"))
    with _device_guard(dev):
        if use_large_d(a.dtype, a.shape[1]):
            _tiled.large_d_fwd(a, b, scale, offset, exclude_pos, cols, row, col, col_scale=cs)
            return row, col
        if not cols:
            _row_lse(a, b, scale, offset, exclude_pos, row)
            return row, col
        bm = _AUTOTUNE_MIN_BLOCK_M if _AUTOTUNE else _config("fwd", a.dtype, a.shape[1])["BLOCK_M"]
        r = triton.cdiv(m, bm)
        if r * n * col.element_size() <= _COL_PART_MAX_BYTES:
            # rows a config does not write (autotune: larger BLOCK_M) must read as -inf
            if _AUTOTUNE:
                part = torch.full((r, n), float("-inf"), dtype=acc, device=dev)
            else:
                part = torch.empty((r, n), dtype=acc, device=dev)
            _row_lse(a, b, scale, offset, exclude_pos, row, col_part=part, col_scale=cs)
            # interpreter: 4 partial rows per trip, so tests reach the merge loop's second trip
            # with M > 4 * 64 rows (tests/test_merge_loops.py)
            merge_lse(part, col, interp_block_r=4)
        else:
            # transposed sweep: c_j = LSE_i l_ij is the row LSE of b @ a.T with offset -offset
            _row_lse(a, b, scale, offset, exclude_pos, row)
            _row_lse(b, a, cs if vec else scale, -offset, exclude_pos, col)
    return row, col


def fp16_row_scale(
    g_x: torch.Tensor, g_y: torch.Tensor, has_x: bool, has_y: bool, rows: int
) -> torch.Tensor:
    """sigma [rows] (fp32 powers of two, on the device: no host sync) for fp16 weight rows
    W_ij = [has_x] g_x_i P_ij + [has_y] g_y_j Q_ij (P, Q <= 1): with the row bound
    u_i = [has_x] |g_x_i| + [has_y] max_j |g_y_j| >= max_j |W_ij|, sigma_i = 2^(14 - ceil log2 u_i)
    puts the row's largest weight at <= 2^14 (fp16 max 65504) and keeps 38 binades below it, so
    no row is flushed because another row's g is larger (a global scale lost rows whose g was
    2^-24 below the largest). sigma = 1 where u is 0 or not finite (W is then 0, inf or NaN, as
    on torch); the exponent is clamped so sigma and 1 / sigma stay finite in fp32."""
    u = g_x.abs() if has_x else g_y.new_zeros(rows)
    if has_y and g_y.numel():
        u = u + g_y.abs().amax()
    ok = torch.isfinite(u) & (u > 0)
    e = torch.ceil(torch.log2(torch.where(ok, u, 1.0))).clamp_(-100.0, 100.0)
    return torch.where(ok, torch.exp2(14.0 - e), 1.0).to(torch.float32)


def simlse_bwd(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
    row_lse: torch.Tensor, col_lse: torch.Tensor, g_row: torch.Tensor, g_col: torch.Tensor,
    offset: int, exclude_pos: bool, cols: bool, col_scale: torch.Tensor | None = None,
    need_db: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(da_raw, db_raw, dscale_raw) = (W @ b, W^T @ a, sum_ij W_ij <a_i, b_j>), W_ij =
    g_row_i exp(l_ij - row_lse_i) + [cols] g_col_j exp(l_ij - col_lse_j), 0 on excluded
    entries; acc dtype; dscale_raw (0-d) from the unrounded W.
    Vector scales (scale [M], col_scale [N] when cols): (dA, dB, cat(drs, dcs)) with the scales
    inside W (gammacl.ops.simlse). need_db=False: db_raw [0, D], its GEMM (large D) or its
    launch (fused) skipped; the fused vector path with cols still runs the transposed launch,
    which forms dcs."""
    vec = _check_features(a, b, scale, col_scale, cols)
    offset, exclude_pos, cols = int(offset), bool(exclude_pos), bool(cols)
    m, n, d, acc, dev = _dims(a, b)
    row_lse = _check_vector("row_lse", row_lse, m, acc, dev)
    g_row = _check_vector("g_row", g_row, m, acc, dev)
    col_lse = _check_vector("col_lse", col_lse, n if cols else 0, acc, dev)
    g_col = _check_vector("g_col", g_col, n if cols else 0, acc, dev)
    da = torch.empty(m, d, dtype=acc, device=dev)
    # without need_db only the fused vector path with cols writes db (its dcs launch, below)
    db = torch.empty(n if need_db or (vec and cols) else 0, d, dtype=acc, device=dev)
    no_db = db[:0]  # need_db=False
    if m == 0 or n == 0:
        ds = torch.zeros(m + (n if cols else 0) if vec else (), dtype=acc, device=dev)
        return da.zero_(), db.zero_() if need_db else no_db, ds
    ds_part = None
    # fp16 only (5-bit exponent): W rows scaled by powers of two sigma_i (fp16_row_scale; bf16
    # shares fp32's exponent range and needs no scaling)
    g_norm = a.dtype == torch.float16
    cs = col_scale if vec and cols else None
    with _device_guard(dev):
        if use_large_d(a.dtype, d):
            ds = torch.zeros(m + (n if cols else 0) if vec else (), dtype=acc, device=dev)
            # vector scales: W carries g * scale
            g_r, g_c = (g_row * scale, g_col * cs if cols else g_col) if vec else (g_row, g_col)
            sigma = fp16_row_scale(g_r, g_c, True, cols, m) if g_norm else None
            _tiled.large_d_bwd(
                a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols, sigma,
                da, db if need_db else None, ds, col_scale=cs,
            )  # fmt: skip
            return da, db if need_db else no_db, ds
        if vec:  # rows of a write drs = ds[:m], rows of b dcs = ds[m:]
            ds_vec = torch.empty(m + (n if cols else 0), dtype=acc, device=dev)
        # da_raw = W @ b over row blocks of a; db_raw = W^T @ a over row blocks of b, where W^T
        # has the same form with (r, g_r) <-> (c, g_c) and offset -> -offset.
        launches = (
            (a, b, row_lse, col_lse, g_row, g_col, scale, cs, offset, True, cols, da, False),
            (b, a, col_lse, row_lse, g_col, g_row, cs, scale, -offset, cols, True, db, True),
        )
        # without need_db the transposed launch runs only for the column-scale gradients dcs
        for x, y, lse_x, lse_y, g_x, g_y, s_x, s_y, off, has_x, has_y, out, trans in launches[
            : 2 if need_db or (vec and cols) else 1
        ]:
            kw = {} if _AUTOTUNE else _config("bwd", x.dtype, d, vec)
            rows = x.shape[0]
            grid = lambda meta, rows=rows: (triton.cdiv(rows, meta["BLOCK_M"]),)  # noqa: E731
            has_ds = not trans  # the da launch alone covers every (i, j)
            if g_norm:  # vector scales: W carries g * scale
                gx = g_x * s_x if vec and has_x else g_x
                gy = g_y * s_y if vec and has_y else g_y
                sigma = fp16_row_scale(gx, gy, has_x, has_y, rows)
            else:
                sigma = None
            if vec:  # each launch sums its own rows' scale gradient
                has_ds = has_x
                ds_part = ds_vec[m:] if trans else ds_vec[:m]
            elif has_ds:  # one fp32 partial per program (autotune: smallest BLOCK_M)
                bm = _AUTOTUNE_MIN_BLOCK_M if _AUTOTUNE else kw["BLOCK_M"]
                ds_part = torch.zeros(triton.cdiv(rows, bm), dtype=acc, device=dev)
            _simlse_bwd_kernel[grid](
                **_operands(x, y),
                SCALE=s_x if vec and has_x else scale,
                SCALE_Y=s_y if vec and has_y else scale,
                LSE_X=lse_x if has_x else lse_y,
                LSE_Y=lse_y if has_y else lse_x,
                G_X=g_x if has_x else g_y,
                G_Y=g_y if has_y else g_x,
                G_INV=sigma if g_norm else scale,
                OUT=out,
                DS_PART=ds_part if has_ds else out,
                stride_out=out.stride(0),
                offset=off,
                **dict(EXCLUDE=exclude_pos, HAS_X=has_x, HAS_Y=has_y, G_NORM=g_norm, TRANS=trans),
                **dict(HAS_DS=has_ds, IS_VEC=vec, **kw),
                enable_fp_fusion=False,  # exponent from the rounded logit (Numerics)
            )
            if g_norm:
                out.div_(sigma[:, None])  # exact: sigma is a power of two
    db = db if need_db else no_db
    if vec:
        return da, db, ds_vec
    return da, db, ds_part.sum()
