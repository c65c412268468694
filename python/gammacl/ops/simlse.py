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
"""

from __future__ import annotations

import os

import torch

from gammacl._validate import acc_dtype
from gammacl.ops._backends import Backends, compiled, kernel
from gammacl.reference.simlse import inf_lse_to_nan  # torch.logsumexp gives +inf, the others NaN

# torch backend chunk: rows per chunk chosen so one chunk x N fp32 buffer stays under this budget.
_CHUNK_BYTES = int(float(os.environ.get("GAMMACL_CHUNK_MIB", "32")) * 2**20)


def _chunk_rows(m: int, n: int, itemsize: int) -> int:
    return max(1, min(m, _CHUNK_BYTES // max(1, n * itemsize)))


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


def torch_fwd(a, b, scale, offset: int, exclude_pos: bool, cols: bool):
    acc = acc_dtype(a.dtype)
    m, n = a.shape[0], b.shape[0]
    af, bf = a.to(acc), b.to(acc)
    row = torch.empty(m, dtype=acc, device=a.device)
    col = torch.full((n if cols else 0,), float("-inf"), dtype=acc, device=a.device)
    step = _chunk_rows(m, n, 4 if acc == torch.float32 else 8)
    for i0 in range(0, m, step):
        s = _masked_logits(af[i0 : i0 + step], bf, scale, i0, offset, exclude_pos)
        row[i0 : i0 + step] = torch.logsumexp(s, dim=1)
        if cols:
            col = torch.logaddexp(col, torch.logsumexp(s, dim=0))
    return inf_lse_to_nan(row), inf_lse_to_nan(col)


def torch_bwd(
    a, b, scale, row_lse, col_lse, g_row, g_col, offset: int, exclude_pos: bool, cols: bool
):
    acc = acc_dtype(a.dtype)
    m, n = a.shape[0], b.shape[0]
    af, bf = a.to(acc), b.to(acc)
    da = torch.empty(m, a.shape[1], dtype=acc, device=a.device)
    db = torch.zeros(n, b.shape[1], dtype=acc, device=a.device)
    step = _chunk_rows(m, n, 4 if acc == torch.float32 else 8)
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
        db.addmm_(w.t(), af[i0:i1])
    return da, db, (af * da).sum()


def _reference_impls():
    from gammacl.reference.simlse import simlse as ref_fwd
    from gammacl.reference.simlse import simlse_backward as ref_bwd

    def fwd(a, b, scale, offset, exclude_pos, cols):
        return ref_fwd(a, b, scale, offset=offset, exclude_pos=exclude_pos, cols=cols, upcast=False)

    def bwd(a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols):
        da, db = ref_bwd(
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
        )
        return da, db, (a * da).sum()

    return fwd, bwd


# The dispatch seam of this op: backend name -> (fwd, bwd) of the contract above.
_IMPLS = Backends(
    "simlse",
    reference=_reference_impls,
    torch=lambda: (torch_fwd, torch_bwd),
    triton=kernel("simlse", "simlse_fwd", "simlse_bwd", dscale=True),
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_lse [M], col_lse [N] or [0]) of scale * a @ b.T (module docstring), differentiable to
    a, b and the 0-d scale (a 0-d accumulation-dtype tensor, gammacl._validate.as_scale).
    `backend` is a concrete name (the losses resolve it once at their public boundary); inputs
    are validated there too. Autocast is off inside: statistics stay in the accumulation dtype."""
    fwd, _ = _backend_impl(backend, a.device)
    with torch.autocast(a.device.type, enabled=False):
        return fwd(
            _last_dim_contiguous(a), _last_dim_contiguous(b), scale, offset, exclude_pos, cols
        )


@simlse.register_fake
def _(a, b, scale, offset=0, exclude_pos=False, cols=True, backend="torch"):
    acc = acc_dtype(a.dtype)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da_raw, db_raw, dscale_raw = sum_ij W_ij <a_i, b_j>): the backend's bwd (module
    docstring)."""
    _, bwd = _backend_impl(backend, a.device)
    a, b = _last_dim_contiguous(a), _last_dim_contiguous(b)
    with torch.autocast(a.device.type, enabled=False):
        return bwd(a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols)


@_simlse_backward_op.register_fake
def _(a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols, backend):
    acc = acc_dtype(a.dtype)
    return (
        a.new_empty(a.shape, dtype=acc),
        b.new_empty(b.shape, dtype=acc),
        a.new_empty((), dtype=acc),
    )


def _setup_context(ctx, inputs, output):
    # arguments equal to their schema default may arrive stripped
    a, b, scale, *rest = inputs
    offset, exclude_pos, cols, backend = (*rest, *(0, False, True, "torch")[len(rest) :])
    row, col = output
    ctx.save_for_backward(a, b, scale, row, col)
    ctx.args = (offset, exclude_pos, cols, backend)


def _backward(ctx, g_row, g_col):
    a, b, scale, row, col = ctx.saved_tensors
    offset, exclude_pos, cols, backend = ctx.args
    acc = row.dtype
    g_row = torch.zeros_like(row) if g_row is None else g_row.to(acc).contiguous()
    if cols:
        g_col = torch.zeros_like(col) if g_col is None else g_col.to(acc).contiguous()
    else:
        g_col = row.new_zeros(0)
    da_raw, db_raw, ds_raw = _simlse_backward_op(
        a, b, scale, row, col, g_row, g_col, offset, exclude_pos, cols, backend
    )
    need_a, need_b, need_s = ctx.needs_input_grad[:3]
    da = (da_raw * scale).to(a.dtype) if need_a else None
    db = (db_raw * scale).to(b.dtype) if need_b else None
    ds = ds_raw if need_s else None
    return da, db, ds, None, None, None, None


simlse.register_autograd(_backward, setup_context=_setup_context)
