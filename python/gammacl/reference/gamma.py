"""Naive float64 reference of the gamma-weighted decomposable contrastive loss
(docs/math.md §A.2-A.5, §S, §K) and of its per-sample rate state. Every gamma / SogCLR test
compares against this file.

Objective (the "global" symmetric contrastive loss, positive EXCLUDED from the denominator):
    G = 1/2 mean_i [-l_ii + log Z_i] + 1/2 mean_j [-l_jj + log Z^T_j],   l = logit_scale * a @ b.T
    Z_i = mean_{j != i} e^{l_ij}   (over the whole data set; a batch gives the unbiased Zhat_i)
One step of stochastic EM on a batch of B pairs, with G_i ~ Gamma(a, 1) and rates R_i:
    loss = 1/2 mean_i [-l_ii + u_i Zhat_i] + 1/2 mean_j [-l_jj + v_j Zhat^T_j],  u_i = G_i / R_i
    Zhat_i = 1/(B-1) sum_{j != i} e^{l_ij}   =>   u_i Zhat_i = sum_{j != i} e^{l_ij + alpha_i},
    alpha_i = log G_i - log R_i - log(B-1)   (u, G, R carry no gradient)
    dloss/dl_ij = 1/(2B) (e^{l_ij + alpha_i} + e^{l_ij + alpha^T_j})  (i != j),  -1/B  (i == j)
With `clamp`, each exponent l_ij + alpha_i is capped at `clamp` in the value, and the gradient
uses the capped weight e^{min(l_ij + alpha_i, clamp)} (what the one-pass kernels compute).

Rate state (one table per direction, fp32, indexed by the data-set index):
    first visit  log R_k = log Zhat
    later        log R_k <- logaddexp(log(1 - ema) + log R_k, log(ema) + log Zhat)
Within one batch every position reads the table as it was before the batch; the value stored for
an index is that of its LAST position with a finite log Zhat; non-finite rows write nothing.
"""

from __future__ import annotations

import math

import torch

from gammacl._validate import acc_dtype
from gammacl.reference.clip import logits


def _dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.float64 if upcast else acc_dtype(x.dtype)


def _acc_logits(a, b, logit_scale, upcast: bool) -> torch.Tensor:
    """l in the accumulation dtype, GEMM included (fp32 for 16-bit inputs, docs/numerics.md)."""
    dt = _dtype(a, upcast)
    return logits(a.to(dt), b.to(dt), logit_scale, upcast=upcast)


def _diag_mask(m: int, n: int, offset: int, device) -> torch.Tensor:
    i = torch.arange(m, device=device)
    j = i + offset
    ok = (j >= 0) & (j < n)
    mask = torch.zeros(m, n, dtype=torch.bool, device=device)
    mask[i[ok], j[ok]] = True
    return mask


def log_zhat(image, text, logit_scale, *, upcast: bool = True):
    """(row, col): log mean_{j != i} e^{l_ij} and log mean_{i != j} e^{l_ij} of the batch."""
    b = image.shape[0]
    if b < 2:
        raise ValueError("log Zhat needs at least 2 pairs (B - 1 >= 1 negatives)")
    l = _acc_logits(image, text, logit_scale, upcast)
    l = l.masked_fill(_diag_mask(b, b, 0, l.device), float("-inf"))
    return (torch.logsumexp(l, 1) - math.log(b - 1), torch.logsumexp(l, 0) - math.log(b - 1))


def global_contrastive_loss(
    image, text, logit_scale, *, reduction: str = "mean", upcast: bool = True
):
    """The objective G evaluated on these pairs (per pair for reduction="none"): the batch
    InfoNCE with the positive left out of the denominator, both directions averaged."""
    l = _acc_logits(image, text, logit_scale, upcast)
    lr, lc = log_zhat(image, text, logit_scale, upcast=upcast)
    per = -torch.diagonal(l) + 0.5 * (lr + lc)
    return per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per


def _capped(x: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """min(x, clamp) in value with d/dx = 1 (so e^result has gradient weight e^{min(x, clamp)})."""
    if clamp is None:
        return x
    return torch.where(x > clamp, x - (x - clamp).detach(), x)


def gamma_onepass(
    a,
    b,
    scale,
    alpha_row,
    alpha_col,
    w_row: float,
    w_col: float,
    clamp: float,
    offset: int = 0,
    *,
    upcast: bool = True,
):
    """Materialised gamma_onepass op (gammacl.ops.gamma_onepass): with l = scale * a @ b.T and the
    entries (i, i+offset) excluded,
        row_lse_i = LSE_{j} l_ij,  col_lse_j = LSE_i l_ij,
        row_term_i = sum_j e^{min(l_ij + alpha_row_i, clamp)},  col_term_j likewise (alpha_col_j),
        W_ij = w_row e^{min(l_ij + alpha_row_i, clamp)} + w_col e^{min(l_ij + alpha_col_j, clamp)},
        da_raw = W @ b,  db_raw = W^T @ a."""
    dt = _dtype(a, upcast)
    l = _acc_logits(a, b, scale, upcast)
    l = l.masked_fill(_diag_mask(l.shape[0], l.shape[1], offset, l.device), float("-inf"))
    er = torch.exp((l + alpha_row.to(dt)[:, None]).clamp_max(clamp))
    ec = torch.exp((l + alpha_col.to(dt)[None, :]).clamp_max(clamp))
    w = w_row * er + w_col * ec
    return (
        torch.logsumexp(l, 1),
        torch.logsumexp(l, 0),
        er.sum(1),
        ec.sum(0),
        w @ b.to(dt),
        w.t() @ a.to(dt),
    )


def gamma_step_loss(
    image, text, logit_scale, log_g, log_rate, *, clamp: float | None = None, upcast: bool = True
):
    """One stochastic-EM step's loss for given draws log_g [2, B] and rates log_rate [2, B]
    (row 0: image anchors / rows of l, row 1: text anchors / columns); both detached."""
    dt = _dtype(image, upcast)
    b = image.shape[0]
    l = _acc_logits(image, text, logit_scale, upcast)
    neg = l.masked_fill(_diag_mask(b, b, 0, l.device), float("-inf"))  # e^{-inf} = 0, grad 0
    alpha = (log_g.to(dt) - log_rate.to(dt)).detach() - math.log(b - 1)
    er = torch.exp(_capped(neg + alpha[0][:, None], clamp))
    ec = torch.exp(_capped(neg + alpha[1][None, :], clamp))
    return -torch.diagonal(l).mean() + 0.5 * (er.sum(1).mean() + ec.sum(0).mean())


def update_log_rate(log_rate, visited, index, log_zhat, ema: float):
    """Sequential reference of the state update (module docstring). Returns
    (new_log_rate, new_visited, updated) with `updated[p]` the update-before-use log-rate of
    position p (computed from the table as it was before the batch, in log_zhat's dtype)."""
    new_rate, new_vis = log_rate.clone(), visited.clone()
    updated = torch.empty_like(log_zhat)
    keep = math.log1p(-ema) if ema < 1.0 else float("-inf")
    for p, k in enumerate(index.tolist()):
        lz = log_zhat[p]
        if bool(visited[k]):
            old = log_rate[k].to(lz.dtype)
            updated[p] = torch.logaddexp(old + keep, lz + math.log(ema))
        else:
            updated[p] = lz
        if bool(torch.isfinite(lz)):
            new_rate[k] = updated[p].to(log_rate.dtype)
            new_vis[k] = True
    return new_rate, new_vis, updated


def gamma_clip_step(
    image,
    text,
    logit_scale,
    index,
    log_g,
    state,
    *,
    ema: float,
    update: str = "before",
    clamp: float | None = None,
    upcast: bool = True,
):
    """One full step of GammaClipLoss(rate="ema"): state = ((log_rate_img, visited_img),
    (log_rate_txt, visited_txt)). update="before": update with this batch's log Zhat, then use;
    update="after": use the stored rate (this batch's log Zhat on a first visit), then update.
    Returns (loss, new_state)."""
    lz = torch.stack(log_zhat(image, text, logit_scale, upcast=upcast)).detach()
    used, new_state = [], []
    for d in range(2):
        rate, vis = state[d]
        new_rate, new_vis, upd = update_log_rate(rate, vis, index, lz[d], ema)
        if update == "before":
            used.append(upd)
        else:
            used.append(torch.where(vis[index], rate[index].to(lz.dtype), lz[d]))
        new_state.append((new_rate, new_vis))
    loss = gamma_step_loss(
        image, text, logit_scale, log_g, torch.stack(used), clamp=clamp, upcast=upcast
    )
    return loss, tuple(new_state)
