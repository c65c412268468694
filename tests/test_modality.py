"""Paper B modality regularisers (gammacl.modality) against the float64 pairwise reference
(gammacl.reference.modality): value and gradients on odd shapes, gradcheck, the Gram form of
geometric consistency against the pairwise form, backends, no N x N buffer, bad inputs."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends
from tolerances import assert_close_dtype, assert_close_fp64
from torch.utils._python_dispatch import TorchDispatchMode

from gammacl import modality as M
from gammacl.reference import modality as R

simlse_mod = importlib.import_module("gammacl.ops.simlse")  # gammacl.ops.simlse is also the op
BACKENDS = cpu_backends() + [pytest.param("reference", id="reference")]


def _feats(k, n, d, dtype, normalise=True, scale=1.0):
    out = []
    for _ in range(k):
        x = torch.randn(n, d, dtype=torch.float64)
        x = F.normalize(x, dim=1) if normalise else scale * x
        out.append(x.to(dtype).requires_grad_())
    return out


def _scale(value, dtype):
    return torch.tensor(
        value, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True
    )


def _value_grads(fn, inputs):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    return out.detach(), [
        torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)
    ]


def _check(ours, ref, inputs, dtype, what):
    """ours(*inputs) vs ref(*inputs64, upcast=True); lower precision also vs ref(upcast=False)."""
    out, grads = _value_grads(ours, inputs)
    in64 = [x.detach().double().requires_grad_() for x in inputs]
    ref64, ref_g = _value_grads(lambda *t: ref(*t, upcast=True), in64)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
    if dtype == torch.float64:
        assert_close_fp64(out, ref64, f"{what} loss")
        for i, (g, r) in enumerate(zip(grads, ref_g, strict=True)):
            assert_close_fp64(g, r, f"{what} grad {i}")
        return
    same, same_g = _value_grads(lambda *t: ref(*t, upcast=False), inputs)
    assert_close_dtype(out, ref64, same, dtype, f"{what} loss")
    for i, (g, r, s, x) in enumerate(zip(grads, ref_g, same_g, inputs, strict=True)):
        assert g.dtype == x.dtype, f"{what} grad {i} dtype {g.dtype} != input {x.dtype}"
        assert_close_dtype(g, r, s, dtype, f"{what} grad {i}")


# (name, number of feature tensors, needs logit_scale, ours, reference); ours/ref take
# (*features[, scale]) and ref also takes upcast=.
def _cases(backend="torch"):
    return {
        "orthogonality": (4, False, M.orthogonality_loss, R.orthogonality_loss),
        "uniformity": (
            2,
            False,
            lambda a, b: M.uniformity_loss(a, b, backend=backend),
            R.uniformity_loss,
        ),
        "uniformity_t0.7": (
            2,
            False,
            lambda a, b: M.uniformity_loss(a, b, 0.7, backend=backend),
            lambda a, b, upcast: R.uniformity_loss(a, b, 0.7, upcast=upcast),
        ),
        "feature_separation": (
            6,
            True,
            lambda *x: M.feature_separation_loss(*x, backend=backend),
            R.feature_separation_loss,
        ),
        "feature_separation_printed": (
            6,
            True,
            lambda *x: M.feature_separation_loss(*x, inmodal="printed", backend=backend),
            lambda *x, upcast: R.feature_separation_loss(*x, inmodal="printed", upcast=upcast),
        ),
        "brownian_bridge": (3, False, M.brownian_bridge_loss, R.brownian_bridge_loss),
        "brownian_bridge_t0": (
            3,
            False,
            lambda *x: M.brownian_bridge_loss(*x, t=0.0),
            lambda *x, upcast: R.brownian_bridge_loss(*x, 0.0, upcast=upcast),
        ),
        "geometric_consistency": (
            2,
            False,
            M.geometric_consistency_loss,
            R.geometric_consistency_loss,
        ),
        "geometric_consistency_aug": (
            4,
            False,
            M.geometric_consistency_loss,
            R.geometric_consistency_loss,
        ),
        "modality_contrastive": (
            4,
            True,
            lambda *x: M.modality_contrastive_loss(*x, backend=backend),
            R.modality_contrastive_loss,
        ),
        "modality_contrastive_printed": (
            4,
            True,
            lambda *x: M.modality_contrastive_loss(*x, inmodal="printed", backend=backend),
            lambda *x, upcast: R.modality_contrastive_loss(*x, inmodal="printed", upcast=upcast),
        ),
    }


CASES = list(_cases())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", [3, 16, 33])
@pytest.mark.parametrize("n", [1, 2, 17, 33])
@pytest.mark.parametrize("case", CASES)
def test_parity_odd_shapes(case, n, d, dtype):
    k, needs_scale, ours, ref = _cases()[case]
    inputs = _feats(k, n, d, dtype)
    if needs_scale:
        inputs.append(_scale(14.3, dtype))
    _check(ours, ref, inputs, dtype, f"{case} n={n} d={d} {dtype}")


@pytest.mark.parametrize("n", [1, 17])
def test_brownian_bridge_per_row_t(n):
    feats = _feats(3, n, 5, torch.float64)
    for t in (torch.rand(n, dtype=torch.float64), torch.rand(n, 1, dtype=torch.float64)):
        _check(
            lambda *x, t=t: M.brownian_bridge_loss(*x, t),
            lambda *x, upcast, t=t: R.brownian_bridge_loss(*x, t, upcast=upcast),
            feats,
            torch.float64,
            f"bridge per-row t {tuple(t.shape)}",
        )
    t = torch.rand(n, dtype=torch.float64, requires_grad=True)  # a learnable t gets a gradient
    g = torch.autograd.grad(M.brownian_bridge_loss(*feats, t), t)[0]
    t64 = t.detach().clone().requires_grad_()
    g_ref = torch.autograd.grad(R.brownian_bridge_loss(*feats, t64), t64)[0]
    assert_close_fp64(g, g_ref, "bridge dt")


def test_parity_unnormalised_and_large_scale():
    """The formulas hold for any vectors: uniformity / GC / bridge on unnormalised features,
    in-modal InfoNCE at logit_scale 100."""
    feats = _feats(2, 17, 7, torch.float64, normalise=False, scale=0.4)
    _check(
        lambda a, b: M.uniformity_loss(a, b, 1.3, backend="torch"),
        lambda a, b, upcast: R.uniformity_loss(a, b, 1.3, upcast=upcast),
        feats,
        torch.float64,
        "uniformity unnormalised",
    )
    feats = _feats(4, 17, 7, torch.float64, normalise=False, scale=0.7)
    _check(
        M.geometric_consistency_loss,
        R.geometric_consistency_loss,
        feats,
        torch.float64,
        "gc unnormalised",
    )
    _check(
        M.brownian_bridge_loss,
        R.brownian_bridge_loss,
        feats[:3],
        torch.float64,
        "bridge unnormalised",
    )
    inputs = _feats(4, 17, 7, torch.float64) + [_scale(100.0, torch.float64)]
    _check(
        lambda *x: M.modality_contrastive_loss(*x, backend="torch"),
        R.modality_contrastive_loss,
        inputs,
        torch.float64,
        "base loss scale 100",
    )


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(case):
    k, needs_scale, ours, _ = _cases()[case]
    inputs = _feats(k, 5, 4, torch.float64)
    if needs_scale:
        inputs.append(_scale(3.7, torch.float64))
    assert torch.autograd.gradcheck(ours, inputs, eps=1e-6, atol=1e-7)


def test_gradgradcheck_geometric_consistency():
    inputs = _feats(4, 5, 3, torch.float64)
    assert torch.autograd.gradgradcheck(M.geometric_consistency_loss, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("n,d", [(64, 8), (6, 40), (33, 33)])
def test_gram_form_equals_pairwise(n, d):
    """B.7's closed forms, checked independently of gammacl.modality: N L_GC from the d x d
    Grams, and its printed feature gradients, against the pairwise float64 definition."""
    v, t = _feats(2, n, d, torch.float64, normalise=False)
    loss = R.geometric_consistency_loss(v, t)
    gv, gt = torch.autograd.grad(loss, (v, t))
    v, t = v.detach(), t.detach()
    c_vv, c_tt, c_vt = v.t() @ v, t.t() @ t, v.t() @ t
    c_tv = c_vt.t()
    n_loss = (
        2 * (c_vv * c_tt).sum()
        - 2 * torch.trace(c_tv @ c_tv)
        + (c_vv**2).sum()
        + (c_tt**2).sum()
        - 2 * (c_vt**2).sum()
    )
    assert_close_fp64(n_loss / n, loss, "B.7 closed form")
    assert_close_fp64(4 / n * (v @ c_tt - t @ c_vt + v @ c_vv - t @ c_tv), gv, "B.7 dL/dZ_V")
    assert_close_fp64(4 / n * (t @ c_vv - v @ c_tv - v @ c_vt + t @ c_tt), gt, "B.7 dL/dZ_T")
    # and the library's Gram path (with the augmented pair) against the pairwise reference
    feats = _feats(4, n, d, torch.float64, normalise=False)
    _check(
        M.geometric_consistency_loss,
        R.geometric_consistency_loss,
        feats,
        torch.float64,
        f"gc gram n={n} d={d}",
    )


def test_zero_weights_keep_graph():
    v, t = _feats(2, 5, 3, torch.float64)
    loss = M.geometric_consistency_loss(v, t, inmodal_weight=0.0, crossmodal_weight=0.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(v.grad.abs().max()) == 0.0


def test_cyclip_compatible_form():
    """CyCLIP's (s*A - s*B)^2.mean()/s^2*B losses are Paper B's L_GC terms (s cancels)."""
    v, t = _feats(2, 17, 9, torch.float64)
    s = torch.tensor(31.0, dtype=torch.float64)
    inmodal, crossmodal = R.cyclip_cyclic_losses(v, t, s)
    ours = M.geometric_consistency_loss(
        v, t, form="cyclip", inmodal_weight=0.25, crossmodal_weight=0.6
    )
    assert_close_fp64(ours, 0.25 * inmodal + 0.6 * crossmodal, "cyclip form")
    assert_close_fp64(M.geometric_consistency_loss(v, t), inmodal + crossmodal, "paper == cyclip")
    mod = M.GeometricConsistencyLoss(
        2.0, form="cyclip", inmodal_weight=0.25, crossmodal_weight=0.25
    )
    assert_close_fp64(mod(v, t), 2.0 * 0.25 * (inmodal + crossmodal), "cyclip module")


def test_bridge_closed_form_erratum():
    """math.md B.3: the corrected closed form equals the first line for unit vectors."""
    v, t, a = _feats(3, 17, 6, torch.float64)
    for tt in (0.25, 0.8):
        assert_close_fp64(
            M.brownian_bridge_loss(v, t, a, tt),
            R.brownian_bridge_closed_form(v, t, a, tt),
            f"bridge t={tt}",
        )


def test_base_loss_is_cyclip_contrastive():
    """inmodal='cyclip': ((CE(I T^T) + CE(T I^T))/2 + (CE(I Ia^T) + CE(T Ta^T))/2) / 2."""
    v, t, va, ta = _feats(4, 17, 9, torch.float64)
    s = 14.3
    ce = lambda a, b: F.cross_entropy(s * a @ b.t(), torch.arange(17))
    expect = ((ce(v, t) + ce(t, v)) / 2 + (ce(v, va) + ce(t, ta)) / 2) / 2
    assert_close_fp64(
        M.modality_contrastive_loss(v, t, va, ta, s, backend="torch"), expect, "base vs CyCLIP"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_simlse_backends(backend, dtype):
    """The N x N parts (uniformity, in-modal InfoNCE, base loss) on every CPU backend; the
    Triton interpreter at a tiny shape (D + 2 = 7: ragged)."""
    n, d = (9, 5) if backend == "triton" else (17, 33)
    cases = _cases(backend)
    for name in ("uniformity", "feature_separation_printed", "modality_contrastive"):
        k, needs_scale, ours, ref = cases[name]
        inputs = _feats(k, n, d, dtype)
        if needs_scale:
            inputs.append(_scale(14.3, dtype))
        _check(ours, ref, inputs, dtype, f"{name} {backend} {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_uniformity_half_inputs(dtype):
    """Half inputs: the hi + lo split of -||u||^2/2 keeps the cancellation at fp32 level, so the
    loss matches float64 evaluated on the same half values far inside the half-precision error
    (a single half column for the norm would be off by ~2t * 2^-9)."""
    zi_v, zi_t = _feats(2, 17, 33, dtype)
    out, grads = _value_grads(lambda a, b: M.uniformity_loss(a, b, backend="torch"), [zi_v, zi_t])
    ref, ref_g = _value_grads(
        R.uniformity_loss, [x.detach().double().requires_grad_() for x in (zi_v, zi_t)]
    )
    assert out.dtype == torch.float32
    assert abs(float(out) - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))
    same, same_g = _value_grads(lambda a, b: R.uniformity_loss(a, b, upcast=False), [zi_v, zi_t])
    for g, r, s in zip(grads, ref_g, same_g, strict=True):
        assert g.dtype == dtype
        assert_close_dtype(g, r, s, dtype, f"uniformity {dtype} grad")

    # control: -||u||^2/2 in ONE half column misses the 1e-5 bound (so the check above can fail)
    def single_column_rows(u):
        h = (-0.5 * u.float().square().sum(1, keepdim=True)).to(dtype)
        one = torch.ones_like(h)
        a, b = torch.cat([u, h, one], 1), torch.cat([u, one, h], 1)
        return simlse_mod.simlse(a, b, torch.tensor(4.0), cols=False, backend="torch")[0]

    with torch.no_grad():
        rows = torch.cat([single_column_rows(zi_v), single_column_rows(zi_t)])
        single = torch.logsumexp(rows, 0) - math.log(17)
    assert abs(float(single) - float(ref)) > 1e-5 * max(1.0, abs(float(ref)))


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.max = max(self.max, x.numel())
        return out


def test_no_nxn_buffer(monkeypatch):
    """No op output reaches N x N: GC / bridge / orthogonality are O(N D + D^2); the simlse
    parts are chunked (torch backend, 64 KiB chunks here) -- and the pairwise reference does
    produce N x N, so the probe can see one."""
    monkeypatch.setattr(simlse_mod, "_CHUNK_BYTES", 64 * 1024)
    n, d = 512, 8
    z = _feats(6, n, d, torch.float32)
    s = _scale(14.3, torch.float32)
    runs = {
        "gc": lambda: M.geometric_consistency_loss(*z[:4]),
        "bridge": lambda: M.brownian_bridge_loss(*z[:3], 0.25),
        "separation": lambda: M.feature_separation_loss(*z, s, backend="torch"),
        "base": lambda: M.modality_contrastive_loss(*z[:4], s, backend="torch"),
    }
    for name, fn in runs.items():
        with _MaxNumel() as probe:
            fn().backward()
        assert probe.max <= n * n // 8, (
            f"{name}: an op produced {probe.max} elements (N^2 = {n * n})"
        )
    with _MaxNumel() as probe:
        R.geometric_consistency_loss(*z[:4], upcast=False).backward()
    assert probe.max >= n * n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_region_changes_nothing(dtype):
    """Called (forward and backward) inside torch.autocast, every loss still computes its Grams
    and statistics in fp32: same value and gradients as outside."""
    cases = _cases("torch")
    for name in (
        "geometric_consistency_aug",
        "feature_separation",
        "brownian_bridge",
        "modality_contrastive_printed",
    ):
        k, needs_scale, ours, _ = cases[name]
        inputs = _feats(k, 33, 16, torch.float32)
        if needs_scale:
            inputs.append(_scale(14.3, torch.float32))
        out, grads = _value_grads(ours, inputs)
        with torch.autocast("cpu", dtype=dtype):
            out_ac, grads_ac = _value_grads(ours, inputs)
        assert out_ac.dtype == torch.float32, name
        torch.testing.assert_close(out_ac, out, rtol=1e-6, atol=1e-6, msg=name)
        for g, g_ac in zip(grads, grads_ac, strict=True):
            torch.testing.assert_close(g_ac, g, rtol=1e-5, atol=1e-6, msg=name)


def test_modules():
    v, t, zi_v, zi_t, zi_va, zi_ta = _feats(6, 9, 5, torch.float64)
    s = 14.3
    fsl = M.FeatureSeparationLoss(0.5, t=1.5, inmodal="printed", backend="torch")
    out = fsl(v, t, zi_v, zi_t, zi_va, zi_ta, s, output_dict=True)
    assert list(out) == ["feature_separation_loss"]
    assert_close_fp64(
        out["feature_separation_loss"],
        0.5
        * R.feature_separation_loss(v, t, zi_v, zi_t, zi_va, zi_ta, s, t=1.5, inmodal="printed"),
        "FeatureSeparationLoss",
    )
    bbl = M.BrownianBridgeLoss(0.3, t=0.6)
    assert_close_fp64(bbl(v, t, zi_v), 0.3 * R.brownian_bridge_loss(v, t, zi_v, 0.6), "BBLoss")
    gen = torch.Generator().manual_seed(5)
    rnd = M.BrownianBridgeLoss(t="random", generator=gen)(v, t, zi_v, output_dict=True)
    t_drawn = torch.rand(9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert_close_fp64(
        rnd["brownian_bridge_loss"], R.brownian_bridge_loss(v, t, zi_v, t_drawn), "BBLoss random"
    )
    gcl = M.GeometricConsistencyLoss(0.25)
    assert_close_fp64(
        gcl(v, t, zi_va, zi_ta, output_dict=True)["geometric_consistency_loss"],
        0.25 * R.geometric_consistency_loss(v, t, zi_va, zi_ta),
        "GCLoss aug",
    )
    mcl = M.ModalityContrastiveLoss(backend="torch")
    assert_close_fp64(
        mcl(v, t, zi_va, zi_ta, s, output_dict=True)["contrastive_loss"],
        R.modality_contrastive_loss(v, t, zi_va, zi_ta, s),
        "ModalityContrastiveLoss",
    )


def _bad(n=4, d=3):
    return [torch.randn(n, d) for _ in range(6)]


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (
            lambda z: M.orthogonality_loss(z[0], torch.randn(5, 3), z[2], z[3]),
            ValueError,
            r"z_v and zi_v must have the same batch size for a paired loss, got 4 and 5",
        ),
        (
            lambda z: M.orthogonality_loss(z[0], z[1], z[2], torch.randn(4, 2)),
            ValueError,
            r"z_v and zi_t must have the same feature dimension, got 3 and 2",
        ),
        (
            lambda z: M.uniformity_loss(z[0], torch.randn(5, 3)),
            ValueError,
            r"zi_v and zi_t must have the same batch size",
        ),
        (
            lambda z: M.uniformity_loss(z[0], z[1], t=0.0),
            ValueError,
            r"t must be a finite positive number, got 0.0",
        ),
        (
            lambda z: M.uniformity_loss(z[0], z[1], t=float("nan")),
            ValueError,
            r"t must be a finite positive number",
        ),
        (
            lambda z: M.uniformity_loss(z[0], z[1], backend="gpu"),
            ValueError,
            r"backend must be one of",
        ),
        (
            lambda z: M.uniformity_loss(z[0], z[1].double()),
            TypeError,
            r"zi_v and zi_t must have the same dtype, got torch.float32 and torch.float64",
        ),
        (
            lambda z: M.uniformity_loss(z[0], z[1][:, 0]),
            ValueError,
            r"zi_t must be 2-D \[N, D\], got shape \(4,\)",
        ),
        (
            lambda z: M.feature_separation_loss(*z[:5], torch.randn(4, 7), 14.3),
            ValueError,
            r"z_v and zi_t_aug must have the same feature dimension, got 3 and 7",
        ),
        (
            lambda z: M.feature_separation_loss(*z, 14.3, inmodal="cycle"),
            ValueError,
            r"inmodal must be one of \('cyclip', 'printed'\), got 'cycle'",
        ),
        (
            lambda z: M.feature_separation_loss(*z, torch.ones(2)),
            ValueError,
            r"logit_scale must be a number or a tensor with one element",
        ),
        (
            lambda z: M.brownian_bridge_loss(*z[:3], t=1.5),
            ValueError,
            r"t must be in \[0, 1\], got 1.5",
        ),
        (lambda z: M.brownian_bridge_loss(*z[:3], t=-0.1), ValueError, r"t must be in \[0, 1\]"),
        (
            lambda z: M.brownian_bridge_loss(*z[:3], t=torch.tensor([0.1, 0.2, 1.2, 0.3])),
            ValueError,
            r"t must lie in \[0, 1\], got values in \[0.1.*, 1.2.*\]",
        ),
        (
            lambda z: M.brownian_bridge_loss(*z[:3], t=torch.tensor([0.1, float("nan"), 0.2, 0.3])),
            ValueError,
            r"t must lie in \[0, 1\]",
        ),
        (
            lambda z: M.brownian_bridge_loss(*z[:3], t=torch.rand(5)),
            ValueError,
            r"a per-row t must have shape \(4,\) or \(4, 1\), got \(5,\)",
        ),
        (
            lambda z: M.brownian_bridge_loss(*z[:3], t=torch.ones(4, dtype=torch.long)),
            TypeError,
            r"t must be a floating-point tensor",
        ),
        (
            lambda z: M.brownian_bridge_loss(z[0], z[1], torch.randn(3, 3)),
            ValueError,
            r"z_v and z_v_aug must have the same batch size for a paired loss, got 4 and 3",
        ),
        (
            lambda z: M.geometric_consistency_loss(z[0], torch.randn(4, 5)),
            ValueError,
            r"z_v and z_t must have the same feature dimension, got 3 and 5",
        ),
        (
            lambda z: M.geometric_consistency_loss(z[0], z[1], z[2]),
            ValueError,
            r"z_v_aug was given but z_t_aug is None",
        ),
        (
            lambda z: M.geometric_consistency_loss(z[0], z[1], z_t_aug=z[3]),
            ValueError,
            r"z_t_aug was given but z_v_aug is None",
        ),
        (
            lambda z: M.geometric_consistency_loss(z[0], z[1], z[2], torch.randn(2, 3)),
            ValueError,
            r"z_v and z_t_aug must have the same batch size",
        ),
        (
            lambda z: M.geometric_consistency_loss(z[0], z[1], z[2], z[3], form="cyclip"),
            ValueError,
            r"form='cyclip' has no augmented term",
        ),
        (
            lambda z: M.geometric_consistency_loss(z[0], z[1], form="clip"),
            ValueError,
            r"form must be one of \('paper', 'cyclip'\)",
        ),
        (
            lambda z: M.geometric_consistency_loss(z[0], z[1], inmodal_weight=-1.0),
            ValueError,
            r"inmodal_weight must be a finite number >= 0, got -1.0",
        ),
        (
            lambda z: M.modality_contrastive_loss(z[0], z[1], z[2], torch.randn(6, 3), 14.3),
            ValueError,
            r"z_v and z_t_aug must have the same batch size for a paired loss, got 4 and 6",
        ),
        (
            lambda z: M.modality_contrastive_loss(z[0], z[1], z[2], z[3], float("inf")),
            ValueError,
            r"logit_scale must be finite",
        ),
        (lambda z: M.BrownianBridgeLoss(t=2.0), ValueError, r"t must be in \[0, 1\], got 2.0"),
        (lambda z: M.BrownianBridgeLoss(t=torch.rand(4)), TypeError, r"pass a per-row t tensor"),
        (
            lambda z: M.FeatureSeparationLoss(weight=float("nan")),
            ValueError,
            r"weight must be a finite number >= 0",
        ),
        (lambda z: M.GeometricConsistencyLoss(form="x"), ValueError, r"form must be one of"),
        (lambda z: M.ModalityContrastiveLoss(backend="x"), ValueError, r"backend must be one of"),
    ],
)
def test_bad_inputs(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(_bad())


def test_uniformity_known_values():
    """Hand values: identical rows give G = 1 everywhere, log((N^2 + N^2) / N) = log 2N;
    orthonormal rows give N diagonal ones + e^{-2t} off-diagonal per modality."""
    n = 4
    same = torch.ones(n, 3, dtype=torch.float64) / math.sqrt(3)
    assert_close_fp64(
        M.uniformity_loss(same, same, backend="torch"),
        torch.tensor(math.log(2 * n), dtype=torch.float64),
        "identical rows",
    )
    eye = torch.eye(n, dtype=torch.float64)
    t = 2.0
    expect = math.log(2 * (n + n * (n - 1) * math.exp(-2 * t)) / n)
    assert_close_fp64(
        M.uniformity_loss(eye, eye, t, backend="torch"),
        torch.tensor(expect, dtype=torch.float64),
        "orthonormal rows",
    )
