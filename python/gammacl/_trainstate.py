"""State that only training changes: a stateful loss (gammacl.gamma's per-sample rates) updates
its buffers only while training, i.e. the module in training mode and grad enabled. Any other
forward (trainer.evaluate(), torch.no_grad(), module.eval()) computes what a training step would
and leaves every buffer and the module's generator as it found them."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def training(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


@contextlib.contextmanager
def kept_unless_training(module: nn.Module):
    """Restores every buffer of `module` (and `module.generator`'s state, if any) on exit unless
    training(module). O(buffers) copies, outside training only."""
    if training(module):
        yield
        return
    saved = {k: b.clone() for k, b in module.named_buffers()}
    gen = getattr(module, "generator", None)
    gen_state = gen.get_state() if gen is not None else None
    try:
        yield
    finally:
        with torch.no_grad():
            for k, b in module.named_buffers():
                b.copy_(saved[k])
        if gen_state is not None:
            gen.set_state(gen_state)


def estimate_valued_step(module: nn.Module, step, *args) -> torch.Tensor:
    """One step of a stateful loss: `step(module, *args)` returns the surrogate whose gradient is
    the loss's and sets module.global_loss_estimate (the objective's estimate). Returns
    (surrogate - surrogate.detach()) + estimate: the estimate's value (what a trainer logs) with
    the surrogate's gradient. The state is kept unless training(module); module.last_surrogate
    holds the surrogate's value."""
    with kept_unless_training(module):
        surrogate = step(module, *args)
    module.last_surrogate = surrogate.detach()
    return (surrogate - surrogate.detach()) + module.global_loss_estimate.to(surrogate.dtype)
