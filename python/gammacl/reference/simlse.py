"""Reference of the simlse op (materialised N x M logits): forward and backward."""

from __future__ import annotations

import torch

from gammacl._validate import acc_dtype
from gammacl.reference.clip import _scale


def _logits(a, b, scale, offset, exclude_pos, upcast):
    if upcast:
        dt = torch.float64
        l = _scale(scale, a, dt) * (a.to(dt) @ b.to(dt).t())
    else:  # the GEMM in the inputs' dtype, statistics in the accumulation dtype
        dt = acc_dtype(a.dtype)
        l = _scale(scale, a, dt) * (a @ b.t()).to(dt)
    if exclude_pos:
        m, n = l.shape
        i = torch.arange(m, device=l.device)
        j = i + offset
        ok = (j >= 0) & (j < n)
        mask = torch.zeros(m, n, dtype=torch.bool, device=l.device)
        mask[i[ok], j[ok]] = True
        l = l.masked_fill(mask, float("-inf"))
    return l


def simlse(a, b, scale, *, offset=0, exclude_pos=False, cols=True, upcast: bool = True):
    """Row / column LSE of scale * a @ b.T with entries (i, i+offset) excluded on request."""
    l = _logits(a, b, scale, offset, exclude_pos, upcast)
    row = torch.logsumexp(l, dim=1)
    col = torch.logsumexp(l, dim=0) if cols else l.new_zeros(0)
    return row, col


def simlse_backward(
    a,
    b,
    scale,
    row_lse,
    col_lse,
    g_row,
    g_col,
    *,
    offset=0,
    exclude_pos=False,
    cols=True,
    upcast: bool = True,
):
    """(da_raw, db_raw) = (W @ b, W^T @ a), W_ij = g_row_i e^{l_ij - row_i} + [cols] g_col_j
    e^{l_ij - col_j}, 0 on excluded entries (the simlse backward contract, gammacl.ops.simlse)."""
    l = _logits(a, b, scale, offset, exclude_pos, upcast)
    dt = l.dtype
    finite = lambda x: torch.where(torch.isfinite(x), x, 0.0).to(dt)  # noqa: E731
    w = g_row.to(dt)[:, None] * torch.exp(l - finite(row_lse)[:, None])
    if cols:
        w = w + g_col.to(dt)[None, :] * torch.exp(l - finite(col_lse)[None, :])
    w = torch.where(l == float("-inf"), 0.0, w)
    return w @ b.to(dt), w.t() @ a.to(dt)
