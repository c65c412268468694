"""Stateful losses inside trainers (issue 23): the gamma / SogCLR state changes only while
training, the returned value is the global-objective estimate with the surrogate's gradient, and
a resumed run reads the state from the checkpoint it resumes from."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import cpu_backends
from tolerances import assert_close_fp64

from gammacl import GammaClipLoss, SogCLRLoss

BACKENDS = cpu_backends(include_triton=False, include_cuda_emu=False)


def _batch(b=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(x + 0.8 * torch.randn(b, d, generator=g, dtype=x.dtype), 1)
    return x.requires_grad_(), y.requires_grad_()


def batch_objective(x, y, s):
    """G_B = 1/2 mean_i[-l_ii + log mean_{j!=i} e^{l_ij}] + the same over columns, l = s x y^T."""
    l = s * x @ y.T
    b = l.shape[0]
    off = l.masked_fill(torch.eye(b, dtype=torch.bool), float("-inf"))
    rows = torch.logsumexp(off, 1) - math.log(b - 1)
    cols = torch.logsumexp(off, 0) - math.log(b - 1)
    return 0.5 * (rows - l.diagonal()).mean() + 0.5 * (cols - l.diagonal()).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_sogclr_step_returns_the_batch_objective_with_its_gradient(backend):
    """A fresh SogCLRLoss, update="before": R = Zhat of this batch, so the value is G_B and the
    surrogate's gradient is G_B's gradient (u = 1/Zhat, detached); both at float64."""
    x, y = _batch()
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, 9, 0, 2, 7, 5])
    loss = SogCLRLoss(10, ema=0.3, update="before", backend=backend)(x, y, s, index)
    want = batch_objective(x, y, s)
    assert_close_fp64(loss, want, "value")
    got = torch.autograd.grad(loss, (x, y, s))
    for name, a, b in zip("xys", got, torch.autograd.grad(want, (x, y, s)), strict=True):
        assert_close_fp64(a, b, f"grad {name}")
    # GammaClipLoss: the same value (the estimate does not depend on the draws)
    x2, y2 = _batch()
    gamma = GammaClipLoss(10, generator=torch.Generator().manual_seed(1), backend=backend)
    assert_close_fp64(gamma(x2, y2, 7.0, index), want, "gamma value")
    assert not torch.allclose(gamma.last_surrogate, want)  # the surrogate is another number


def _buffers(mod):
    return {k: v.clone() for k, v in mod.named_buffers()}


@pytest.mark.parametrize("update", ["before", "after"])
def test_forward_outside_training_changes_no_state(update):
    """eval() or torch.no_grad(): no buffer and no generator state changes, and the value is the
    training forward's; the training forward after it equals one without the eval in between."""
    index = torch.tensor([1, 3, 5, 7, 0, 2])
    mod = GammaClipLoss(
        10, ema=0.4, update=update, generator=torch.Generator().manual_seed(3), backend="torch"
    )
    x, y = _batch()
    mod(x, y, 5.0, index)  # one training step: some state to keep
    twin = copy.deepcopy(mod)
    before, gen = _buffers(mod), mod.generator.get_state()
    x2, y2 = _batch(seed=1)
    mod.eval()
    val = mod(x2, y2, 5.0, index[[3, 4, 0, 5, 1, 2]] + 1)
    mod.train()
    with torch.no_grad():
        val_ng = mod(x2, y2, 5.0, index[[3, 4, 0, 5, 1, 2]] + 1)
    for k, v in _buffers(mod).items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(mod.generator.get_state(), gen)
    want = twin(x2, y2, 5.0, index[[3, 4, 0, 5, 1, 2]] + 1)  # a training step of the twin
    assert torch.equal(val.detach(), want.detach()) and torch.equal(val_ng, want.detach())
    assert not torch.equal(twin.image_rate.visited, before["image_rate.visited"])
    # the next training step is the one a run without the eval forwards takes
    nxt = mod(x, y, 6.0, index)
    replay = GammaClipLoss(
        10, ema=0.4, update=update, generator=torch.Generator().manual_seed(3), backend="torch"
    )
    replay(*_batch(), 5.0, index)
    assert torch.equal(nxt.detach(), replay(x, y, 6.0, index).detach())
    assert torch.equal(mod.last_surrogate, replay.last_surrogate)  # same draws too


def test_sentence_transformers_eval_leaves_state_and_attach_resumes(tmp_path):
    st = pytest.importorskip("sentence_transformers", reason="optional dependency")
    del st
    from test_integrations_st import SENTENCES, _features, make_model

    from gammacl.integrations import sentence_transformers as G

    model = make_model(tmp_path)
    loss = G.SogCLRMultipleNegativesRankingLoss(model, num_samples=12, backend="torch")
    feats = _features(model, [SENTENCES[:4], SENTENCES[4:8]])
    index = torch.tensor([0, 5, 2, 9])
    before = _buffers(loss)
    model.eval()  # the trainer's evaluate(): model.eval() and torch.no_grad()
    loss(feats, index)
    with torch.no_grad():
        model.train()
        loss(feats, index)
    for k, v in _buffers(loss).items():
        assert torch.equal(v, before[k]), k
    model.train()
    loss(feats, index)  # training: the state changes
    assert int(loss.gamma.image_rate.visited.sum()) == 4

    # attach(trainer): train(resume_from_checkpoint=path) reads path/gammacl_loss_state.pt
    elsewhere = tmp_path / "elsewhere" / "checkpoint-7"
    loss.save_state(elsewhere)
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    calls = []
    handler = SimpleNamespace(callbacks=[])
    trainer = SimpleNamespace(
        args=SimpleNamespace(output_dir=str(tmp_path / "out")),
        callback_handler=handler,
        add_callback=handler.callbacks.append,
        train=lambda resume_from_checkpoint=None, **kw: calls.append(resume_from_checkpoint),
    )
    fresh = G.SogCLRMultipleNegativesRankingLoss(model, num_samples=12, backend="torch")
    assert fresh.attach(trainer) is trainer and len(handler.callbacks) == 1
    fresh.attach(trainer)
    assert len(handler.callbacks) == 1  # one callback per loss
    trainer.train(resume_from_checkpoint=str(elsewhere))
    assert calls == [str(elsewhere)]
    for k, v in _buffers(loss).items():
        assert torch.equal(_buffers(fresh)[k], v), k
    cb = handler.callbacks[0]
    cb.on_train_begin(trainer.args, SimpleNamespace(global_step=7), None)  # no second load
    with pytest.raises(FileNotFoundError, match="checkpoint-3, which has no gammacl_loss_state.pt"):
        trainer.train(resume_from_checkpoint=True)  # the last checkpoint of output_dir


def test_open_clip_checkpoint_hooks_on_a_stand_in_module(tmp_path):
    """gammacl.integrations.open_clip._patch_checkpoints on a stand-in for open_clip_train.main
    (the real one is tested in test_integrations_open_clip.py, in open_clip's environment)."""
    from gammacl.integrations import open_clip as OC

    loss = SogCLRLoss(6, backend="torch")
    main = SimpleNamespace(torch=torch, pt_load=lambda p, map_location=None: torch.load(p))
    OC._patch_checkpoints(main, loss)
    try:
        loss(*_batch(3), 3.0, torch.tensor([5, 1, 3]))
        ck = {"epoch": 2, "state_dict": {}, "optimizer": {}}
        main.torch.save(ck, tmp_path / "epoch_2.pt")
        main.torch.save({"not": "a training checkpoint"}, tmp_path / "other.pt")
        assert OC.CHECKPOINT_KEY not in torch.load(tmp_path / "other.pt")
        assert main.torch.float64 is torch.float64  # everything else is torch's
        fresh = SogCLRLoss(6, backend="torch")
        OC._patch_checkpoints(main, fresh)
        main.pt_load(tmp_path / "epoch_2.pt")
        assert fresh.image_rate.visited.tolist() == [0, 1, 0, 1, 0, 1]
        assert torch.equal(fresh.text_rate.log_rate, loss.text_rate.log_rate)
    finally:
        OC._STATE.clear()
