"""gammacl.integrations.transformers against Hugging Face CLIPModel(return_loss=True) on a tiny
CLIP built from a config (no hub access): loss and every parameter gradient, the Liger-style
patch and its revert."""

import copy
import os

import pytest
import torch
from tolerances import assert_close_dtype, assert_close_fp64

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip(
    "transformers", reason="optional dependency transformers (pip install 'gammacl[transformers]')"
)
from gammacl.integrations import transformers as G  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=12,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
        ),
        projection_dim=8,
        logit_scale_init_value=2.6592,
    )
    model = CLIPModel(cfg)
    with torch.no_grad():  # a non-default scale, so d/d logit_scale is tested at a generic point
        model.logit_scale.fill_(1.7)
    return model


def _inputs(n=6, seq=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[1, 5:] = 0
    mask[4, 3:] = 0
    pixels = torch.randn(n, 3, 8, 8, generator=g)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def _run(model, fn, inputs):
    model.zero_grad(set_to_none=True)
    loss = fn(model, inputs)
    loss.backward()
    return loss.detach(), {
        n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
    }


def _hf(model, inputs):
    pix = inputs["pixel_values"].to(next(model.parameters()).dtype)
    return model(**{**inputs, "pixel_values": pix}, return_loss=True).loss


def _ours(model, inputs):
    pix = inputs["pixel_values"].to(next(model.parameters()).dtype)
    return G.clip_loss_from_inputs(model, **{**inputs, "pixel_values": pix}, backend="torch")


def _check(tiny, ours_fn, theirs_fn=_hf):
    inputs = _inputs()
    ref, ref_g = _run(copy.deepcopy(tiny).double(), theirs_fn, inputs)
    lib, lib_g = _run(copy.deepcopy(tiny).float(), theirs_fn, inputs)
    out, out_g = _run(copy.deepcopy(tiny).float(), ours_fn, inputs)
    out64, out64_g = _run(copy.deepcopy(tiny).double(), ours_fn, inputs)
    assert_close_dtype(out.reshape(1), ref.reshape(1), lib.reshape(1), torch.float32, "loss")
    assert_close_fp64(out64, ref, "loss fp64")
    checked = 0
    for name, g in ref_g.items():
        assert (g is None) == (out_g[name] is None), name
        if g is None:
            continue
        assert_close_dtype(out_g[name], g, lib_g[name], torch.float32, name)
        assert_close_fp64(out64_g[name], g, f"{name} fp64")
        checked += 1
    assert checked >= 20 and ref_g["logit_scale"] is not None
    return ref


def test_clip_loss_from_inputs_matches_return_loss(tiny):
    _check(tiny, _ours)


def test_apply_patches_forward_and_reverts(tiny, monkeypatch):
    from transformers import CLIPModel
    from transformers.models.clip import modeling_clip

    original = CLIPModel.forward
    inputs = _inputs()
    model = copy.deepcopy(tiny).double()
    model.eval()
    ref = model(**{**inputs, "pixel_values": inputs["pixel_values"].double()}, return_loss=True)
    handle = G.apply_gammacl_to_clip(backend="torch")
    try:
        assert CLIPModel.forward is not original and G.is_patched()
        assert G.apply_gammacl_to_clip().revert() is None  # second apply: no-op handle
        assert G.is_patched()
        # the patched forward never calls the library's materialised loss
        calls = []
        monkeypatch.setattr(
            modeling_clip,
            "image_text_contrastive_loss",
            lambda s: calls.append(1) or torch.tensor(float("nan")),
        )
        out = model(**{**inputs, "pixel_values": inputs["pixel_values"].double()}, return_loss=True)
        assert not calls
        assert_close_fp64(out.loss, ref.loss, "patched loss")
        assert_close_fp64(out.logits_per_image, ref.logits_per_image, "eval logits kept")
        assert_close_fp64(out.text_embeds, ref.text_embeds, "text_embeds")
        model.train()
        out = model(**{**inputs, "pixel_values": inputs["pixel_values"].double()}, return_loss=True)
        assert out.logits_per_image is None and out.logits_per_text is None  # skipped in training
        tup = model(
            **{**inputs, "pixel_values": inputs["pixel_values"].double()},
            return_loss=True,
            return_dict=False,
        )
        _check_tuple_layout(tup, ref.to_tuple())  # transformers' layout, logits built
        # without return_loss the original forward runs unchanged
        out = model(**{**inputs, "pixel_values": inputs["pixel_values"].double()})
        assert out.loss is None and out.logits_per_image is not None
    finally:
        handle.revert()
    assert CLIPModel.forward is original and not G.is_patched()


def _double(inputs):
    return {**inputs, "pixel_values": inputs["pixel_values"].double()}


def _check_tuple_layout(tup, ref):
    """transformers' tuple: (loss, logits_per_image, logits_per_text, text_embeds, image_embeds,
    text output tuple, vision output tuple), element by element."""
    assert len(tup) == len(ref) == 7
    for k, (a, b) in enumerate(zip(tup, ref)):
        if isinstance(b, tuple):
            assert len(a) == len(b), k
            for x, y in zip(a, b):
                assert_close_fp64(x, y, f"tuple[{k}]")
        else:
            assert_close_fp64(a, b, f"tuple[{k}]")


@pytest.fixture(scope="module")
def tiny_siglip():
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    common = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=40, max_position_embeddings=12, **common),
        vision_config=dict(image_size=8, patch_size=4, **common),
    )
    model = SiglipModel(cfg)
    with torch.no_grad():  # a generic point: scale e^1.3, bias -2.5
        model.logit_scale.fill_(1.3)
        model.logit_bias.fill_(-2.5)
    return model


def test_siglip_patch_matches_transformers_sigmoid_loss(tiny_siglip):
    """SiglipModel patched: gammacl.siglip_loss equals transformers' own sigmoid loss (value and
    every parameter gradient, logit_scale and logit_bias included); tuple output keeps the
    layout; other classes are refused before anything is patched."""
    from transformers import CLIPTextModel, SiglipModel

    original = SiglipModel.forward
    inputs = _inputs()

    def theirs(m, x):
        pix = x["pixel_values"].to(next(m.parameters()).dtype)
        return original(m.train(), **{**x, "pixel_values": pix}, return_loss=True)

    handle = G.apply_gammacl_to_clip((SiglipModel,), backend="torch")
    try:
        assert SiglipModel.forward is not original
        ref = _check(tiny_siglip, lambda m, x: _hf(m.train(), x), lambda m, x: theirs(m, x).loss)
        m64 = copy.deepcopy(tiny_siglip).double().train()
        tup = m64(**_double(inputs), return_loss=True, return_dict=False)
        _check_tuple_layout(tup, original(m64, **_double(inputs), return_loss=True).to_tuple())
        assert_close_fp64(tup[0], ref, "tuple loss")
    finally:
        handle.revert()
    assert SiglipModel.forward is original
    with pytest.raises(ValueError, match="cannot patch CLIPTextModel.*SiglipModel"):
        G.apply_gammacl_to_clip((transformers.CLIPModel, CLIPTextModel))
    assert not G.is_patched()  # refused before patching CLIPModel


@pytest.mark.slow
def test_patched_training_forward_grads_match(tiny):
    """Loss and gradients through the patched CLIPModel.forward (train mode, logits skipped)
    equal the original return_loss=True."""
    handle = G.apply_gammacl_to_clip(backend="torch")
    try:
        patched = lambda m, x: _hf(m.train(), x)  # noqa: E731
        original = handle._originals[transformers.CLIPModel]

        def theirs(m, x):
            pix = x["pixel_values"].to(next(m.parameters()).dtype)
            return original(m.train(), **{**x, "pixel_values": pix}, return_loss=True).loss

        _check(tiny, patched, theirs)
    finally:
        handle.revert()
    G.revert_gammacl_clip()
    assert not G.is_patched()
