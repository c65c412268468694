"""The sigmoid (SigLIP) family: `siglip_loss` and `SigLipLoss`, a drop-in for open_clip's
SigLipLoss, on the fused one-pass siglip op (gammacl.ops.siglip: loss and gradient in one sweep,
3 GEMM-equivalents, never the N x N logits).

    loss = -(1/N) sum_ij log sigmoid(z_ij (logit_scale <a_i, b_j> + logit_bias)),
    z_ii = +1, z_ij = -1 otherwise (open_clip's normalisation: divided by the number of rows).
"""

from __future__ import annotations

import torch
from torch import nn

from gammacl import _validate as V
from gammacl._local_grad import siglip_local
from gammacl._openclip import OpenClipCompat, agree_pair
from gammacl.distributed import World, check_grad_comm
from gammacl.ops.siglip import siglip

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """open_clip's SigLipLoss (module docstring) on paired [N, D] features without materialising
    the N x N logits. logit_scale is the multiplier (already exp'd), logit_bias the additive bias
    (users initialise it to -10); both may be floats or one-element tensors and receive
    gradients. Returns a 0-d fp32 tensor (fp64 for fp64 inputs); feature gradients come back in
    the features' dtype. Features are not normalised here."""
    return siglip_step(
        image_features, text_features, logit_scale, logit_bias, world=World(), backend=backend
    )


def siglip_step(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    *,
    world: World,
    backend: str = "auto",
    grad_comm: str = "reduce",
) -> torch.Tensor:
    """The SigLIP loss of this rank, for one process and torch.distributed alike: rank r's n local
    images against every rank's texts (an all-gather with gradient; the identity in a world of
    one), positives on its own diagonal block (offset r n), divided by n -- open_clip's loss for
    every dist_impl. The mean over ranks is the loss L of the global batch; feature gradients on
    rank r are W dL/d(its rows), and dscale / dbias average over ranks (DDP) to L's. Inputs are
    validated once here and, on several ranks, agreed before any feature collective.
    grad_comm="local": the same loss and every gradient, the texts gathered without autograd
    (gammacl._local_grad.siglip_local)."""

    def check():
        check_grad_comm(grad_comm)
        scale, name = V.check_paired_step(image_features, text_features, logit_scale, backend)
        return scale, V.as_scale("logit_bias", logit_bias, image_features), name

    scale, bias, name = agree_pair(
        world, "gammacl SigLipLoss (distributed)", check, image_features, text_features, grad_comm
    )
    if grad_comm == "local" and world.size > 1:
        return siglip_local(image_features, text_features, scale, bias, world=world, backend=name)
    all_text = world.gather(text_features, with_grad=True)
    off = world.rank * image_features.shape[0]
    return siglip(image_features, all_text, scale, bias, offset=off, backend=name)


class SigLipLoss(OpenClipCompat, nn.Module):
    """Drop-in replacement for ``open_clip.loss.SigLipLoss``.

    Same constructor and forward as open_clip (``logit_bias`` is required, as there); the loss
    is a 0-d fp32 tensor, or ``{"contrastive_loss": loss}`` with ``output_dict=True``.

    Distributed (``world_size > 1``): every ``dist_impl`` of open_clip ("bidir" default,
    "shift", "reduce", "gather") gives the same loss -- rank r's local images against every
    rank's texts, the positives only on its own diagonal block, divided by the local batch size
    -- and gammacl computes it one way: an all-gather of the text features with gradient, then
    one fused sweep of the n x (W n) problem (siglip_step).
    ``rank=None`` / ``world_size=None`` take them from the default process group.
    ``cache_labels`` is accepted for compatibility (no labels matrix exists to cache).
    ``grad_comm="local"``: the texts are gathered without autograd and each rank computes its
    own texts' gradient as every rank's columns (an extra n x (W n) sweep, no N x D collective in
    backward; docs/distributed.md); loss and every gradient equal "reduce" rank by rank.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int | None = 0,
        world_size: int | None = 1,
        dist_impl: str | None = None,
        *,
        backend: str = "auto",
        grad_comm: str = "reduce",
    ) -> None:
        super().__init__()
        self._init_open_clip(cache_labels, rank, world_size, backend, grad_comm)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS} or None, got {dist_impl!r}")
        self.dist_impl = dist_impl

    # open_clip compatibility helpers (materialised; O(N^2) memory, for subclasses only)
    def get_ground_truth(
        self, device: torch.device, dtype: torch.dtype, num_logits: int, negative_only: bool = False
    ) -> torch.Tensor:
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits += logit_bias
        return logits

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: float | torch.Tensor,
        logit_bias: float | torch.Tensor,
        output_dict: bool = False,
    ):
        loss = siglip_step(
            image_features, text_features, logit_scale, logit_bias, **self._step_kwargs()
        )
        return {"contrastive_loss": loss} if output_dict else loss
