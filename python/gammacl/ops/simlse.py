"""simlse: row and column log-sum-exp of the scaled similarity matrix, never materialised.

    l_ij  = scale * <a_i, b_j>                      a: [M, D], b: [N, D], fp32 accumulation
    r_i   = log sum_j exp(l_ij)                     (row LSE, [M])
    c_j   = log sum_i exp(l_ij)                     (column LSE, [N]; only when cols=True)
Entries (i, i + offset) are left out of both sums when exclude_pos=True (the positive pair), so
r_i is then the log-partition over negatives only (gamma / SogCLR losses). Non-finite logits
(docs/numerics.md): an LSE over a set holding NaN or +inf is NaN (a materialised softmax's
shift), over a set of -inf only -inf; the backward forms every non-excluded W_ij in IEEE
arithmetic, g = 0 included, so NaN reaches the gradients as in a materialised loss.

Every contrastive loss in gammacl is an O(N*D) expression in (r, c) and a few row-wise dots, so
this one op carries all the N^2 work. Its backward, given upstream g_r [M] and g_c [N]:
    W_ij   = g_r_i * exp(l_ij - r_i) + g_c_j * exp(l_ij - c_j)      (0 on excluded entries)
    da_raw = W @ b,  db_raw = W^T @ a                                (fp32 / fp64)
    dA = scale * da_raw,  dB = scale * db_raw,  dscale = sum_ij W_ij <a_i,b_j> = <A, da_raw>_F
FLOPs: forward one N x M x D GEMM (2MND); backward recompute + two GEMMs (6MND): 8MND in all,
the 4-GEMM floor. Saved for backward: a, b, r, c, scale (O((M+N)D)), never an M x N buffer.

Backends (one registry, `_IMPLS`: reference, torch, cpp, cuda, triton) implement two functions
with one signature each:
    fwd(a, b, scale, offset, exclude_pos, cols) -> (row_lse [M], col_lse [N] or [0])
    bwd(a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols)
        -> (da_raw, db_raw, dscale_raw)
dscale_raw = sum_ij W_ij <a_i, b_j> (a 0-d tensor): the fused backends that round W to 16 bits
for their GEMMs (triton, cuda) sum it from the acc-typed W inside their kernels, since
<A, da_raw> would then cancel against the positive / smoothing terms; the others form
<A, da_raw>_F. `scale` is a 0-d tensor in the accumulation dtype on the features' device;
statistics and raw gradients are in the accumulation dtype (fp64 for fp64 inputs, else fp32);
g_row / g_col are contiguous.

Vector scales (one temperature per anchor: `scale` [M] = rs, `col_scale` [N] = cs). The row LSE
reads l^r_ij = rs_i s_ij and the column LSE l^c_ij = cs_j s_ij, s_ij = <a_i, b_j>: two exponentials
per entry (the scalar path already takes two shifts, r_i and c_j), one sweep.
    r_i = LSE_j rs_i s_ij,   c_j = LSE_i cs_j s_ij
    p^r_ij = exp(rs_i s_ij - r_i),   p^c_ij = exp(cs_j s_ij - c_j)          (0 on excluded entries)
    W_ij = g_r_i rs_i p^r_ij + g_c_j cs_j p^c_ij          (the scales inside W, not outside)
    dA = W @ b,   dB = W^T @ a
    drs_i = g_r_i sum_j p^r_ij s_ij,   dcs_j = g_c_j sum_i p^c_ij s_ij
(drs_i / g_r_i = E_{p^r_i}[s_i.], the softmax-mean similarity of anchor i.) The backends take
the vector mode from scale.dim() == 1 and one trailing argument col_scale ([N] when cols, else
None); their bwd then returns (dA, dB, dscale) with dscale = cat(drs [M], dcs [N or 0]), every
term summed from the accumulation-dtype weights. Scalar calls pass no col_scale and run the code
they ran before.

need_db: bwd(..., col_scale, need_db=False) returns db_raw as [0, D] and skips its GEMM (its
launch on triton's fused path, except with vector scales and cols, whose transposed launch forms
dcs); every other output is unchanged. The autograd backward passes need_db = whether b needs a
gradient; grad_comm="local" (gammacl._local_grad), whose gathered side needs none, saves 2 M N D
of the 6 M N D backward FLOPs.
"""

from __future__ import annotations

import os

import torch

from gammacl._ext import compiled_fake
from gammacl._validate import acc_dtype
from gammacl.ops._backends import Backends, compiled, kernel
from gammacl.reference.simlse import inf_lse_to_nan  # torch.logsumexp gives +inf, the others NaN

# torch backend chunk: rows per chunk chosen so one chunk x N fp32 buffer stays under this budget.
_CHUNK_BYTES = int(float(os.environ.get("GAMMACL_CHUNK_MIB", "32")) * 2**20)


def _chunk_rows(m: int, n: int, itemsize: int) -> int:
    return max(1, min(m, _CHUNK_BYTES // max(1, n * itemsize)))


def _acc_operands(
    a: torch.Tensor, b: torch.Tensor, buffers: int = 1
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(a, b) in the accumulation dtype and the torch backends' rows per chunk: `buffers`
    [rows, N] accumulation-dtype buffers under GAMMACL_CHUNK_MIB."""
    acc = acc_dtype(a.dtype)
    step = _chunk_rows(a.shape[0], b.shape[0], buffers * acc.itemsize)
    return a.to(acc), b.to(acc), step


def _lse_buffers(af: torch.Tensor, n: int, cols: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's outputs: row LSE [M] (every entry written) and column LSE [N or 0] at -inf
    (the chunks' column LSEs logaddexp'd into it)."""
    row = torch.empty(af.shape[0], dtype=af.dtype, device=af.device)
    return row, torch.full((n if cols else 0,), float("-inf"), dtype=af.dtype, device=af.device)


def _masked_logits(
    a_chunk: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, i0: int, offset: int, exclude: bool
) -> torch.Tensor:
    """Scaled logits of rows [i0, i0 + chunk) in the accumulation dtype; with `exclude` the
    entries (i, i + offset) -- the chunk's diagonal number i0 + offset -- are -inf (a view
    fill: no index tensors, no host sync)."""
    s = torch.mm(a_chunk, b.t()) * scale
    if exclude:
        s.diagonal(i0 + offset).fill_(float("-inf"))
    return s


def torch_fwd(a, b, scale, offset: int, exclude_pos: bool, cols: bool, col_scale=None):
    if scale.dim() == 1:
        return _torch_fwd_vec(a, b, scale, col_scale, offset, exclude_pos, cols)
    af, bf, step = _acc_operands(a, b)
    row, col = _lse_buffers(af, b.shape[0], cols)
    for i0 in range(0, a.shape[0], step):
        s = _masked_logits(af[i0 : i0 + step], bf, scale, i0, offset, exclude_pos)
        row[i0 : i0 + step] = torch.logsumexp(s, dim=1)
        if cols:
            col = torch.logaddexp(col, torch.logsumexp(s, dim=0))
    return inf_lse_to_nan(row), inf_lse_to_nan(col)


def torch_bwd(
    a,
    b,
    scale,
    row_lse,
    col_lse,
    g_row,
    g_col,
    offset: int,
    exclude_pos: bool,
    cols: bool,
    col_scale=None,
    need_db: bool = True,
):
    if scale.dim() == 1:
        return _torch_bwd_vec(
            a, b, scale, col_scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols,
            need_db,
        )  # fmt: skip
    af, bf, step = _acc_operands(a, b)
    m = a.shape[0]
    da = torch.empty_like(af, memory_format=torch.contiguous_format)
    db = _db_buffer(bf, need_db)
    for i0 in range(0, m, step):
        i1 = min(m, i0 + step)
        s = _masked_logits(af[i0:i1], bf, scale, i0, offset, exclude_pos)
        # two chunk buffers: s (turned into the row term in place) and the column term
        e = torch.sub(s, col_lse[None, :]).exp_().mul_(g_col[None, :]) if cols else None
        w = s.sub_(row_lse[i0:i1, None]).exp_().mul_(g_row[i0:i1, None])
        if e is not None:
            w.add_(e)
            del e
        if exclude_pos:  # exp(-inf - (-inf)) on an all-excluded row would be nan
            w.diagonal(i0 + offset).zero_()
        da[i0:i1] = torch.mm(w, bf)
        if need_db:
            db.addmm_(w.t(), af[i0:i1])
    return da, db, (af * da).sum()


def _db_buffer(bf: torch.Tensor, need_db: bool) -> torch.Tensor:
    """db_raw, accumulated over row chunks: [N, D] zeros, or [0, D] without need_db."""
    if not need_db:
        return bf.new_zeros(0, bf.shape[1])
    return torch.zeros_like(bf, memory_format=torch.contiguous_format)


def _scaled(s: torch.Tensor, scale: torch.Tensor, diag: int, exclude: bool) -> torch.Tensor:
    """scale * s (broadcast), excluded diagonal `diag` -inf: one rounding per logit, the same in
    forward and backward (docs/math.md §3)."""
    l = s * scale
    if exclude:
        l.diagonal(diag).fill_(float("-inf"))
    return l


def _torch_fwd_vec(a, b, rs, cs, offset: int, exclude_pos: bool, cols: bool):
    """Vector mode: r_i = LSE_j rs_i s_ij, c_j = LSE_i cs_j s_ij (module docstring)."""
    af, bf, step = _acc_operands(a, b)
    m = a.shape[0]
    row, col = _lse_buffers(af, b.shape[0], cols)
    for i0 in range(0, m, step):
        i1 = min(m, i0 + step)
        s = torch.mm(af[i0:i1], bf.t())
        row[i0:i1] = torch.logsumexp(_scaled(s, rs[i0:i1, None], i0 + offset, exclude_pos), 1)
        if cols:
            lc = _scaled(s, cs[None, :], i0 + offset, exclude_pos)
            col = torch.logaddexp(col, torch.logsumexp(lc, dim=0))
    return row, col


def _torch_bwd_vec(
    a, b, rs, cs, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols, need_db=True
):
    """Vector mode: (dA, dB, cat(drs, dcs)) with the scales inside W (module docstring)."""
    af, bf, step = _acc_operands(a, b)
    m, n = a.shape[0], b.shape[0]
    da = torch.empty_like(af, memory_format=torch.contiguous_format)
    db = _db_buffer(bf, need_db)
    drs = torch.empty(m, dtype=af.dtype, device=a.device)
    dcs = torch.zeros(n if cols else 0, dtype=af.dtype, device=a.device)
    gc_cs = (g_col * cs)[None, :] if cols else None
    for i0 in range(0, m, step):
        i1 = min(m, i0 + step)
        k = i0 + offset
        s = torch.mm(af[i0:i1], bf.t())
        # three chunk buffers: s, p^r (turned into W in place) and p^c
        w = _scaled(s, rs[i0:i1, None], k, exclude_pos).sub_(row_lse[i0:i1, None]).exp_()
        if exclude_pos:  # exp(-inf - (-inf)) on an all-excluded row would be nan
            w.diagonal(k).zero_()
        drs[i0:i1] = g_row[i0:i1] * torch.einsum("ij,ij->i", w, s)
        w.mul_((g_row[i0:i1] * rs[i0:i1])[:, None])
        if cols:
            pc = _scaled(s, cs[None, :], k, exclude_pos).sub_(col_lse[None, :]).exp_()
            if exclude_pos:
                pc.diagonal(k).zero_()
            dcs.add_(torch.einsum("ij,ij->j", pc, s))
            w.add_(pc.mul_(gc_cs))
            del pc
        da[i0:i1] = torch.mm(w, bf)
        if need_db:
            db.addmm_(w.t(), af[i0:i1])
    return da, db, torch.cat([drs, dcs * g_col]) if cols else drs


def _reference_impls():
    from gammacl.reference.simlse import simlse as ref_fwd
    from gammacl.reference.simlse import simlse_backward as ref_bwd

    def fwd(a, b, scale, offset, exclude_pos, cols, col_scale=None):
        return ref_fwd(
            a,
            b,
            scale,
            offset=offset,
            exclude_pos=exclude_pos,
            cols=cols,
            upcast=False,
            col_scale=col_scale,
        )

    def bwd(
        a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols, col_scale=None,
        need_db=True,
    ):  # fmt: skip
        out = ref_bwd(
            a,
            b,
            scale,
            row_lse,
            col_lse,
            g_row,
            g_col,
            offset=offset,
            exclude_pos=exclude_pos,
            cols=cols,
            upcast=False,
            col_scale=col_scale,
        )
        if scale.dim() == 1:
            da, db, ds = out
        else:
            (da, db), ds = out, (a * out[0]).sum()
        return da, db if need_db else db[:0], ds

    return fwd, bwd


@compiled_fake("gammacl::simlse_fwd")
def _compiled_fwd_fake(a, b, scale, offset, exclude_pos, cols, col_scale=None):
    """Shapes of the compiled fwd (cpp / cuda): (row_lse [M], col_lse [N or 0])."""
    acc = acc_dtype(a.dtype)
    return a.new_empty((a.shape[0],), dtype=acc), a.new_empty(
        (b.shape[0] if cols else 0,), dtype=acc
    )


@compiled_fake("gammacl::simlse_bwd")
def _compiled_bwd_fake(
    a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols, col_scale=None,
    need_db=True,
):  # fmt: skip
    """Shapes of the compiled bwd: (da_raw, db_raw ([0, D] without need_db), dscale_raw),
    dscale_raw 0-d, or with vector scales (scale [M]) cat(drs [M], dcs [N or 0])."""
    acc = acc_dtype(a.dtype)
    ds = () if scale.dim() == 0 else (a.shape[0] + (b.shape[0] if cols else 0),)
    return (
        a.new_empty(a.shape, dtype=acc),
        b.new_empty(b.shape if need_db else (0, b.shape[1]), dtype=acc),
        a.new_empty(ds, dtype=acc),
    )


# The dispatch seam of this op: backend name -> (fwd, bwd) of the contract above.
_IMPLS = Backends(
    "simlse",
    reference=_reference_impls,
    torch=lambda: (torch_fwd, torch_bwd),
    triton=kernel("simlse", "simlse_fwd", "simlse_bwd"),
    **compiled("simlse_fwd", "simlse_bwd"),
)


def _backend_impl(name: str, device: torch.device | None = None):
    """(fwd, bwd) of a backend; `auto` needs the device (callers normally pass a resolved name)."""
    if name == "auto" and device is not None:
        from gammacl.dispatch import resolve_backend

        name = resolve_backend(name, device)
    return _IMPLS(name)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_scales(a, b, scale, col_scale, cols: bool):
    """Metadata checks of the scale arguments (no host sync); the col_scale the backends see
    (None unless vector mode with cols)."""
    acc = acc_dtype(a.dtype)
    if scale.dim() == 0:
        if col_scale is not None:
            raise ValueError(
                "simlse: col_scale needs a vector scale of shape [M] (per-row scales), got a 0-d "
                f"scale and col_scale of shape {tuple(col_scale.shape)}"
            )
        return None
    m, n = a.shape[0], b.shape[0]
    vecs = (("scale", scale, m), ("col_scale", col_scale, n)) if cols else (("scale", scale, m),)
    for name, v, k in vecs:
        if v is None:
            raise ValueError(
                f"simlse: a vector scale with cols=True needs col_scale of shape [{n}]"
            )
        if tuple(v.shape) != (k,):
            raise ValueError(
                f"simlse: {name} must be 0-d or have shape [{k}] for a [{m}, D] x [{n}, D] op, got "
                f"shape {tuple(v.shape)}"
            )
        if v.dtype != acc or v.device != a.device:
            raise ValueError(
                f"simlse: {name} must be {acc} on {a.device} (the accumulation dtype of "
                f"{a.dtype} features), got {v.dtype} on {v.device}"
            )
    return col_scale.contiguous() if cols else None


# The op is a torch.library custom op so torch.compile(fullgraph=True) sees one opaque node (no
# graph break) and opcheck can test its schema, fake (meta) function and autograd registration.
@torch.library.custom_op("gammacl::simlse", mutates_args=())
def simlse(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    offset: int = 0,
    exclude_pos: bool = False,
    cols: bool = True,
    backend: str = "torch",
    col_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_lse [M], col_lse [N] or [0]) of the scaled a @ b.T (module docstring),
    differentiable to a, b and the scales. `scale`: 0-d (one scale t for every entry, the
    accumulation dtype, gammacl._validate.as_scale), or [M] per-row scales rs for the row LSE;
    then `col_scale` [N] holds the per-column scales cs of the column LSE (needed when cols,
    ignored otherwise). Vector scales are accumulation-dtype tensors on the features' device.
    `backend` is a concrete name (the losses resolve it once at their public boundary); the
    features are validated there too. Autocast is off inside: statistics stay in the
    accumulation dtype."""
    fwd, _ = _backend_impl(backend, a.device)
    a, b = _last_dim_contiguous(a), _last_dim_contiguous(b)
    with torch.autocast(a.device.type, enabled=False):
        if scale.dim() == 0 and col_scale is None:
            return fwd(a, b, scale, offset, exclude_pos, cols)
        cs = _check_scales(a, b, scale, col_scale, cols)
        return fwd(a, b, scale.contiguous(), offset, exclude_pos, cols, cs)


@simlse.register_fake
def _(a, b, scale, offset=0, exclude_pos=False, cols=True, backend="torch", col_scale=None):
    acc = acc_dtype(a.dtype)
    _check_scales(a, b, scale, col_scale, cols)
    return a.new_empty(a.shape[0], dtype=acc), a.new_empty(b.shape[0] if cols else 0, dtype=acc)


@torch.library.custom_op("gammacl::simlse_backward", mutates_args=())
def _simlse_backward_op(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    g_row: torch.Tensor,
    g_col: torch.Tensor,
    offset: int,
    exclude_pos: bool,
    cols: bool,
    backend: str,
    col_scale: torch.Tensor | None = None,
    need_db: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backend's bwd (module docstring): (da_raw, db_raw, dscale_raw = sum_ij W_ij
    <a_i, b_j>) with a 0-d scale; (dA, dB, cat(drs, dcs)) with vector scales (col_scale given
    when cols). need_db=False: db_raw is [0, D] and its GEMM is skipped (2 N M D FLOPs)."""
    _, bwd = _backend_impl(backend, a.device)
    a, b = _last_dim_contiguous(a), _last_dim_contiguous(b)
    args = (a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols)
    with torch.autocast(a.device.type, enabled=False):
        if not need_db:
            return bwd(*args, col_scale, False)
        return bwd(*args) if scale.dim() == 0 else bwd(*args, col_scale)


@_simlse_backward_op.register_fake
def _(
    a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols, backend, col_scale=None,
    need_db=True,
):  # fmt: skip
    args = (a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols, col_scale)
    return _compiled_bwd_fake(*args, need_db)  # the same shapes on every backend


def _setup_context(ctx, inputs, output):
    # arguments equal to their schema default may arrive stripped
    a, b, scale, *rest = inputs
    offset, exclude_pos, cols, backend, col_scale = (
        *rest,
        *(0, False, True, "torch", None)[len(rest) :],
    )
    row, col = output
    ctx.save_for_backward(a, b, scale, row, col, col_scale if cols else None)
    ctx.args = (offset, exclude_pos, cols, backend)


def _backward(ctx, g_row, g_col):
    a, b, scale, row, col, col_scale = ctx.saved_tensors
    offset, exclude_pos, cols, backend = ctx.args
    acc = row.dtype
    g_row = torch.zeros_like(row) if g_row is None else g_row.to(acc).contiguous()
    if cols:
        g_col = torch.zeros_like(col) if g_col is None else g_col.to(acc).contiguous()
    else:
        g_col = row.new_zeros(0)
    need_a, need_b, need_s = ctx.needs_input_grad[:3]
    if scale.dim() == 0:
        da_raw, db_raw, ds_raw = _simlse_backward_op(
            a, b, scale, row, col, g_row, g_col, offset, exclude_pos, cols, backend, None, need_b
        )
        da = (da_raw * scale).to(a.dtype) if need_a else None
        db = (db_raw * scale).to(b.dtype) if need_b else None
        ds = ds_raw if need_s else None
        return da, db, ds, None, None, None, None, None
    # vector scales: the backend's dA, dB carry the scales inside W (module docstring)
    da, db, ds_raw = _simlse_backward_op(
        a,
        b,
        scale.contiguous(),
        row,
        col,
        g_row,
        g_col,
        offset,
        exclude_pos,
        cols,
        backend,
        col_scale.contiguous() if cols else None,
        need_b,
    )
    m = a.shape[0]
    ds = ds_raw[:m] if need_s else None
    dcs = ds_raw[m:] if cols and ctx.needs_input_grad[7] else None
    return (
        da.to(a.dtype) if need_a else None,
        db.to(b.dtype) if need_b else None,
        ds,
        None,
        None,
        None,
        None,
        dcs,
    )


simlse.register_autograd(_backward, setup_context=_setup_context)
