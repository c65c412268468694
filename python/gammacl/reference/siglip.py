"""Reference SigLIP (pairwise sigmoid) loss and the siglip op, materialised (float64-capable).

open_clip's SigLipLoss: with l_ij = logit_scale * <a_i, b_j> + logit_bias and z_ij = +1 for the
positive pair (i, i + offset), -1 otherwise,
    loss = -(1/M) sum_ij log sigmoid(z_ij l_ij) = (1/M) sum_ij softplus(-z_ij l_ij),
normalised by the number of rows M (open_clip divides by the local batch size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gammacl._validate import acc_dtype


def _value(x, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.reshape(()).to(dtype)
    return torch.tensor(float(x), dtype=dtype, device=like.device)


def _signs(m: int, n: int, offset: int, device, dtype) -> torch.Tensor:
    """z [M, N]: +1 at (i, i + offset) (where in range), -1 elsewhere."""
    z = -torch.ones(m, n, dtype=dtype, device=device)
    z.diagonal(offset).fill_(1.0)
    return z


def _logits(a, b, logit_scale, logit_bias, upcast: bool):
    """(l, dtype of l): float64 throughout with upcast; else the accumulation dtype throughout,
    the GEMM included (fp32 for 16-bit inputs, as the simlse reference; docs/numerics.md)."""
    dt = torch.float64 if upcast else acc_dtype(a.dtype)
    s = a.to(dt) @ b.to(dt).t()
    return _value(logit_scale, a, dt) * s + _value(logit_bias, a, dt), dt


def siglip_loss(
    image_features, text_features, logit_scale, logit_bias, *, offset: int = 0, upcast: bool = True
) -> torch.Tensor:
    """open_clip's formula: -F.logsigmoid(z * l).sum() / M (module docstring)."""
    l, dt = _logits(image_features, text_features, logit_scale, logit_bias, upcast)
    z = _signs(l.shape[0], l.shape[1], offset, l.device, dt)
    return -F.logsigmoid(z * l).sum() / l.shape[0]


def siglip(a, b, scale, bias, offset: int = 0, *, upcast: bool = True):
    """Materialised siglip op (gammacl.ops.siglip): with y = -z * l,
        row_loss_i = sum_j softplus(y_ij),  W_ij = d softplus(y_ij) / d l_ij = -z_ij sigmoid(y_ij),
        row_wsum_i = sum_j W_ij,  row_wdot_i = sum_j W_ij s_ij,  da_raw = W @ b,  db_raw = W^T @ a.
    upcast=False: everything in the accumulation dtype, the three GEMMs included (fp32 for 16-bit
    inputs: backend="reference" is the materialised formula at fp32 precision, docs/numerics.md)."""
    l, dt = _logits(a, b, scale, bias, upcast)
    z = _signs(l.shape[0], l.shape[1], offset, l.device, dt)
    y = -z * l
    w = -z * torch.sigmoid(y)
    return (
        -F.logsigmoid(-y).sum(1),  # softplus(y), exact for any y (no threshold)
        w.sum(1),
        (w * (a.to(dt) @ b.to(dt).t())).sum(1),
        w @ b.to(dt),
        w.t() @ a.to(dt),
    )
