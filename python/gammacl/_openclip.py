"""What the open_clip drop-ins (gammacl.ClipLoss, gammacl.SigLipLoss) share: open_clip's
constructor attributes, the keyword arguments their module passes to its step (clip_step /
siglip_step), and the step's agreement across ranks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from gammacl import _validate as V
from gammacl.distributed import GRAD_COMMS, InWorld, World, check_grad_comm

_T = TypeVar("_T")


class OpenClipCompat(InWorld):
    """InWorld plus open_clip's loss attributes and gammacl's backend / grad_comm."""

    backend: str
    grad_comm: str

    def _init_open_clip(
        self,
        cache_labels: bool,
        rank: int | None,
        world_size: int | None,
        backend: str,
        grad_comm: str,
        gather_with_grad: bool = True,
    ) -> None:
        """Validates backend and grad_comm (check_grad_comm) and stores the settings.
        prev_num_logits and labels are open_clip's label cache, kept for code that reads them:
        no labels matrix exists here to cache."""
        self.backend = V.check_backend(backend)
        self.grad_comm = check_grad_comm(grad_comm, gather_with_grad)
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.prev_num_logits = 0
        self.labels: dict = {}

    def _step_kwargs(self) -> dict[str, Any]:
        """The step's world, backend and grad_comm from this module's settings."""
        return {"world": self._world(), "backend": self.backend, "grad_comm": self.grad_comm}


def agree_pair(
    world: World,
    what: str,
    check: Callable[[], _T],
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    grad_comm: str,
    flags: Sequence[tuple[str, int]] = (),
) -> _T:
    """world.agree for a paired step: the two feature tensors, the declared rank and world size,
    the step's `flags`, and grad_comm's index in GRAD_COMMS (-1 for a value check() rejects)."""
    code = GRAD_COMMS.index(grad_comm) if grad_comm in GRAD_COMMS else -1
    return world.agree(
        what,
        check,
        [("image_features", image_features), ("text_features", text_features)],
        flags=[("rank", world.rank), ("world_size", world.size), *flags, ("grad_comm", code)],
    )
