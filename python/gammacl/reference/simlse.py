"""Reference of the simlse op (materialised N x M logits): forward and backward."""

from __future__ import annotations

import torch

from gammacl._validate import acc_dtype
from gammacl.reference.clip import _scale


def inf_lse_to_nan(lse: torch.Tensor) -> torch.Tensor:
    """NaN where the LSE is +inf (a set holding +inf: inf - inf in a materialised softmax)."""
    return lse.masked_fill(lse == float("inf"), float("nan"))


def _logits(a, b, scale, offset, exclude_pos, upcast):
    """(l, excluded mask or None); excluded entries of l are -inf."""
    # upcast: float64 throughout; else the accumulation dtype throughout (fp32 for 16-bit inputs,
    # GEMM included: a 16-bit S has ~3 digits, an error of ~10 at |l| = 1e4, docs/numerics.md)
    dt = torch.float64 if upcast else acc_dtype(a.dtype)
    l = _scale(scale, a, dt) * (a.to(dt) @ b.to(dt).t())
    if not exclude_pos:
        return l, None
    m, n = l.shape
    i = torch.arange(m, device=l.device)
    j = i + offset
    ok = (j >= 0) & (j < n)
    mask = torch.zeros(m, n, dtype=torch.bool, device=l.device)
    mask[i[ok], j[ok]] = True
    return l.masked_fill(mask, float("-inf")), mask


def simlse(a, b, scale, *, offset=0, exclude_pos=False, cols=True, upcast: bool = True):
    """Row / column LSE of scale * a @ b.T with entries (i, i+offset) excluded on request (NaN
    over a set holding +inf, as a materialised softmax's shift)."""
    l, _ = _logits(a, b, scale, offset, exclude_pos, upcast)
    row = inf_lse_to_nan(torch.logsumexp(l, dim=1))
    col = inf_lse_to_nan(torch.logsumexp(l, dim=0)) if cols else l.new_zeros(0)
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
    e^{l_ij - col_j}, 0 on excluded entries (the simlse backward contract, gammacl.ops.simlse).
    Every other entry is formed in IEEE arithmetic, g = 0 included: a NaN / inf logit or LSE
    gives NaN weights (0 * NaN = NaN), which reach the gradients as in a materialised loss."""
    l, excluded = _logits(a, b, scale, offset, exclude_pos, upcast)
    dt = l.dtype
    w = g_row.to(dt)[:, None] * torch.exp(l - row_lse.to(dt)[:, None])
    if cols:
        w = w + g_col.to(dt)[None, :] * torch.exp(l - col_lse.to(dt)[None, :])
    if excluded is not None:  # an all-excluded row: -inf - -inf, set to 0 like every excluded entry
        w = w.masked_fill(excluded, 0.0)
    return w @ b.to(dt), w.t() @ a.to(dt)
