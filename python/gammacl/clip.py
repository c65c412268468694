"""The CLIP / InfoNCE family: functional losses, the open_clip drop-in `ClipLoss`, and the one
CLIP step that serves a single process and torch.distributed alike (gammacl.distributed.World).

Every loss here is O(N*D) algebra on the simlse op (gammacl.ops.simlse), which carries the N^2
work: with r_i = LSE_j l_ij and c_j = LSE_i l_ij from one fused sweep,
    row loss_i = r_i - (1 - eps) * l_{i,p_i} - eps * mean_j l_ij          (F.cross_entropy with
    col loss_j = c_j - (1 - eps) * l_{q_j,j} - eps * mean_i l_ij           label_smoothing eps)
with l_{i,p} = scale * <a_i, b_p> (a row-wise dot) and mean_j l_ij = scale * <a_i, mean_j b_j>.
Autograd carries these O(N*D) terms; simlse's backward carries the N^2 softmax part.

Distributed CLIP, open_clip semantics (``gather_features`` + ``ClipLoss``), W ranks of n rows,
rank r holding rows [r*n, (r+1)*n) of the global batch (I = image, T = text, s = logit_scale):
    local_loss=True:   loss_r = 1/2 [ mean_i CE(s I_r T_all^T, i + r n)
                                  + mean_i CE(s T_r I_all^T, i + r n) ]
                       -- two simlse sweeps of n x Wn (infonce_rows with offset = r n);
    local_loss=False:  loss_r = the full global CLIP loss on (I_all, T_all)   (Wn x Wn, one sweep).
gather_with_grad=True: an autograd all-gather (its backward sums every rank's gradient for the
slice); False: a plain all-gather, and with local_loss=False the local tensor is put back at slot
r so the local rows keep their gradient (with local_loss=True nothing is put back) -- exactly
open_clip. Gradient each rank receives (L = the single-process loss on the global batch):
    local_loss  + gather_with_grad : dI_r = W dL/dI_r
    !local_loss + gather_with_grad : dI_r = W dL/dI_r    (open_clip issue #616)
    !local_loss + !gather_with_grad: dI_r =   dL/dI_r    (only the local slot has a gradient)
    local_loss  + !gather_with_grad: dI_r = query-side part of d loss_r / dI_r only
and ds = d loss_r / ds on each rank. DDP averages parameter gradients over ranks, so the two
gather_with_grad settings train with the global-batch gradient, !local_loss + !gather_with_grad
with 1/W of it. A world of one is the single-process loss (every gather the identity).
"""

from __future__ import annotations

import torch
from torch import nn

from gammacl import _validate as V
from gammacl._local_grad import local_pair_lse
from gammacl._openclip import OpenClipCompat, agree_pair
from gammacl.dispatch import resolve_backend
from gammacl.distributed import World, check_grad_comm
from gammacl.ops.simlse import simlse


def _nan_if_not_finite(per: torch.Tensor) -> torch.Tensor:
    """inf - inf gives NaN in the materialised loss but our LSE form can return +-inf for
    non-finite inputs; map those to NaN so a non-finite input never yields a number.
    per + (per - per) is per where finite and NaN elsewhere, and passes the upstream gradient
    through unchanged (g + g - g, exact): a torch.where would give the non-finite entries a
    zero gradient, and a non-finite feature must reach the feature gradients as NaN, as in a
    materialised cross-entropy (docs/numerics.md)."""
    return per + (per - per)


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
    # elementwise, not a matrix-vector product: autocast leaves it in the accumulation dtype
    return scale * (a.to(acc) * b.to(acc).mean(dim=0)).sum(dim=1)


def no_autocast(x: torch.Tensor):
    """Autocast off for a loss's own GEMMs (gammacl.modality's Grams): statistics are fp32 whatever
    autocast says (inputs keep their own dtype). The ops switch it off inside themselves; the
    CLIP terms here are elementwise, which autocast leaves alone."""
    return torch.autocast(x.device.type, enabled=False)


def _checked(
    rows: tuple[str, torch.Tensor],
    cols: tuple[str, torch.Tensor],
    logit_scale: float | torch.Tensor,
    labels: torch.Tensor | None,
    reduction: str,
    label_smoothing: float,
    backend: str,
    *,
    paired: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, str, float, str]:
    """(scale, labels, reduction, label_smoothing, backend name), validated, of infonce_loss
    (rows = queries, cols = keys) or, paired, of clip_loss (same batch; labels a permutation).
    Without labels row i's positive is column i, so rows may not outnumber cols."""
    (a_name, a), (b_name, b) = rows, cols
    V.check_pair(a_name, a, b_name, b, same_batch=paired)
    reduction = V.check_reduction(reduction)
    eps = V.check_label_smoothing(label_smoothing)
    scale = V.as_scale("logit_scale", logit_scale, a)
    m, n = a.shape[0], b.shape[0]
    if labels is not None:
        labels = V.check_labels(labels, m, n, a.device, permutation=paired)
    elif m > n:
        raise ValueError(
            f"without labels row i's positive is key i, so {a_name} ({m} rows) cannot "
            f"outnumber {b_name} ({n} rows); pass labels"
        )
    return scale, labels, reduction, eps, resolve_backend(backend, a.device)


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
    column i + offset when labels is None. Inputs validated, `scale` 0-d, `backend` resolved."""
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
    scale, labels, reduction, eps, name = _checked(
        ("queries", queries), ("keys", keys), logit_scale, labels, reduction, label_smoothing,
        backend,
    )  # fmt: skip
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
    """Per-pair symmetric CLIP losses (validated inputs, 0-d scale, resolved backend):
    0.5 * (row_i + col_{p_i})."""
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
    scale, labels, reduction, eps, name = _checked(
        ("image_features", image_features), ("text_features", text_features), logit_scale,
        labels, reduction, label_smoothing, backend, paired=True,
    )  # fmt: skip
    per = clip_pairs(
        image_features, text_features, scale, labels=labels, label_smoothing=eps, backend=name
    )
    return _reduce(per, reduction)


def clip_step(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    world: World,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    backend: str = "auto",
    grad_comm: str = "reduce",
) -> torch.Tensor:
    """The CLIP loss of this rank (module docstring), a 0-d fp32 tensor (fp64 for fp64 inputs).
    Validation happens here once; on several ranks it is agreed before any feature collective,
    so a bad input on one rank is the same error on all ranks, not a hang. grad_comm="local"
    (with gather_with_grad=True): the same loss and feature gradients with no feature-gradient
    collective (clip_local)."""

    def check():
        check_grad_comm(grad_comm, gather_with_grad)
        return V.check_paired_step(image_features, text_features, logit_scale, backend)

    flags = [("local_loss", bool(local_loss)), ("gather_with_grad", bool(gather_with_grad))]
    scale, name = agree_pair(
        world, "gammacl ClipLoss (distributed)", check, image_features, text_features, grad_comm,
        flags,
    )  # fmt: skip
    if world.size == 1:
        return clip_pairs(image_features, text_features, scale, backend=name).mean()
    if grad_comm == "local":
        return clip_local(
            image_features, text_features, scale, world=world, local_loss=local_loss, backend=name
        )
    n = image_features.shape[0]
    all_image = world.gather(image_features, with_grad=gather_with_grad)
    all_text = world.gather(text_features, with_grad=gather_with_grad)
    if local_loss:
        # rows of rank r against all columns; row i's positive is global column i + r n
        off = world.rank * n
        per_image = infonce_rows(image_features, all_text, scale, offset=off, backend=name)
        per_text = infonce_rows(text_features, all_image, scale, offset=off, backend=name)
        return 0.5 * (per_image.mean() + per_text.mean())
    if not gather_with_grad:
        all_image = world.reinsert(all_image, image_features)
        all_text = world.reinsert(all_text, text_features)
    return clip_pairs(all_image, all_text, scale, backend=name).mean()


def clip_local(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    *,
    world: World,
    local_loss: bool,
    backend: str,
) -> torch.Tensor:
    """ClipLoss with grad_comm="local" on world.size > 1 ranks: the loss "reduce" gives (rank r's
    rows with local_loss, else the global loss L) and the feature gradient of gather_with_grad
    (W dL/d own rows), with no feature-gradient collective."""
    off = world.rank * image.shape[0]
    all_image = world.gather(image, with_grad=False)
    all_text = world.gather(text, with_grad=False)
    ri, rt, lse_all = local_pair_lse(
        image, text, all_image, all_text, scale, world, offset=off, exclude_pos=False,
        backend=backend,
    )  # fmt: skip
    pos = _pos_logits(image, text, scale)  # both sides of every positive are local
    per = _nan_if_not_finite(0.5 * (ri + rt) - pos)
    own = per.mean()
    if local_loss:
        return own
    # the global loss L as this rank's value; the gradient stays this rank's share (sum_q loss_q)
    with torch.no_grad():
        pos_all = _pos_logits(all_image, all_text, scale.detach())
        full = _nan_if_not_finite(0.5 * lse_all.sum(dim=0) - pos_all).mean()
    return own + (full - own).detach()


class ClipLoss(OpenClipCompat, nn.Module):
    """Drop-in replacement for ``open_clip.loss.ClipLoss``.

    Same constructor and forward as open_clip; the N x N logit matrix is never formed.
    ``logit_scale`` is the exponentiated multiplier (float, 0-d or [1] tensor) and receives a
    gradient. ``logit_bias`` is added to every logit as open_clip does; the softmax
    cross-entropy is invariant to it, so it changes neither the loss nor any gradient (its own
    gradient is exactly 0; a non-finite bias still makes the loss NaN, as in open_clip).
    With ``world_size > 1`` the features are gathered across ranks with open_clip's semantics
    (module docstring); ``rank=None`` / ``world_size=None`` take them from the default
    process group (a single process when torch.distributed is not initialised).
    ``grad_comm="local"`` (needs ``gather_with_grad=True``): the features are gathered without
    autograd plus each anchor's LSE, and each rank computes its own features' gradient (as
    anchors and as every rank's negatives): the same loss and feature gradients, no N x D
    collective in backward (docs/distributed.md; logit_scale's gradient is a per-rank share
    with the same sum over ranks).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int | None = 0,
        world_size: int | None = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
        grad_comm: str = "reduce",
    ) -> None:
        super().__init__()
        self._init_open_clip(cache_labels, rank, world_size, backend, grad_comm, gather_with_grad)
        if use_horovod:
            raise ValueError("use_horovod=True is not supported; use torch.distributed")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.use_horovod = use_horovod

    # open_clip compatibility helpers (CoCaLoss / DistillClipLoss call these).
    def get_ground_truth(self, device: torch.device, num_logits: int) -> torch.Tensor:
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        world = self._world()
        if world.size > 1 and self.local_loss:
            labels = labels + num_logits * world.rank
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """Materialised logits as open_clip returns them (for subclasses; O(N^2) memory): with
        world_size > 1 the features are gathered as open_clip's gather_features does, so the
        logits match get_ground_truth (local rows x global columns with local_loss)."""
        world = self._world()
        all_i, all_t = image_features, text_features
        if world.size > 1:
            all_i = world.gather(image_features, with_grad=self.gather_with_grad)
            all_t = world.gather(text_features, with_grad=self.gather_with_grad)
            if not self.gather_with_grad and not self.local_loss:
                all_i = world.reinsert(all_i, image_features)
                all_t = world.reinsert(all_t, text_features)
        # local_loss: this rank's rows against every rank's columns; else the global matrix
        rows_i = image_features if self.local_loss else all_i
        logits_per_image = logit_scale * rows_i @ all_t.T
        if self.local_loss and world.size > 1:
            logits_per_text = logit_scale * text_features @ all_i.T
        else:
            logits_per_text = logits_per_image.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return logits_per_image, logits_per_text

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: float | torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
    ):
        # checked before any collective so a bad bias on one rank cannot leave the others waiting
        bias = None if logit_bias is None else V.as_scale("logit_bias", logit_bias, image_features)
        loss = clip_step(
            image_features,
            text_features,
            logit_scale,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            **self._step_kwargs(),
        )
        if bias is not None:
            loss = loss + 0.0 * bias
        return {"contrastive_loss": loss} if output_dict else loss
