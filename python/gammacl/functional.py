"""Functional contrastive losses built on the simlse op (gammacl.ops.simlse).

With r_i = LSE_j l_ij and c_j = LSE_i l_ij from one fused sweep, every loss here is O(N*D):
    row loss_i = r_i - (1 - eps) * l_{i,p_i} - eps * mean_j l_ij          (F.cross_entropy with
    col loss_j = c_j - (1 - eps) * l_{q_j,j} - eps * mean_i l_ij           label_smoothing eps)
with l_{i,p} = scale * <a_i, b_p> (a row-wise dot) and mean_j l_ij = scale * <a_i, mean_j b_j>.
Autograd carries these O(N*D) terms; simlse's backward carries the N^2 softmax part.
"""

from __future__ import annotations

import torch

from gammacl import _validate as V
from gammacl.dispatch import resolve_backend
from gammacl.ops.simlse import simlse


def _nan_if_not_finite(per: torch.Tensor) -> torch.Tensor:
    """inf - inf gives NaN in the materialised loss but our LSE form can return +-inf for
    non-finite inputs; map those to NaN so a non-finite input never yields a number."""
    return torch.where(torch.isfinite(per), per, torch.full_like(per, float("nan")))


def _reduce(per: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per


def _pos_logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale * <a_i, b_i> in the accumulation dtype (a, b already row-aligned)."""
    acc = V.acc_dtype(a.dtype)
    return scale * (a.to(acc) * b.to(acc)).sum(dim=1)


def _smooth_term(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """mean_j l_ij = scale * <a_i, mean_j b_j>."""
    acc = V.acc_dtype(a.dtype)
    return scale * (a.to(acc) @ b.to(acc).mean(dim=0))


def no_autocast(x: torch.Tensor):
    """Our statistics are fp32 whatever autocast says: the GEMMs inside the losses must not be
    recast to bf16/fp16 (inputs keep their own dtype; results come back fp32)."""
    return torch.autocast(x.device.type, enabled=False)


def infonce_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    offset: int = 0,
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-row InfoNCE losses of q (M x D) against k (N x D); row i's positive is labels[i], or
    column i + offset when labels is None. Inputs are assumed validated; `scale` is 0-d."""
    with no_autocast(q):
        return _infonce_rows(q, k, scale, labels, offset, label_smoothing, backend)


def _infonce_rows(q, k, scale, labels, offset, label_smoothing, backend):
    row, _ = simlse(q, k, scale, cols=False, backend=backend)
    pos_k = k[labels] if labels is not None else k[offset : offset + q.shape[0]]
    loss = row - (1.0 - label_smoothing) * _pos_logits(q, pos_k, scale)
    if label_smoothing:
        loss = loss - label_smoothing * _smooth_term(q, k, scale)
    if k.shape[0] == 1:  # one candidate, no negatives: exactly 0 (NaN/inf inputs still give NaN)
        loss = loss * 0.0
    return _nan_if_not_finite(loss)


def infonce_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """One-directional InfoNCE, cross_entropy(logit_scale * queries @ keys.T, labels), without
    forming the M x N matrix. labels default to arange(M) (needs M <= N). Returns fp32 (fp64 for
    fp64 inputs): a 0-d tensor, or [M] for reduction="none"."""
    V.check_pair("queries", queries, "keys", keys, same_batch=False)
    reduction = V.check_reduction(reduction)
    eps = V.check_label_smoothing(label_smoothing)
    scale = V.as_scale("logit_scale", logit_scale, queries)
    m, n = queries.shape[0], keys.shape[0]
    if labels is None:
        if m > n:
            raise ValueError(
                f"without labels row i's positive is key i, so queries ({m} rows) cannot "
                f"outnumber keys ({n} rows); pass labels"
            )
    else:
        labels = V.check_labels(labels, m, n, queries.device)
    name = resolve_backend(backend, queries.device)
    if name == "reference":
        from gammacl import reference

        return reference.infonce_loss(
            queries,
            keys,
            scale,
            labels=labels,
            reduction=reduction,
            label_smoothing=eps,
            upcast=False,
        ).to(scale.dtype)
    per = infonce_rows(queries, keys, scale, labels=labels, label_smoothing=eps, backend=name)
    return _reduce(per, reduction)


def clip_pairs(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-pair symmetric CLIP losses (validated inputs, 0-d scale): 0.5 * (row_i + col_{p_i})."""
    with no_autocast(image):
        return _clip_pairs(image, text, scale, labels, label_smoothing, backend)


def _clip_pairs(image, text, scale, labels, label_smoothing, backend):
    row, col = simlse(image, text, scale, cols=True, backend=backend)
    if labels is None:
        pos = _pos_logits(image, text, scale)
        per = 0.5 * (row + col) - (1.0 - label_smoothing) * pos
    else:
        pos = _pos_logits(image, text[labels], scale)
        per = 0.5 * (row + col[labels]) - (1.0 - label_smoothing) * pos
    if label_smoothing:
        smooth_rows = _smooth_term(image, text, scale)
        smooth_cols = _smooth_term(text, image, scale)
        if labels is not None:
            smooth_cols = smooth_cols[labels]
        per = per - 0.5 * label_smoothing * (smooth_rows + smooth_cols)
    if image.shape[0] == 1:  # one pair, no negatives: exactly 0 (NaN/inf inputs still give NaN)
        per = per * 0.0
    return _nan_if_not_finite(per)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) loss, (CE(L, labels) + CE(L.T, labels^-1)) / 2 with
    L = logit_scale * image_features @ text_features.T, never materialising L.

    labels (optional) is a permutation: image i's positive text. reduction="none" returns the
    per-pair losses [N]. Returns fp32 (fp64 for fp64 inputs). Features are not normalised here.
    """
    V.check_pair("image_features", image_features, "text_features", text_features, same_batch=True)
    reduction = V.check_reduction(reduction)
    eps = V.check_label_smoothing(label_smoothing)
    scale = V.as_scale("logit_scale", logit_scale, image_features)
    n = image_features.shape[0]
    if labels is not None:
        labels = V.check_labels(labels, n, n, image_features.device, permutation=True)
    name = resolve_backend(backend, image_features.device)
    if name == "reference":
        from gammacl import reference

        return reference.clip_loss(
            image_features,
            text_features,
            scale,
            labels=labels,
            reduction=reduction,
            label_smoothing=eps,
            upcast=False,
        ).to(scale.dtype)
    per = clip_pairs(
        image_features, text_features, scale, labels=labels, label_smoothing=eps, backend=name
    )
    return _reduce(per, reduction)
