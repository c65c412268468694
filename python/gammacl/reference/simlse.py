"""Reference of the simlse op (materialised N x M logits): forward and backward.

Scalar mode (`scale` 0-d): one logit matrix l_ij = t s_ij for both LSEs. Vector mode (`scale` [M]
row scales rs, `col_scale` [N] column scales cs): the row LSE reads l^r_ij = rs_i s_ij and the
column LSE l^c_ij = cs_j s_ij (gammacl.ops.simlse, docs/math.md §1)."""

from __future__ import annotations

import torch

from gammacl._validate import acc_dtype
from gammacl.reference.clip import _scale


def _sims(a, b, upcast):
    """(S = a @ b.T, dtype of the statistics): fp64 with `upcast`, else the GEMM in the inputs'
    dtype and statistics in the accumulation dtype."""
    if upcast:
        dt = torch.float64
        return a.to(dt) @ b.to(dt).t(), dt
    dt = acc_dtype(a.dtype)
    return (a @ b.t()).to(dt), dt


def _mask(l, offset, exclude_pos):
    if not exclude_pos:
        return l
    m, n = l.shape
    i = torch.arange(m, device=l.device)
    j = i + offset
    ok = (j >= 0) & (j < n)
    mask = torch.zeros(m, n, dtype=torch.bool, device=l.device)
    mask[i[ok], j[ok]] = True
    return l.masked_fill(mask, float("-inf"))


def _is_vector(scale) -> bool:
    return isinstance(scale, torch.Tensor) and scale.dim() == 1


def _logits_rc(a, b, scale, col_scale, offset, exclude_pos, upcast):
    """(S, row logits, column logits), the excluded entries -inf in both logit matrices."""
    s, dt = _sims(a, b, upcast)
    if _is_vector(scale):
        lr = scale.to(dt)[:, None] * s
        lc = col_scale.to(dt)[None, :] * s if col_scale is not None else None
    else:
        lr = lc = _scale(scale, a, dt) * s
    lr = _mask(lr, offset, exclude_pos)
    lc = lr if lc is lr else (None if lc is None else _mask(lc, offset, exclude_pos))
    return s, lr, lc


def _logits(a, b, scale, offset, exclude_pos, upcast):
    """Scalar-mode logits scale * a @ b.T (excluded entries -inf)."""
    return _logits_rc(a, b, scale, None, offset, exclude_pos, upcast)[1]


def simlse(
    a, b, scale, *, offset=0, exclude_pos=False, cols=True, upcast: bool = True, col_scale=None
):
    """Row / column LSE of the scaled a @ b.T with entries (i, i+offset) excluded on request:
    r_i = LSE_j rs_i s_ij, c_j = LSE_i cs_j s_ij (rs = cs = scale when `scale` is 0-d; a [M]
    `scale` is the row scale and `col_scale` [N] the column scale, needed when cols)."""
    if _is_vector(scale) and cols and col_scale is None:
        raise ValueError("simlse: a vector scale with cols=True needs col_scale [N]")
    _, lr, lc = _logits_rc(a, b, scale, col_scale, offset, exclude_pos, upcast)
    row = torch.logsumexp(lr, dim=1)
    col = torch.logsumexp(lc, dim=0) if cols else lr.new_zeros(0)
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
    col_scale=None,
):
    """The simlse backward contract (gammacl.ops.simlse), 0 on excluded entries.
    Scalar mode: (da_raw, db_raw) = (W @ b, W^T @ a), W_ij = g_row_i e^{l_ij - row_i} + [cols]
    g_col_j e^{l_ij - col_j}.
    Vector mode: (dA, dB, dscale) with the scales inside W: W_ij = g_row_i rs_i p^r_ij + [cols]
    g_col_j cs_j p^c_ij, dA = W @ b, dB = W^T @ a, dscale = cat(drs [M], dcs [N or 0]),
    drs_i = g_row_i sum_j p^r_ij s_ij, dcs_j = g_col_j sum_i p^c_ij s_ij,
    p^r_ij = e^{rs_i s_ij - row_i}, p^c_ij = e^{cs_j s_ij - col_j}."""
    vec = _is_vector(scale)
    s, lr, lc = _logits_rc(a, b, scale, col_scale if cols else None, offset, exclude_pos, upcast)
    dt = s.dtype
    finite = lambda x: torch.where(torch.isfinite(x), x, 0.0).to(dt)  # noqa: E731
    excluded = lr == float("-inf")
    pr = torch.where(excluded, 0.0, torch.exp(lr - finite(row_lse)[:, None]))
    w = g_row.to(dt)[:, None] * pr
    ds = []
    if vec:
        ds.append(g_row.to(dt) * (pr * s).sum(dim=1))
        w = w * scale.to(dt)[:, None]
    if cols:
        pc = torch.where(lc == float("-inf"), 0.0, torch.exp(lc - finite(col_lse)[None, :]))
        wc = g_col.to(dt)[None, :] * pc
        if vec:
            ds.append(g_col.to(dt) * (pc * s).sum(dim=0))
            wc = wc * col_scale.to(dt)[None, :]
        w = w + wc
    if vec:
        return w @ b.to(dt), w.t() @ a.to(dt), torch.cat(ds)
    return w @ b.to(dt), w.t() @ a.to(dt)
