"""Bad input -> a clear ValueError/TypeError naming the argument and values, before any kernel."""

import re

import pytest
import torch

import gammacl


def f32(*shape):
    return torch.randn(*shape)


CASES = [
    # (args, kwargs, exception, message pattern)
    (
        (f32(4), f32(4, 8), 1.0),
        {},
        ValueError,
        r"image_features must be 2-D \[N, D\], got shape \(4,\)",
    ),
    ((f32(4, 8), f32(2, 4, 8), 1.0), {}, ValueError, r"text_features must be 2-D"),
    ((f32(4, 8), f32(4, 7), 1.0), {}, ValueError, r"same feature dimension, got 8 and 7"),
    ((f32(4, 7), f32(4, 8), 1.0), {}, ValueError, r"same feature dimension, got 7 and 8"),
    ((f32(4, 8), f32(5, 8), 1.0), {}, ValueError, r"same batch size .* got 4 and 5"),
    ((f32(5, 8), f32(4, 8), 1.0), {}, ValueError, r"same batch size .* got 5 and 4"),
    ((f32(0, 8), f32(0, 8), 1.0), {}, ValueError, r"image_features is an empty batch"),
    ((f32(4, 0), f32(4, 0), 1.0), {}, ValueError, r"feature dimension 0"),
    (
        (torch.ones(4, 8, dtype=torch.int64), f32(4, 8), 1.0),
        {},
        TypeError,
        r"image_features must be float16, bfloat16, float32 or float64, got torch.int64",
    ),
    ((torch.ones(4, 8, dtype=torch.bool), f32(4, 8), 1.0), {}, TypeError, r"got torch.bool"),
    (
        (f32(4, 8), f32(4, 8).half(), 1.0),
        {},
        TypeError,
        r"same dtype, got torch.float32 and torch.float16",
    ),
    (
        (f32(4, 8), f32(4, 8), torch.ones(2)),
        {},
        ValueError,
        r"logit_scale must be a number or a tensor with one element, got shape \(2,\)",
    ),
    (
        (f32(4, 8), f32(4, 8), torch.ones((), dtype=torch.int64)),
        {},
        TypeError,
        r"logit_scale must be a floating-point tensor",
    ),
    ((f32(4, 8), f32(4, 8), "1.0"), {}, TypeError, r"logit_scale must be a float or a tensor"),
    ((f32(4, 8), f32(4, 8), float("nan")), {}, ValueError, r"logit_scale must be finite"),
    (
        (f32(4, 8), f32(4, 8), 1.0),
        {"reduction": "avg"},
        ValueError,
        r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'",
    ),
    (
        (f32(4, 8), f32(4, 8), 1.0),
        {"label_smoothing": 1.5},
        ValueError,
        r"label_smoothing must be in \[0, 1\], got 1.5",
    ),
    ((f32(4, 8), f32(4, 8), 1.0), {"label_smoothing": -0.1}, ValueError, r"in \[0, 1\]"),
    (
        (f32(4, 8), f32(4, 8), 1.0),
        {"labels": torch.tensor([0, 1, 2, 4])},
        ValueError,
        r"labels must lie in \[0, 3\], got values in \[0, 4\]",
    ),
    (
        (f32(4, 8), f32(4, 8), 1.0),
        {"labels": torch.tensor([0, 1, 2, -1])},
        ValueError,
        r"labels must lie in \[0, 3\], got values in \[-1, 2\]",
    ),
    (
        (f32(4, 8), f32(4, 8), 1.0),
        {"labels": torch.tensor([0, 1, 1, 2])},
        ValueError,
        r"must be a permutation",
    ),
    (
        (f32(4, 8), f32(4, 8), 1.0),
        {"labels": torch.tensor([0.0, 1, 2, 3])},
        TypeError,
        r"labels must be an integer",
    ),
    (
        (f32(4, 8), f32(4, 8), 1.0),
        {"labels": torch.tensor([0, 1, 2])},
        ValueError,
        r"labels must have shape \(4,\), got \(3,\)",
    ),
    (
        (f32(4, 8), f32(4, 8), 1.0),
        {"backend": "cudnn"},
        ValueError,
        r"backend must be one of .* got 'cudnn'",
    ),
]


@pytest.mark.parametrize("args,kwargs,exc,pattern", CASES)
def test_clip_loss_bad_input(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gammacl.clip_loss(*args, **kwargs)


def test_infonce_bad_input():
    with pytest.raises(ValueError, match=r"queries and keys must have the same feature dimension"):
        gammacl.infonce_loss(f32(3, 4), f32(5, 6), 1.0)
    with pytest.raises(ValueError, match=r"queries \(6 rows\) cannot outnumber keys \(5 rows\)"):
        gammacl.infonce_loss(f32(6, 4), f32(5, 4), 1.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\]"):
        gammacl.infonce_loss(f32(6, 4), f32(5, 4), 1.0, labels=torch.full((6,), 5))


def test_mixed_devices_meta():
    a, b = f32(4, 8), torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match=r"text_features is on the meta device"):
        gammacl.clip_loss(a, b, 1.0)
    with pytest.raises(ValueError, match=r"logit_scale is on meta but the features are on cpu"):
        gammacl.clip_loss(a, f32(4, 8), torch.empty((), device="meta"))


def test_unavailable_backends_raise():
    a, b = f32(4, 8), f32(4, 8)
    with pytest.raises(RuntimeError, match=r"backend='cuda' runs on CUDA tensors"):
        gammacl.clip_loss(a, b, 1.0, backend="cuda")


def test_env_backend_invalid(monkeypatch):
    monkeypatch.setenv("GAMMACL_BACKEND", "fast")
    with pytest.raises(ValueError, match=re.escape("GAMMACL_BACKEND must be one of")):
        gammacl.clip_loss(f32(4, 8), f32(4, 8), 1.0)


def test_cliploss_constructor_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        gammacl.ClipLoss(backend="nope")
    with pytest.raises(ValueError, match="use_horovod"):
        gammacl.ClipLoss(use_horovod=True)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("which", ["image_features", "text_features", "both"])
def test_meta_device_features_named(backend, which):
    """Meta tensors carry no data: a clear error naming the argument and the device, not
    torch's "unsupported scalarType" from deep inside a kernel."""
    img = torch.empty(4, 8, device="meta" if which != "text_features" else "cpu")
    txt = torch.empty(4, 8, device="meta" if which != "image_features" else "cpu")
    first = "text_features" if which == "text_features" else "image_features"
    with pytest.raises(ValueError, match=rf"{first} is on the meta device \(shape \(4, 8\)"):
        gammacl.clip_loss(img, txt, 2.0, backend=backend)
    with pytest.raises(ValueError, match=r"is on the meta device"):
        gammacl.infonce_loss(img, txt, 2.0, backend=backend)
    with pytest.raises(ValueError, match=rf"{first} is on the meta device"):
        gammacl.ClipLoss(backend=backend)(img, txt, torch.tensor(2.0, device=img.device))


@pytest.mark.parametrize(
    "rank, world_size, exc, pattern",
    [
        (3, 2, ValueError, "rank=3, world_size=2"),
        (1, 2, RuntimeError, "rank=1, world_size=2.*process group"),
        (0, 0, ValueError, "world_size=0"),
        (1.5, 2, TypeError, "rank must be an int"),
    ],
)
def test_cliploss_rank_errors_name_the_rank(rank, world_size, exc, pattern):
    img = torch.randn(3, 4)
    with pytest.raises(exc, match=pattern):
        gammacl.ClipLoss(rank=rank, world_size=world_size)(img, img, 2.0)


def test_numpy_ints_accepted_as_ranks():
    np = pytest.importorskip("numpy")
    img = torch.randn(3, 4)
    loss = gammacl.ClipLoss(rank=None, world_size=np.int64(1))(img, img, 2.0)
    assert torch.equal(loss, gammacl.ClipLoss()(img, img, 2.0))
