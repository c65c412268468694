"""open_clip: route ``open_clip.loss.ClipLoss`` (and so the trainer's ``create_loss``) through
gammacl, reversibly, and train open_clip with the gamma / SogCLR losses.

One line, before the loss is built (e.g. at the top of a copy of open_clip_train/main.py, or in a
launcher that then calls ``open_clip_train.main.main(argv)``)::

    import gammacl.integrations.open_clip as oc
    handle = oc.apply()     # ClipLoss.forward -> gammacl.ClipLoss; CoCaLoss's CLIP term too
    ...
    handle.revert()         # or oc.revert(): open_clip's own forward again

apply() replaces ``ClipLoss.forward`` on the class (the Liger-Kernel way), so every instance, the
ones ``open_clip.create_loss(args)`` / ``open_clip_train`` build, existing ones and subclasses
that call ``super().forward`` (CoCaLoss) compute the loss with gammacl.ClipLoss under the same
local_loss / gather_with_grad / rank / world_size settings, without the N x N logits.
DistillClipLoss calls ``get_logits`` itself and keeps open_clip's computation; SigLipLoss is a
different loss and is not touched. ``use_horovod=True`` instances keep open_clip's forward.

Gamma / SogCLR in open_clip's trainer. These losses need each pair's data-set index, and
open_clip's training loop hands the loss only ``model_out`` (``loss(**model_out,
output_dict=True)``). The index comes from the data loader's sampler: ``with_index(dataloader,
loss)`` rebuilds the DataLoader on a batch sampler that records every batch's indices (in the
main process, before workers load it); ``OpenClipGammaLoss`` / ``OpenClipSogCLRLoss`` take
them in order, one batch per call. ``apply(loss=OpenClipGammaLoss(num_samples=len(dataset)))``
makes ``create_loss`` (open_clip and open_clip_train.main) return that loss and wraps the train
DataLoader that open_clip_train.main's ``get_data`` returns with with_index, so the unmodified
trainer runs it::

    import sys
    import gammacl.integrations.open_clip as oc
    from open_clip_train.main import main

    oc.apply(loss=oc.OpenClipGammaLoss(num_samples=N_TRAIN_ROWS))  # or OpenClipSogCLRLoss
    main(sys.argv[1:])  # --train-data rows.csv --dataset-type csv --accum-freq 1 ...

Needs a map-style dataset (CsvDataset, not webdataset shards) and ``--accum-freq 1``
(the accumulation path calls the loss on concatenated batches); an index can also be passed
directly: ``loss(**model_out, index=idx)``.

The loss state travels in open_clip's own checkpoints: with such a loss, apply() makes
open_clip_train.main's ``torch.save`` of a training checkpoint (the dict with "epoch" and
"state_dict" that becomes epoch_N.pt / epoch_latest.pt) add ``loss.state_dict()`` under
"gammacl_loss", and its ``pt_load`` of ``--resume`` load it back into the loss (a warning when the
checkpoint has none). revert() undoes both.
"""

from __future__ import annotations

import collections
import inspect
import warnings
from typing import Any

import torch

import gammacl
from gammacl.integrations import require

_EXTRA = "open-clip"
_STATE: dict = {}  # what apply() replaced: {"forward": f, "create_loss": {module: f}}
CHECKPOINT_KEY = "gammacl_loss"


def _gammacl_forward(self, *args: Any, **kwargs: Any):
    """open_clip ClipLoss.forward computed by gammacl.ClipLoss (same settings). The call is
    passed on as it came: gammacl.ClipLoss.forward takes open_clip's arguments (its signature,
    which this function reports)."""
    if getattr(self, "use_horovod", False):
        return _STATE["forward"](self, *args, **kwargs)
    impl = gammacl.ClipLoss(
        local_loss=self.local_loss,
        gather_with_grad=self.gather_with_grad,
        cache_labels=self.cache_labels,
        rank=self.rank,
        world_size=self.world_size,
        backend=_STATE.get("backend", "auto"),
    )
    return impl(*args, **kwargs)


_gammacl_forward.__signature__ = inspect.signature(gammacl.ClipLoss.forward)  # type: ignore[attr-defined]


class Handle:
    """Returned by apply(); revert() undoes it (same as the module-level revert())."""

    def revert(self) -> None:
        revert()


def _create_loss_modules() -> list:
    mods = [require("open_clip.factory", _EXTRA), require("open_clip", _EXTRA)]
    try:
        import open_clip_train.main as train_main  # imported by name there

        mods.append(train_main)
    except ImportError:  # open_clip_train not installed, or its own imports missing
        pass
    return [m for m in mods if hasattr(m, "create_loss")]


def apply(loss: torch.nn.Module | None = None, *, backend: str = "auto") -> Handle:
    """Makes open_clip's ClipLoss compute with gammacl (see the module docstring). With `loss`
    (e.g. an OpenClipGammaLoss), ``create_loss(args)`` in open_clip and open_clip_train.main
    returns that module instead. Calling apply() again first reverts the previous call."""
    if _STATE:
        revert()
    loss_mod = require("open_clip.loss", _EXTRA)
    _STATE["forward"] = loss_mod.ClipLoss.forward
    _STATE["backend"] = backend
    loss_mod.ClipLoss.forward = _gammacl_forward
    _STATE["create_loss"] = {}
    if loss is not None:
        for mod in _create_loss_modules():
            _STATE["create_loss"][mod] = mod.create_loss
            mod.create_loss = lambda args, _loss=loss: _loss
        if isinstance(loss, _OpenClipCall):
            _patch_train_main(loss)
    return Handle()


class _SavingTorch:
    """open_clip_train.main's `torch` under apply(loss=...): torch, except that saving a training
    checkpoint (a dict with "epoch" and "state_dict") adds the loss state under CHECKPOINT_KEY."""

    def __init__(self, torch_module, loss: torch.nn.Module) -> None:
        self._torch, self._loss = torch_module, loss

    def __getattr__(self, name: str):
        return getattr(self._torch, name)

    def save(self, obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "epoch" in obj and "state_dict" in obj:
            obj = {**obj, CHECKPOINT_KEY: self._loss.state_dict()}
        return self._torch.save(obj, f, *args, **kwargs)


def _patch_checkpoints(train_main, loss: torch.nn.Module) -> None:
    """train_main.torch.save / train_main.pt_load carry the loss state (module docstring)."""
    original_load = train_main.pt_load

    def pt_load(file_path, *args, **kwargs):
        ck = original_load(file_path, *args, **kwargs)
        if isinstance(ck, dict) and CHECKPOINT_KEY in ck:
            loss.load_state_dict(ck[CHECKPOINT_KEY])
        elif isinstance(ck, dict) and "epoch" in ck:
            warnings.warn(
                f"resuming from {file_path}, which holds no {CHECKPOINT_KEY!r} entry: the "
                f"{type(loss).__name__} state starts fresh",
                stacklevel=2,
            )
        return ck

    _STATE["checkpoints"] = (train_main, train_main.torch, original_load)
    train_main.torch = _SavingTorch(train_main.torch, loss)
    train_main.pt_load = pt_load


def _patch_train_main(loss: _OpenClipCall) -> None:
    """open_clip_train.main: get_data puts the train DataLoader under with_index; checkpoints
    carry the loss state."""
    try:
        import open_clip_train.main as train_main
    except ImportError:
        return
    _patch_checkpoints(train_main, loss)
    original = train_main.get_data

    def get_data(*args, **kwargs):
        data = original(*args, **kwargs)
        if "train" in data:
            data["train"].dataloader = with_index(data["train"].dataloader, loss)
        return data

    _STATE["get_data"] = (train_main, original)
    train_main.get_data = get_data


def revert() -> None:
    """Restores open_clip's own ClipLoss.forward (and create_loss); no-op when not applied."""
    if not _STATE:
        return
    require("open_clip.loss", _EXTRA).ClipLoss.forward = _STATE["forward"]
    for mod, fn in _STATE.get("create_loss", {}).items():
        mod.create_loss = fn
    if "get_data" in _STATE:
        mod, fn = _STATE["get_data"]
        mod.get_data = fn
    if "checkpoints" in _STATE:
        mod, torch_module, load = _STATE["checkpoints"]
        mod.torch, mod.pt_load = torch_module, load
    _STATE.clear()


def is_applied() -> bool:
    return bool(_STATE)


class _OpenClipCall:
    """open_clip's loss call on top of a gammacl gamma-family loss."""

    def _init_pending(self) -> None:
        self.pending: collections.deque = collections.deque()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias=None,
        output_dict: bool = False,
        index: torch.Tensor | None = None,
    ):
        if index is None:
            if not self.pending:
                raise RuntimeError(
                    f"{type(self).__name__} needs each pair's data-set index: pass index=..., or "
                    "build the DataLoader with gammacl.integrations.open_clip.with_index("
                    "dataloader, loss) so every batch's indices are recorded"
                )
            index = self.pending.popleft()
        loss = super().forward(image_features, text_features, logit_scale, index)
        if logit_bias is not None:  # ignored by the softmax loss; a zero gradient, as open_clip
            loss = loss + 0.0 * logit_bias.sum()
        return {"contrastive_loss": loss} if output_dict else loss


class OpenClipGammaLoss(_OpenClipCall, gammacl.GammaClipLoss):
    """gammacl.GammaClipLoss with open_clip's loss call,
    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False,
    index=None)``: the index is the argument, or else the next batch recorded by with_index().
    Constructor: GammaClipLoss's (num_samples, shape, rate, ema, update, generator, backend,
    ...)."""

    def __init__(self, num_samples: int, **kwargs: Any) -> None:
        super().__init__(num_samples, **kwargs)
        self._init_pending()


class OpenClipSogCLRLoss(_OpenClipCall, gammacl.SogCLRLoss):
    """gammacl.SogCLRLoss with open_clip's loss call (see OpenClipGammaLoss)."""

    def __init__(self, num_samples: int, **kwargs: Any) -> None:
        super().__init__(num_samples, **kwargs)
        self._init_pending()


class IndexRecordingBatchSampler:
    """Wraps a batch sampler; every batch of indices it yields is appended to `loss.pending`
    (a fresh epoch clears what an interrupted one left). Each pass calls loss.set_epoch(e) (the
    inner-rate schedule), e counting passes from 0, or from the last set_epoch(e) given here."""

    def __init__(self, batch_sampler, loss: _OpenClipCall) -> None:
        self.batch_sampler = batch_sampler
        self.loss = loss
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self):
        self.loss.set_epoch(self.epoch)
        self.epoch += 1
        self.loss.pending.clear()
        for batch in self.batch_sampler:
            self.loss.pending.append(torch.as_tensor(list(batch), dtype=torch.int64))
            yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __getattr__(self, name: str):  # sampler.set_epoch etc.
        if name == "batch_sampler":
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)


def with_index(dataloader, loss: _OpenClipCall):
    """The same DataLoader (dataset, workers, collate, pinning) on an IndexRecordingBatchSampler
    of its batch sampler; the batches themselves are unchanged."""
    if isinstance(dataloader.dataset, torch.utils.data.IterableDataset):
        raise TypeError(
            "with_index needs a map-style dataset (indices come from the sampler); an "
            "IterableDataset (webdataset shards) has none: pass index= to the loss instead"
        )
    kwargs = dict(
        num_workers=dataloader.num_workers,
        collate_fn=dataloader.collate_fn,
        pin_memory=dataloader.pin_memory,
        timeout=dataloader.timeout,
        worker_init_fn=dataloader.worker_init_fn,
        persistent_workers=dataloader.persistent_workers,
    )
    if dataloader.num_workers > 0:
        kwargs["prefetch_factor"] = dataloader.prefetch_factor
    new = torch.utils.data.DataLoader(
        dataloader.dataset,
        batch_sampler=IndexRecordingBatchSampler(dataloader.batch_sampler, loss),
        **kwargs,
    )
    for attr in ("num_batches", "num_samples"):  # open_clip's DataInfo reads these
        if hasattr(dataloader, attr):
            setattr(new, attr, getattr(dataloader, attr))
    return new


__all__ = [
    "CHECKPOINT_KEY",
    "Handle",
    "IndexRecordingBatchSampler",
    "OpenClipGammaLoss",
    "OpenClipSogCLRLoss",
    "apply",
    "is_applied",
    "revert",
    "with_index",
]
