"""Reference symmetric CLIP loss and one-directional InfoNCE (materialised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.float64 if upcast else x.dtype


def _scale(logit_scale, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.reshape(()).to(dtype)
    return torch.tensor(float(logit_scale), dtype=dtype, device=like.device)


def logits(a, b, logit_scale, *, logit_bias=None, upcast: bool = True) -> torch.Tensor:
    """l = logit_scale * a @ b.T (+ logit_bias), as open_clip computes it."""
    dt = _dtype(a, upcast)
    out = _scale(logit_scale, a, dt) * (a.to(dt) @ b.to(dt).t())
    if logit_bias is not None:
        out = (
            out + logit_bias.reshape(()).to(dt)
            if isinstance(logit_bias, torch.Tensor)
            else (out + float(logit_bias))
        )
    return out


def _ce(l: torch.Tensor, target: torch.Tensor, reduction: str, label_smoothing: float):
    # F.cross_entropy has no bf16/fp16 CPU kernels for every op; upcast to fp32 in that case only.
    if l.dtype in (torch.float16, torch.bfloat16) and l.device.type == "cpu":
        l = l.float()
    return F.cross_entropy(l, target, reduction=reduction, label_smoothing=label_smoothing)


def infonce_loss(
    queries,
    keys,
    logit_scale,
    *,
    labels=None,
    reduction="mean",
    label_smoothing=0.0,
    logit_bias=None,
    upcast: bool = True,
) -> torch.Tensor:
    """One-directional InfoNCE: cross_entropy(scale * q @ k.T, labels), labels default arange(M)."""
    l = logits(queries, keys, logit_scale, logit_bias=logit_bias, upcast=upcast)
    if labels is None:
        labels = torch.arange(l.shape[0], device=l.device)
    return _ce(l, labels, reduction, label_smoothing)


def clip_loss(
    image_features,
    text_features,
    logit_scale,
    *,
    labels=None,
    reduction="mean",
    label_smoothing=0.0,
    logit_bias=None,
    upcast: bool = True,
) -> torch.Tensor:
    """Symmetric CLIP loss = (CE(L, labels) + CE(L.T, labels^-1)) / 2, L = scale * I @ T.T.

    `labels` (a permutation) names image i's positive text; the text direction uses the inverse
    permutation. reduction="none" returns the per-pair loss (row i and its positive column)/2.
    """
    l = logits(image_features, text_features, logit_scale, logit_bias=logit_bias, upcast=upcast)
    n = l.shape[0]
    if labels is None:
        labels = torch.arange(n, device=l.device)
    inv = torch.empty_like(labels)
    inv[labels] = torch.arange(n, device=l.device)
    rows = _ce(l, labels, "none", label_smoothing)
    cols = _ce(l.t(), inv, "none", label_smoothing)
    pair = 0.5 * (rows + cols[labels])
    if reduction == "mean":
        return pair.mean()
    if reduction == "sum":
        return pair.sum()
    return pair
