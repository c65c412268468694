"""clip_loss / infonce_loss / ClipLoss on every CPU backend against gammacl.reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends
from tolerances import assert_close_dtype, assert_close_fp64

import gammacl
from gammacl import reference

ALL = cpu_backends()
NO_TRITON = cpu_backends(include_triton=False)


def _inputs(n, d, dtype, scale, m=None, normalise=True):
    a = torch.randn(n if m is None else m, d, dtype=torch.float64)
    b = torch.randn(n, d, dtype=torch.float64)
    if normalise:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    a = a.to(dtype).requires_grad_()
    b = b.to(dtype).requires_grad_()
    s = torch.tensor(
        scale, dtype=torch.float32 if dtype != torch.float64 else dtype, requires_grad=True
    )
    return a, b, s


def _loss_and_grads(fn, a, b, s, upstream=None):
    out = fn(a, b, s)
    g = torch.ones_like(out) if upstream is None else upstream
    grads = torch.autograd.grad(out, (a, b, s), g, allow_unused=True)
    return out.detach(), [
        x if x is not None else torch.zeros_like(y) for x, y in zip(grads, (a, b, s))
    ]


def _check(fn_ours, fn_ref, a, b, s, dtype, what, upstream=None):
    out, grads = _loss_and_grads(fn_ours, a, b, s, upstream)
    a64, b64, s64 = (x.detach().double().requires_grad_() for x in (a, b, s))
    ref, ref_g = _loss_and_grads(
        lambda *t: fn_ref(*t, upcast=True),
        a64,
        b64,
        s64,
        None if upstream is None else upstream.double(),
    )
    if dtype == torch.float64:
        assert_close_fp64(out, ref, f"{what} loss")
        for name, x, y in zip("abs", grads, ref_g):
            assert_close_fp64(x, y, f"{what} grad {name}")
        return
    same, same_g = _loss_and_grads(lambda *t: fn_ref(*t, upcast=False), a, b, s, upstream)
    assert out.dtype == torch.float32, f"{what}: loss dtype {out.dtype}, expected float32"
    assert_close_dtype(out, ref, same, dtype, f"{what} loss")
    for name, x, y, z in zip("abs", grads, ref_g, same_g):
        assert x.dtype == (a.dtype if name != "s" else s.dtype)
        assert_close_dtype(x, y, z, dtype, f"{what} grad {name}")


@pytest.mark.parametrize("backend", NO_TRITON)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 17, 129, 300])
@pytest.mark.parametrize("d", [1, 3, 33, 64])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_parity_shapes(backend, dtype, n, d, scale):
    a, b, s = _inputs(n, d, dtype, scale)
    _check(
        lambda *t: gammacl.clip_loss(*t, backend=backend),
        lambda *t, upcast: reference.clip_loss(*t, upcast=upcast),
        a,
        b,
        s,
        dtype,
        f"clip {backend} n={n} d={d} scale={scale}",
    )


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_clip_reductions_smoothing(backend, dtype, reduction, eps):
    n, d = (17, 33) if backend != "triton" else (9, 20)
    a, b, s = _inputs(n, d, dtype, 14.3)
    up = torch.rand(n, dtype=torch.float64) if reduction == "none" else None
    up = None if up is None else up.to(torch.float32 if dtype != torch.float64 else dtype)
    _check(
        lambda *t: gammacl.clip_loss(*t, reduction=reduction, label_smoothing=eps, backend=backend),
        lambda *t, upcast: reference.clip_loss(
            *t, reduction=reduction, label_smoothing=eps, upcast=upcast
        ),
        a,
        b,
        s,
        dtype,
        f"clip {backend} {reduction} eps={eps}",
        upstream=up,
    )


@pytest.mark.parametrize("backend", ALL)
def test_clip_permutation_labels(backend):
    n, d = 13, 16
    a, b, s = _inputs(n, d, torch.float64, 10.0)
    labels = torch.randperm(n)
    for red in ("mean", "none"):
        _check(
            lambda *t, red=red: gammacl.clip_loss(
                *t, labels=labels, reduction=red, label_smoothing=0.1, backend=backend
            ),
            lambda *t, upcast, red=red: reference.clip_loss(
                *t, labels=labels, reduction=red, label_smoothing=0.1, upcast=upcast
            ),
            a,
            b,
            s,
            torch.float64,
            f"clip labels {backend} {red}",
        )


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m,n", [(5, 17), (17, 17), (40, 9)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_infonce_rectangular_labels(backend, dtype, m, n, reduction):
    d = 33 if backend != "triton" else 20
    a, b, s = _inputs(n, d, dtype, 14.3, m=m)
    labels = torch.randint(0, n, (m,))
    up = torch.rand(m) if reduction == "none" else None
    up = None if up is None else up.to(torch.float32 if dtype != torch.float64 else dtype)
    _check(
        lambda *t: gammacl.infonce_loss(
            *t, labels=labels, reduction=reduction, label_smoothing=0.05, backend=backend
        ),
        lambda *t, upcast: reference.infonce_loss(
            *t, labels=labels, reduction=reduction, label_smoothing=0.05, upcast=upcast
        ),
        a,
        b,
        s,
        dtype,
        f"infonce {backend} {m}x{n}",
        upstream=up,
    )


@pytest.mark.parametrize("backend", NO_TRITON)
def test_gradcheck_fp64(backend):
    a, b, s = _inputs(7, 5, torch.float64, 3.0)
    assert torch.autograd.gradcheck(
        lambda a, b, s: gammacl.clip_loss(a, b, s, label_smoothing=0.1, backend=backend), (a, b, s)
    )
    q, k, s2 = _inputs(6, 5, torch.float64, 2.0, m=4)
    labels = torch.tensor([3, 0, 5, 5])
    assert torch.autograd.gradcheck(
        lambda q, k, s: gammacl.infonce_loss(
            q, k, s, labels=labels, reduction="none", backend=backend
        ),
        (q, k, s2),
    )


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_large_logits_match_reference(backend, dtype, seed, request):
    """Unnormalised features at scale 100 (|logit| up to ~1e4, far beyond exp's range): loss and
    all three gradients against the float64 reference with the tolerance rule (the fp32 bound is
    ~1e-5 relative; the old cpp / triton large-logit errors were 2e-4 .. 5e-3)."""
    n, d = 19, 24
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, d, generator=g) * 3).to(dtype).requires_grad_()
    b = (torch.randn(n, d, generator=g) * 3).to(dtype).requires_grad_()
    s = torch.tensor(100.0, requires_grad=True)
    _check(
        lambda *t: gammacl.clip_loss(*t, backend=backend),
        lambda *t, upcast: reference.clip_loss(*t, upcast=upcast),
        a,
        b,
        s,
        dtype,
        f"{backend} {dtype} large logits",
    )


@pytest.mark.parametrize("backend", ALL)
def test_n1_is_zero(backend):
    a, b, s = _inputs(1, 16, torch.float32, 14.3)
    loss = gammacl.clip_loss(a, b, s, backend=backend)
    loss.backward()
    assert float(loss) == 0.0
    for g in (a.grad, b.grad, s.grad):
        assert float(g.abs().max()) == 0.0


@pytest.mark.parametrize("backend", ALL)
def test_nan_propagates(backend):
    a, b, s = _inputs(9, 16, torch.float32, 14.3)
    with torch.no_grad():
        a[3, 2] = float("nan")
    assert torch.isnan(gammacl.clip_loss(a, b, s, backend=backend))
    a2, b2, s2 = _inputs(9, 16, torch.float32, 14.3)
    with torch.no_grad():
        b2[0, 0] = float("inf")
    assert torch.isnan(gammacl.clip_loss(a2, b2, s2, backend=backend))


@pytest.mark.parametrize("backend", NO_TRITON)
def test_inputs_not_modified_and_noncontiguous(backend):
    n, d = 23, 16
    base_a = torch.randn(d, n, dtype=torch.float64)
    big_b = torch.randn(n, 2 * d + 3, dtype=torch.float64)
    a = base_a.t().requires_grad_()  # stride (1, n)
    b = big_b[:, 3 : 3 + d].requires_grad_()  # column slice with storage offset
    snap = (base_a.clone(), big_b.clone())
    s = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    loss = gammacl.clip_loss(a, b, s, backend=backend)
    ga, gb, gs = torch.autograd.grad(loss, (a, b, s))
    assert torch.equal(base_a, snap[0]) and torch.equal(big_b, snap[1])
    ac, bc = a.detach().contiguous().requires_grad_(), b.detach().contiguous().requires_grad_()
    loss_c = gammacl.clip_loss(ac, bc, s, backend=backend)
    gac, gbc, gsc = torch.autograd.grad(loss_c, (ac, bc, s))
    assert_close_fp64(loss, loss_c, "non-contiguous loss")
    for x, y in ((ga, gac), (gb, gbc), (gs, gsc)):
        assert_close_fp64(x, y, "non-contiguous grads")


@pytest.mark.parametrize("backend", NO_TRITON)
def test_reduction_none_stride0_upstream(backend):
    a, b, s = _inputs(11, 8, torch.float64, 5.0)
    per = gammacl.clip_loss(a, b, s, reduction="none", backend=backend)
    g_sum = torch.autograd.grad(per.sum(), (a, b, s), retain_graph=True)  # stride-0 upstream
    ref = gammacl.clip_loss(a, b, s, reduction="sum", backend=backend)
    g_ref = torch.autograd.grad(ref, (a, b, s))
    for x, y in zip(g_sum, g_ref):
        assert_close_fp64(x, y, "stride-0 upstream")
    up = torch.arange(11, dtype=torch.float64).expand(3, 11)[0]  # a stride-0-ish view
    g = torch.autograd.grad(per, (a,), up, retain_graph=True)[0]
    r = reference.clip_loss(a, b, s, reduction="none")
    assert_close_fp64(g, torch.autograd.grad(r, (a,), up)[0], "custom upstream")


@pytest.mark.parametrize("form", ["float", "0d", "1elem"])
def test_logit_scale_forms(form):
    a, b, _ = _inputs(9, 8, torch.float32, 1.0)
    base = torch.tensor(14.3)
    s = {
        "float": 14.3,
        "0d": base.clone().requires_grad_(),
        "1elem": base.reshape(1).clone().requires_grad_(),
    }[form]
    loss = gammacl.clip_loss(a, b, s, backend="torch")
    ref = reference.clip_loss(a.detach(), b.detach(), 14.3)
    assert abs(float(loss) - float(ref)) < 1e-5
    if form != "float":
        loss.backward()
        assert s.grad.shape == s.shape and torch.isfinite(s.grad).all()


def _open_clip_oracle(image, text, logit_scale, logit_bias=None):
    """open_clip ClipLoss (world_size=1) as its source computes it: the test oracle."""
    logits_per_image = logit_scale * image @ text.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
    logits_per_text = logits_per_image.T
    labels = torch.arange(image.shape[0])
    return (
        torch.nn.functional.cross_entropy(logits_per_image, labels)
        + torch.nn.functional.cross_entropy(logits_per_text, labels)
    ) / 2


@pytest.mark.parametrize("backend", NO_TRITON)
def test_cliploss_dropin(backend):
    a, b, s = _inputs(12, 16, torch.float64, 14.3)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    mod = gammacl.ClipLoss(backend=backend)
    out = mod(image_features=a, text_features=b, logit_scale=s, logit_bias=bias, output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].ndim == 0
    grads = torch.autograd.grad(out["contrastive_loss"], (a, b, s, bias))
    ref = _open_clip_oracle(a, b, s, bias)
    ref_g = torch.autograd.grad(ref, (a, b, s, bias))
    assert_close_fp64(out["contrastive_loss"], ref, "ClipLoss value")
    for x, y in zip(grads, ref_g):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    plain = mod(a, b, s)
    assert_close_fp64(plain, ref, "ClipLoss without bias")
    assert mod.get_ground_truth(torch.device("cpu"), 5).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("local_loss", [False, True])
def test_cliploss_get_logits_single_process(local_loss):
    """open_clip's get_logits in one process: s A B^T and its transpose (+ bias), whatever
    local_loss says; their cross-entropy against get_ground_truth is ClipLoss's value."""
    a, b, s = _inputs(7, 5, torch.float64, 9.5)
    bias = torch.tensor(-1.25, dtype=torch.float64)
    mod = gammacl.ClipLoss(local_loss=local_loss, backend="torch")
    li, lt = mod.get_logits(a, b, s)
    want = s * a @ b.T
    torch.testing.assert_close(li, want, rtol=0, atol=0)
    torch.testing.assert_close(lt, want.T, rtol=0, atol=0)
    bi, bt = mod.get_logits(a, b, s, bias)
    torch.testing.assert_close(bi, want + bias, rtol=0, atol=0)
    torch.testing.assert_close(bt, want.T + bias, rtol=0, atol=0)
    gt = mod.get_ground_truth(a.device, 7)
    ce = (F.cross_entropy(li, gt) + F.cross_entropy(lt, gt)) / 2
    assert_close_fp64(mod(a, b, s), ce, "ClipLoss vs its own get_logits")


def test_accum_freq_pattern():
    """open_clip accum_freq: cached no-grad features concatenated with fresh ones."""
    a, b, s = _inputs(10, 8, torch.float64, 14.3)
    cached = a.detach()[:6]
    fresh = a.detach()[6:].clone().requires_grad_()
    loss = gammacl.clip_loss(torch.cat([cached, fresh]), b, s, backend="torch")
    g = torch.autograd.grad(loss, fresh)[0]
    full = a.detach().clone().requires_grad_()
    g_ref = torch.autograd.grad(reference.clip_loss(full, b, s), full)[0][6:]
    assert_close_fp64(g, g_ref, "accum_freq grads")


def test_no_grad_and_inference_mode_same_value():
    a, b, s = _inputs(9, 8, torch.float32, 14.3)
    train = gammacl.clip_loss(a, b, s, backend="torch")
    with torch.no_grad():
        ng = gammacl.clip_loss(a, b, s, backend="torch")
    with torch.inference_mode():
        im = gammacl.clip_loss(a, b, s, backend="torch")
    assert float(train) == float(ng) == float(im)


def test_retain_graph_twice_identical():
    a, b, s = _inputs(9, 8, torch.float64, 14.3)
    loss = gammacl.clip_loss(a, b, s, backend="torch")
    g1 = torch.autograd.grad(loss, (a, b, s), retain_graph=True)
    g2 = torch.autograd.grad(loss, (a, b, s))
    for x, y in zip(g1, g2):
        assert torch.equal(x, y)


def test_reference_backend_matches():
    a, b, s = _inputs(9, 8, torch.float64, 14.3)
    x = gammacl.clip_loss(a, b, s, backend="reference")
    y = gammacl.clip_loss(a, b, s, backend="torch")
    assert_close_fp64(x, y, "reference backend")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale,eps", [(0.001, 1.0), (1.0, 0.0), (14.3, 0.1)])
@pytest.mark.parametrize("d", [24, 160])  # 160: triton's large-D path (16-bit D > 128)
def test_dscale_16bit_where_it_cancels(backend, dtype, scale, eps, d):
    """d loss / d logit_scale = sum_ij W_ij s_ij - (positive and smoothing terms): at small scale
    or heavy smoothing the two nearly cancel. Fused paths that round W to the 16-bit operand
    dtype for the GEMMs must not form the first term from the rounded W (triton did: bf16,
    scale 1e-3, smoothing 1: 78% error; 0.3-0.5% at scales 1-14). Within 10x of the torch
    backend's error against float64 (the tolerance rule's bf16 allowance, 1e-2 x max|ref|, is
    far looser than this cancellation needs)."""
    n = 33
    g = torch.Generator().manual_seed(4)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)

    def ds(fn, a, b, dt):
        s = torch.tensor(scale, dtype=dt, requires_grad=True)
        fn(a, b, s).backward()
        return float(s.grad)

    want = ds(
        lambda *t: reference.clip_loss(*t, label_smoothing=eps),
        a.double(),
        b.double(),
        torch.float64,
    )
    base = ds(
        lambda *t: gammacl.clip_loss(*t, label_smoothing=eps, backend="torch"), a, b, torch.float32
    )
    got = ds(
        lambda *t: gammacl.clip_loss(*t, label_smoothing=eps, backend=backend), a, b, torch.float32
    )
    # + the fp32 summation floor of sum_ij W_ij S_ij: log2(#terms) eps32 sum_ij W_ij |S_ij| (the
    # fused paths sum per-tile partials; torch's error is sometimes far below this by luck)
    s64 = a.double() @ b.double().T
    lg = scale * s64
    cond = 0.5 * (lg.softmax(1) * s64.abs()).sum() / n + 0.5 * (lg.softmax(0) * s64.abs()).sum() / n
    floor = math.log2(n * n) * torch.finfo(torch.float32).eps * float(cond)
    bound = 10 * abs(base - want) + 1e-6 * abs(want) + floor
    assert abs(got - want) <= bound, (
        f"{backend}: dscale {got:.6e}, float64 {want:.6e}, torch {base:.6e}"
    )
