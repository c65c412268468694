"""Reference of the simlse op (materialised N x M logits): forward and backward.

Scalar mode (`scale` 0-d): one logit matrix l_ij = t s_ij for both LSEs. Vector mode (`scale` [M]
row scales rs, `col_scale` [N] column scales cs): the row LSE reads l^r_ij = rs_i s_ij and the
column LSE l^c_ij = cs_j s_ij (gammacl.ops.simlse, docs/math.md §1.1)."""

from __future__ import annotations

import torch

from gammacl._validate import acc_dtype
from gammacl.reference.clip import _scale


def inf_lse_to_nan(lse: torch.Tensor) -> torch.Tensor:
    """NaN where the LSE is +inf (a set holding +inf: inf - inf in a materialised softmax)."""
    return lse.masked_fill(lse == float("inf"), float("nan"))


def _is_vector(scale) -> bool:
    return isinstance(scale, torch.Tensor) and scale.dim() == 1


def _logits_rc(a, b, scale, col_scale, offset, exclude_pos, upcast):
    """(S, row logits, column logits or None, excluded mask or None); excluded entries of both
    logit matrices are -inf (one matrix, twice, in scalar mode)."""
    # upcast: float64 throughout; else the accumulation dtype throughout (fp32 for 16-bit inputs,
    # GEMM included: a 16-bit S has ~3 digits, an error of ~10 at |l| = 1e4, docs/numerics.md)
    dt = torch.float64 if upcast else acc_dtype(a.dtype)
    s = a.to(dt) @ b.to(dt).t()
    if _is_vector(scale):
        lr = scale.to(dt)[:, None] * s
        lc = col_scale.to(dt)[None, :] * s if col_scale is not None else None
    else:
        lr = lc = _scale(scale, a, dt) * s
    if not exclude_pos:
        return s, lr, lc, None
    m, n = s.shape
    i = torch.arange(m, device=s.device)
    j = i + offset
    ok = (j >= 0) & (j < n)
    mask = torch.zeros(m, n, dtype=torch.bool, device=s.device)
    mask[i[ok], j[ok]] = True
    lr_m = lr.masked_fill(mask, float("-inf"))
    lc_m = lr_m if lc is lr else (None if lc is None else lc.masked_fill(mask, float("-inf")))
    return s, lr_m, lc_m, mask


def _logits(a, b, scale, offset, exclude_pos, upcast):
    """(l, excluded mask or None) of the scalar mode; excluded entries of l are -inf."""
    _, l, _, mask = _logits_rc(a, b, scale, None, offset, exclude_pos, upcast)
    return l, mask


def simlse(
    a, b, scale, *, offset=0, exclude_pos=False, cols=True, upcast: bool = True, col_scale=None
):
    """Row / column LSE of the scaled a @ b.T with entries (i, i+offset) excluded on request (NaN
    over a set holding +inf, as a materialised softmax's shift): r_i = LSE_j rs_i s_ij,
    c_j = LSE_i cs_j s_ij (rs = cs = scale when `scale` is 0-d; a [M] `scale` is the row scale
    and `col_scale` [N] the column scale, needed when cols)."""
    if _is_vector(scale) and cols and col_scale is None:
        raise ValueError("simlse: a vector scale with cols=True needs col_scale [N]")
    _, lr, lc, _ = _logits_rc(a, b, scale, col_scale, offset, exclude_pos, upcast)
    row = inf_lse_to_nan(torch.logsumexp(lr, dim=1))
    col = inf_lse_to_nan(torch.logsumexp(lc, dim=0)) if cols else lr.new_zeros(0)
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
    p^r_ij = e^{rs_i s_ij - row_i}, p^c_ij = e^{cs_j s_ij - col_j}.
    Every other entry is formed in IEEE arithmetic, g = 0 included: a NaN / inf logit or LSE
    gives NaN weights (0 * NaN = NaN), which reach the gradients as in a materialised loss."""
    vec = _is_vector(scale)
    cs = col_scale if cols else None
    s, lr, lc, excluded = _logits_rc(a, b, scale, cs, offset, exclude_pos, upcast)
    dt = s.dtype
    if not vec:  # only drs / dcs read S
        s = None

    # in place where possible: the N x M peak stays at 4 buffers (measure.memory's model)
    def weights(l, lse, g, sc, dim):  # g * sc * e^{l - lse}; an all-excluded row (-inf - -inf) -> 0
        p = torch.sub(l, lse).exp_()
        if excluded is not None:
            p.masked_fill_(excluded, 0.0)
        if vec:
            ds.append(g.to(dt) * (p * s).sum(dim=dim))
            p.mul_(sc)
        return p.mul_(g.to(dt)[:, None] if dim == 1 else g.to(dt)[None, :])

    ds: list[torch.Tensor] = []
    w = weights(lr, row_lse.to(dt)[:, None], g_row, scale.to(dt)[:, None] if vec else None, 1)
    if cols:
        pc = col_lse.to(dt)[None, :]
        w.add_(weights(lc, pc, g_col, cs.to(dt)[None, :] if vec else None, 0))
    if vec:
        return w @ b.to(dt), w.t() @ a.to(dt), torch.cat(ds)
    return w @ b.to(dt), w.t() @ a.to(dt)
