"""nn.Module losses. `ClipLoss` is a drop-in for open_clip's ClipLoss."""

from __future__ import annotations

import torch
from torch import nn

from gammacl import _validate as V
from gammacl.dispatch import BACKENDS
from gammacl.functional import clip_pairs


class ClipLoss(nn.Module):
    """Drop-in replacement for ``open_clip.loss.ClipLoss``.

    Same constructor and forward as open_clip; the N x N logit matrix is never formed.
    ``logit_scale`` is the exponentiated multiplier (float, 0-d or [1] tensor) and receives a
    gradient. ``logit_bias`` is added to every logit as open_clip does; the softmax
    cross-entropy is invariant to it, so it changes neither the loss nor any gradient (its own
    gradient is exactly 0; a non-finite bias still makes the loss NaN, as in open_clip).
    With ``world_size > 1`` the features are gathered across ranks with open_clip's semantics
    (see gammacl.distributed); ``rank=None`` / ``world_size=None`` take them from the default
    process group (a single process when torch.distributed is not initialised).
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
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if use_horovod:
            raise ValueError("use_horovod=True is not supported; use torch.distributed")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
        self.prev_num_logits = 0
        self.labels: dict = {}

    def _world(self) -> tuple[int, int]:
        """(rank, world_size), from the default process group where they are None."""
        if self.rank is None or self.world_size is None:
            from gammacl.distributed import resolve_world

            return resolve_world(self.rank, self.world_size)
        return self.rank, self.world_size

    # open_clip compatibility helpers (CoCaLoss / DistillClipLoss call these).
    def get_ground_truth(self, device: torch.device, num_logits: int) -> torch.Tensor:
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        rank, world_size = self._world()
        if world_size > 1 and self.local_loss:
            labels = labels + num_logits * rank
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """Materialised logits as open_clip returns them (for subclasses; O(N^2) memory): with
        world_size > 1 the features are gathered as open_clip's gather_features does, so the
        logits match get_ground_truth (local rows x global columns with local_loss)."""
        rank, world_size = self._world()
        if world_size > 1:
            from gammacl.distributed import _reinsert, all_gather_rows

            all_i = all_gather_rows(image_features, with_grad=self.gather_with_grad)
            all_t = all_gather_rows(text_features, with_grad=self.gather_with_grad)
            if not self.gather_with_grad and not self.local_loss:
                all_i = _reinsert(all_i, image_features, rank)
                all_t = _reinsert(all_t, text_features, rank)
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_t.T
                logits_per_text = logit_scale * text_features @ all_i.T
            else:
                logits_per_image = logit_scale * all_i @ all_t.T
                logits_per_text = logits_per_image.T
        else:
            logits_per_image = logit_scale * image_features @ text_features.T
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
        rank, world_size = self._world()
        # checked before any collective so a bad bias on one rank cannot leave the others waiting
        bias = None if logit_bias is None else V.as_scale("logit_bias", logit_bias, image_features)
        if world_size > 1:
            from gammacl.distributed import clip_loss_distributed

            loss = clip_loss_distributed(
                image_features,
                text_features,
                logit_scale,
                local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad,
                rank=rank,
                world_size=world_size,
                backend=self.backend,
            )
        else:
            V.check_pair(
                "image_features", image_features, "text_features", text_features, same_batch=True
            )
            scale = V.as_scale("logit_scale", logit_scale, image_features)
            loss = clip_pairs(image_features, text_features, scale, backend=self.backend).mean()
        if bias is not None:
            loss = loss + 0.0 * bias
        return {"contrastive_loss": loss} if output_dict else loss
