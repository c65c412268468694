"""gammacl.integrations.open_clip against the real open_clip on a tiny CLIP built from configs (no
downloads): apply() routes ClipLoss through gammacl with open_clip's loss and gradients,
revert() restores open_clip, create_loss is swapped, and the gamma loss gets each batch's
data-set indices from the data loader.

open_clip imports torchvision, which does not import beside the CPU torch wheel; CI runs this file
in a separate environment (see .ci/run)."""

import copy
import types

import pytest
import torch
from tolerances import assert_close_dtype, assert_close_fp64

open_clip = pytest.importorskip(
    "open_clip", reason="optional dependency open_clip_torch (pip install 'gammacl[open-clip]')"
)
import open_clip.loss as oc_loss  # noqa: E402

import gammacl  # noqa: E402
from gammacl.integrations import open_clip as G  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=8,
        vision_cfg=dict(layers=1, width=16, head_width=8, patch_size=4, image_size=8),
        text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1),
        output_dict=True,
    )


@pytest.fixture(autouse=True)
def _always_revert():
    yield
    G.revert()


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(1, 50, (n, 8), generator=g)


def _run(model, loss_fn, images, texts):
    model.zero_grad(set_to_none=True)
    out = model(images.to(next(model.parameters()).dtype), texts)
    loss = loss_fn(**out, output_dict=True)["contrastive_loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_apply_routes_clip_loss_through_gammacl_and_matches(tiny, monkeypatch):
    images, texts = _batch()
    original = oc_loss.ClipLoss.forward
    ref, ref_g = _run(copy.deepcopy(tiny).double(), oc_loss.ClipLoss(), images, texts)
    lib, lib_g = _run(copy.deepcopy(tiny).float(), oc_loss.ClipLoss(), images, texts)
    handle = G.apply(backend="torch")
    assert G.is_applied()
    assert oc_loss.ClipLoss.forward is G._gammacl_forward
    assert open_clip.ClipLoss.forward is G._gammacl_forward  # the re-exported name too

    def no_logits(*a, **k):
        raise AssertionError("open_clip's materialised get_logits was called")

    monkeypatch.setattr(oc_loss.ClipLoss, "get_logits", no_logits)
    out, out_g = _run(copy.deepcopy(tiny).float(), oc_loss.ClipLoss(), images, texts)
    out64, out64_g = _run(copy.deepcopy(tiny).double(), oc_loss.ClipLoss(), images, texts)
    assert_close_dtype(out.reshape(1), ref.reshape(1), lib.reshape(1), torch.float32, "loss")
    assert_close_fp64(out64, ref, "loss fp64")
    assert ref_g.keys() == out_g.keys() and "logit_scale" in ref_g and len(ref_g) >= 15
    for name, g in ref_g.items():
        assert_close_dtype(out_g[name], g, lib_g[name], torch.float32, name)
        assert_close_fp64(out64_g[name], g, f"{name} fp64")
    monkeypatch.undo()
    handle.revert()
    assert oc_loss.ClipLoss.forward is original and not G.is_applied()
    again, _ = _run(copy.deepcopy(tiny).double(), oc_loss.ClipLoss(), images, texts)
    assert torch.equal(again, ref)  # open_clip's own computation, bitwise


def test_apply_covers_coca_clip_term_and_bias(tiny):
    images, texts = _batch()
    with torch.no_grad():
        out = tiny.double()(images.double(), texts)
    tiny.float()
    bias = torch.tensor(-3.0, dtype=torch.float64)
    ref = oc_loss.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"], bias)
    G.apply(backend="torch")
    got = oc_loss.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"], bias)
    assert_close_fp64(got, ref, "with logit_bias")
    coca = oc_loss.CoCaLoss(caption_loss_weight=0.0, clip_loss_weight=2.0)
    logits = torch.zeros(6, 8, 50, dtype=torch.float64)
    clip_term, _ = coca(
        out["image_features"], out["text_features"], logits, texts, out["logit_scale"]
    )
    assert_close_fp64(clip_term, 2.0 * ref, "CoCa clip term through gammacl")


def test_create_loss_swapped_and_restored(monkeypatch):
    args = types.SimpleNamespace(
        distill=False,
        model="ViT-B-32",
        siglip=False,
        local_loss=True,
        gather_with_grad=True,
        rank=0,
        world_size=1,
        horovod=False,
    )
    original = open_clip.create_loss
    built = open_clip.create_loss(args)
    G.apply()
    assert isinstance(built, oc_loss.ClipLoss) and type(built).forward is G._gammacl_forward
    gamma = G.OpenClipGammaLoss(num_samples=10)
    G.apply(loss=gamma)
    assert open_clip.create_loss(args) is gamma
    assert open_clip.factory.create_loss(args) is gamma
    try:
        import open_clip_train.main as train_main
    except ImportError:
        train_main = None
    if train_main is not None:
        assert train_main.create_loss(args) is gamma
    G.revert()
    if train_main is not None:  # apply(loss=gamma) also puts the train loader under with_index
        from open_clip_train.data import DataInfo

        loader = torch.utils.data.DataLoader(_Indexed(8), batch_size=4, shuffle=True)
        monkeypatch.setattr(
            train_main, "get_data", lambda *a, **k: {"train": DataInfo(dataloader=loader)}
        )
        fake = train_main.get_data
        G.apply(loss=gamma)
        wrapped = train_main.get_data(None, None)["train"].dataloader
        assert isinstance(wrapped.batch_sampler, G.IndexRecordingBatchSampler)
        batches = [idx for _, _, idx in wrapped]
        assert [p.tolist() for p in gamma.pending] == [b.tolist() for b in batches]
        G.revert()
        assert train_main.get_data is fake
    assert open_clip.create_loss is original
    assert isinstance(open_clip.create_loss(args), oc_loss.ClipLoss)
    if train_main is not None:
        assert train_main.create_loss is original


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, n):
        self.images, self.texts = _batch(n, seed=5)

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return self.images[i], self.texts[i], i


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(3))


@pytest.mark.parametrize("sogclr", [False, True])
def test_gamma_loss_takes_recorded_indices(tiny, sogclr):
    """with_index: the loss gets each batch's data-set indices in order (shuffled loader, two
    epochs), equal to passing index= explicitly; the state marks exactly the visited samples."""
    cls = G.OpenClipSogCLRLoss if sogclr else G.OpenClipGammaLoss
    ref_cls = gammacl.SogCLRLoss if sogclr else gammacl.GammaClipLoss
    kw = {} if sogclr else {"generator": torch.Generator().manual_seed(2)}
    ref_kw = {} if sogclr else {"generator": torch.Generator().manual_seed(2)}
    data = _Indexed(12)
    loss = cls(num_samples=12, backend="torch", **kw)
    ref = ref_cls(12, backend="torch", **ref_kw)
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    loader = G.with_index(loader, loss)
    seen = []
    for _epoch in range(2):  # training forwards (grad enabled): the state is updated
        for images, texts, idx in loader:
            out = {
                k: v.detach() if torch.is_tensor(v) else v for k, v in tiny(images, texts).items()
            }
            got = loss(**out, output_dict=True)["contrastive_loss"]
            want = ref(out["image_features"], out["text_features"], out["logit_scale"], idx)
            assert_close_fp64(got.double(), want.double(), "recorded index")
            seen.append(idx)
    assert not loss.pending
    assert sorted(torch.cat(seen[:3]).tolist()) == list(range(12))
    assert loss.image_rate.visited.all()
    for a, b in zip(loss.state_dict().values(), ref.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="with_index"):
        loss(**out)
    iterable = torch.utils.data.DataLoader(_Stream())
    with pytest.raises(TypeError, match="map-style"):
        G.with_index(iterable, loss)


def test_apply_forwards_open_clip_settings(monkeypatch):
    """The patched forward builds gammacl.ClipLoss with the instance's own local_loss /
    gather_with_grad / cache_labels / rank / world_size (gammacl.ClipLoss's distributed semantics
    are checked against open_clip's in tests/test_distributed.py)."""
    seen = []

    class Recorder(gammacl.ClipLoss):
        def __init__(self, **kw):
            seen.append(kw)
            super().__init__(**{**kw, "world_size": 1, "rank": 0})

    monkeypatch.setattr(gammacl, "ClipLoss", Recorder)
    G.apply(backend="torch")
    img, txt = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    for local, with_grad, rank, world in [
        (True, True, 1, 4),
        (False, True, 0, 2),
        (True, False, 3, 4),
    ]:
        oc_loss.ClipLoss(local, with_grad, True, rank, world)(img, txt, 2.0)
        assert seen[-1] == dict(
            local_loss=local,
            gather_with_grad=with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world,
            backend="torch",
        )


def test_open_clip_checkpoints_carry_the_loss_state(tmp_path):
    """apply(loss=...): open_clip_train.main's torch.save of a training checkpoint adds the loss
    state, its pt_load of --resume restores it into the loss; revert() undoes both."""
    train_main = pytest.importorskip(
        "open_clip_train.main", reason="open_clip_train not importable"
    )
    torch_before, load_before = train_main.torch, train_main.pt_load
    loss = G.OpenClipSogCLRLoss(num_samples=6, backend="torch")
    G.apply(loss=loss)
    img, txt = torch.randn(3, 4), torch.randn(3, 4)
    loss(img, txt, 3.0, index=torch.tensor([0, 2, 4]))
    ck = {"epoch": 1, "name": "run", "state_dict": {}, "optimizer": {}}
    path = tmp_path / "epoch_1.pt"
    train_main.torch.save(ck, str(path))
    assert set(torch.load(path, weights_only=False)) == set(ck) | {G.CHECKPOINT_KEY}
    G.revert()
    assert train_main.torch is torch_before and train_main.pt_load is load_before
    fresh = G.OpenClipSogCLRLoss(num_samples=6, backend="torch")
    G.apply(loss=fresh)
    assert train_main.pt_load(str(path), map_location="cpu")["epoch"] == 1
    for k, v in loss.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh.image_rate.visited.tolist() == [1, 0, 1, 0, 1, 0]
    torch.save(ck, str(tmp_path / "plain.pt"))
    with pytest.warns(UserWarning, match="holds no 'gammacl_loss'"):
        train_main.pt_load(str(tmp_path / "plain.pt"), map_location="cpu")
