"""The numerics contracts of docs/numerics.md on every CPU backend (torch, cpp, triton under the
interpreter, reference; cuda-emu with -m emu):
- a NaN / inf feature reaches the feature and scale gradients exactly where a materialised
  float64 cross-entropy puts non-finite values (same finite / non-finite pattern), also through
  the one-candidate "exactly 0" paths and with g = 0 rows;
- the simlse backward's all-excluded rows give W = 0 (gradient 0, never NaN) on every backend;
- one candidate (N = 1) gives a loss and gradients of exactly 0;
- backend="reference" on 16-bit inputs takes its GEMM in fp32;
- fp16 fused backwards keep every row's gradient when the upstream gradients span more than
  fp16's range (2^-24 and beyond), and overflow shows as inf as on torch / cpp.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends
from tolerances import simlse_fwd_bwd

import gammacl
from gammacl.ops.simlse import simlse

ALL = [*cpu_backends(), "reference"]


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def _scales(s, m, n, vector, seed):
    """(scale, col_scale): the 0-d s, or per-row / per-column scales around s (vector mode)."""
    if not vector:
        return s, None
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(m + n, generator=g, dtype=s.dtype)
    return s * (0.5 + u[:m]), s * (0.5 + u[m:])


def _materialised_clip(img, txt, s, one_direction=False):
    """float64 open_clip formula: CE(s I T^T, arange) (+ CE of the transpose) / 2."""
    logits = s * img @ txt.t()
    labels = torch.arange(img.shape[0])
    if one_direction:
        return F.cross_entropy(logits, labels)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _pattern(loss_fn, img, txt, s):
    a, b, sc = _leaves(img, txt, s)
    loss = loss_fn(a, b, sc)
    grads = torch.autograd.grad(loss, (a, b, sc))
    return torch.isfinite(loss).item(), [torch.isfinite(g) for g in grads]


def _bad(n, d, where, value, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g, dtype=torch.float64)
    txt = torch.randn(n, d, generator=g, dtype=torch.float64)
    side, row, col = where
    (img if side == 0 else txt)[row, col] = value
    return img, txt


CASES = [  # (n, d, (side, row, col), value)
    (5, 4, (0, 2, 1), float("nan")),
    (5, 4, (1, 0, 3), float("nan")),
    (6, 3, (0, 5, 0), float("inf")),
    (4, 1, (1, 1, 0), float("-inf")),
    (1, 3, (0, 0, 2), float("nan")),  # one pair: the "exactly 0" path
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("loss", ["clip", "infonce", "ClipLoss"])
def test_nonfinite_features_reach_the_gradients(backend, case, loss):
    n, d, where, value = CASES[case]
    img, txt = _bad(n, d, where, value, seed=case)
    s = torch.tensor(3.0, dtype=torch.float64)
    fn = _loss_fn(loss, backend)
    got = _pattern(fn, img, txt, s)
    want = _pattern(_loss_fn(loss, "torch"), img, txt, s)
    assert not got[0] and not want[0]
    assert not all(bool(x.all()) for x in got[1]), "a NaN loss with all-finite gradients"
    patterns = [("torch backend", want)]
    if math.isnan(value):  # NaN: also the materialised cross-entropy's pattern (for an inf
        # feature torch.logsumexp's LSE is inf where the materialised softmax's shift is NaN)
        one = loss == "infonce"
        patterns.append(
            (
                "materialised",
                _pattern(lambda a, b, sc: _materialised_clip(a, b, sc, one), img, txt, s),
            )
        )
    for what, (_, ref) in patterns:
        for name, x, y in zip(("image", "text", "scale"), got[1], ref, strict=True):
            assert torch.equal(x, y), f"{name}: pattern {x.tolist()} != {what} {y.tolist()}"


def _loss_fn(loss, backend):
    return {
        "clip": lambda a, b, sc: gammacl.clip_loss(a, b, sc, backend=backend),
        "infonce": lambda a, b, sc: gammacl.infonce_loss(a, b, sc, backend=backend),
        "ClipLoss": lambda a, b, sc: gammacl.ClipLoss(backend=backend)(a, b, sc),
    }[loss]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_simlse_zero_upstream_rows_still_propagate_nan(backend, vector):
    """g = 0 on the NaN row (and everywhere): W = 0 * exp(NaN) = NaN, as torch forms it (with
    vector scales the scale gradients g_r_i sum_j p_ij S_ij are NaN too)."""
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    a[1, 0] = float("nan")
    s, cs = _scales(torch.tensor(2.0, dtype=torch.float64), 4, 5, vector, seed=3)
    g_row, g_col = torch.zeros(4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)

    def run(name):
        return simlse_fwd_bwd(
            lambda x, y, z: simlse(x, y, z, backend=name, col_scale=cs), a, b, s, g_row, g_col, True
        )

    want = run("torch")
    got = run(backend)
    for x, y in zip(got[2:], want[2:], strict=True):
        assert torch.equal(torch.isfinite(x), torch.isfinite(y))
    assert torch.isnan(got[2][1]).all() and torch.isnan(got[3]).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("cols", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_simlse_all_excluded_rows_have_zero_gradient(backend, cols, dtype, vector):
    """N = 1 with exclude_pos: every row is all-excluded (LSE -inf), and the backward op gets
    upstream 1 on it anyway (its callers may pass any g): W = 0 on excluded entries, so the
    gradients are exactly 0, never -inf - -inf = NaN. With N = 2 and offset -1 rows 1, 2 keep one
    entry; every gradient matches the float64 reference."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a = torch.randn(5, 4, dtype=dtype)
    for n, offset in ((1, 0), (2, -1)):
        b = torch.randn(n, 4, dtype=dtype)
        s, cs = _scales(torch.tensor(3.0, dtype=acc), 5, n, vector, seed=n)
        cs = cs if cols else None
        row, col = simlse(a, b, s, offset, True, cols, backend, col_scale=cs)
        assert bool(torch.isneginf(row[0])) == (n == 1) and torch.isfinite(row[1:]).all()
        g_row, g_col = torch.ones(5, dtype=acc), torch.ones(n if cols else 0, dtype=acc)
        got = torch.ops.gammacl.simlse_backward(
            a, b, s, row, col, g_row, g_col, offset, True, cols, backend, cs
        )
        cs64 = cs.double() if cs is not None else None
        want = torch.ops.gammacl.simlse_backward(
            a.double(), b.double(), s.double(), row.double(), col.double(), g_row.double(),
            g_col.double(), offset, True, cols, "reference", cs64,
        )  # fmt: skip
        for name, x, y in zip(("da", "db", "dscale"), got, want, strict=True):
            assert torch.isfinite(x).all(), (name, n)
            torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-6, msg=name)
        if n == 1:
            assert torch.equal(got[0][0], torch.zeros(4, dtype=acc))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_candidate_is_exactly_zero(backend, dtype):
    """infonce_loss with one key and clip_loss with one pair: the loss and every gradient are
    exactly 0 (no negatives), even where the LSE and the positive logit round differently."""
    g = torch.Generator().manual_seed(7)
    for seed in range(4):
        q = torch.randn(3, 9, generator=g).to(dtype)
        k = torch.randn(1, 9, generator=g).to(dtype)
        s = torch.tensor(1e4 / (1 + seed))
        a, b, sc = _leaves(q, k, s)
        loss = gammacl.infonce_loss(
            a, b, sc, labels=torch.zeros(3, dtype=torch.long), backend=backend
        )
        grads = torch.autograd.grad(loss, (a, b, sc))
        assert loss.item() == 0.0, (seed, loss.item())
        assert all(torch.equal(x, torch.zeros_like(x)) for x in grads)
        a, b, sc = _leaves(q[:1], k, s)
        loss = gammacl.clip_loss(a, b, sc, backend=backend)
        assert loss.item() == 0.0, (seed, loss.item())


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_identical_16bit_rows_at_scale_1e4_give_log3(backend, dtype):
    """Three identical rows: every logit equals the positive one, so each CE is log 3 exactly.
    A 16-bit GEMM for S (positive term fp32) gave 3.11 on the reference backend."""
    g = torch.Generator().manual_seed(3)
    row = F.normalize(torch.randn(1, 64, generator=g), dim=1)
    x = row.expand(3, 64).to(dtype).contiguous()
    for fn in (gammacl.clip_loss, gammacl.infonce_loss):
        loss = fn(x, x, 1e4, backend=backend)
        # fp32 logits of magnitude 1e4: the LSE and the positive agree to ~ulp(1e4) = 1e-3
        assert abs(loss.item() - math.log(3.0)) < 4e-3, (fn.__name__, loss.item())


def _fp16_case(m, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1).half()
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).half()
    # upstream gradients spanning 2^-40 .. 2^4 across rows: neighbours differ by 2^-24 and more
    g_row = torch.exp2(-torch.arange(m, dtype=torch.float32) * (44.0 / max(m - 1, 1)) + 4.0)
    g_row = g_row[torch.randperm(m, generator=g)]
    g_col = torch.full((n,), 2.0**-30)  # small column term: rows are set by their own g_row
    return a, b, torch.tensor(7.0), g_row, g_col


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("d", [24, 160], ids=["fused", "large-d"])
@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_fp16_backward_keeps_every_row_when_upstream_spans_beyond_fp16(backend, d, vector):
    """fp16 triton / cuda backwards round W to fp16 for their GEMMs: with one global power-of-two
    scale, rows whose g is 2^-24 below the largest lost their gradient (0.004-0.02 instead of the
    true value). Each row's gradient must match the float64 reference relative to ITS OWN size,
    with a 0-d scale and with per-row / per-column scales (W then carries g_i rs_i)."""
    a, b, s, g_row, g_col = _fp16_case(37, 29, d, seed=d)
    s, cs = _scales(s, 37, 29, vector, seed=d)
    got = torch.ops.gammacl.simlse_backward(
        a, b, s, *simlse(a, b, s, 0, False, True, backend, col_scale=cs),
        g_row, g_col, 0, False, True, backend, cs,
    )  # fmt: skip
    a64, b64, s64 = a.double(), b.double(), s.double()
    cs64 = cs.double() if vector else None
    row, col = simlse(a64, b64, s64, 0, False, True, "reference", col_scale=cs64)
    want = torch.ops.gammacl.simlse_backward(
        a64, b64, s64, row, col, g_row.double(), g_col.double(), 0, False, True, "reference", cs64
    )
    da, da64 = got[0].double(), want[0]
    rel = (da - da64).norm(dim=1) / da64.norm(dim=1)
    # fp16 W (2^-11 relative) summed over N entries: a few 1e-3 at most, for every row
    assert float(rel.max()) < 1e-2, rel.tolist()
    db_rel = float((got[1].double() - want[1]).abs().max() / want[1].abs().max())
    assert db_rel < 2e-3, db_rel


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("d", [24, 160], ids=["fused", "large-d"])
def test_fp16_gradient_overflow_shows_as_inf(backend, d):
    """A true fp16 gradient beyond 65504 is inf on torch / cpp (their fp32 W, rounded at the end);
    the fused backends must not hide it behind a finite value (the global scale gave 0.004)."""
    a, b, s, g_row, g_col = _fp16_case(21, 19, d, seed=d + 1)
    g_row[3] = 1e30  # row 3's true dA ~ 1e30 * s: overflows fp16
    xs = _leaves(a, b, s)
    row, col = simlse(*xs, 0, False, True, backend)
    loss = (row * g_row).sum() + (col * g_col).sum()
    ga, gb, _ = torch.autograd.grad(loss, xs)
    ref = _leaves(a, b, s)
    r2, c2 = simlse(*ref, 0, False, True, "torch")
    ta, tb, _ = torch.autograd.grad((r2 * g_row).sum() + (c2 * g_col).sum(), ref)
    assert torch.isinf(ta[3]).any() and torch.equal(torch.isfinite(ga), torch.isfinite(ta))
    assert torch.equal(torch.isfinite(gb), torch.isfinite(tb))
    others = torch.ones(21, dtype=torch.bool)
    others[3] = False
    torch.testing.assert_close(ga[others].float(), ta[others].float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("d", [64, 160], ids=["one-pass", "chunked"])
def test_siglip_fp16_subnormal_weights_are_scaled(backend, d):
    """SigLIP's W_ij = -z sigmoid(-z l_ij) with orthonormal rows a, b = c a, logit_scale 1 and
    logit_bias -14.28, c = 28.56: every logit is -14.28 (negatives) or +14.28 (positives), so every
    |W_ij| is sigmoid(-14.28) = 6.3e-7 = 10.5 units of fp16's smallest subnormal (6e-8): the
    whole gradient is the N^2 tiny weights (the regime of N sigmoid(bias) >= 1 at bias -10 and
    N >~ 2e4), and each rounds by ~5% in fp16. The fp16 paths that round W for their GEMMs must
    scale it (kernels/siglip.py FP16_W_SCALE = 2^14, csrc/siglip_cuda.cpp kFp16WScale): d loss /
    d logit_scale = <A, W B> / N comes from those GEMMs in fp32 (the feature gradients themselves
    are fp16 subnormals here, ~2e-7, so they are not the probe)."""
    g = torch.Generator().manual_seed(d)
    n, c = 48, 28.56
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    a = q.t().contiguous().half()
    b = (a.double() * c).half()
    xs = _leaves(a, b, torch.tensor(1.0), torch.tensor(-14.28))
    got = torch.autograd.grad(gammacl.siglip_loss(*xs, backend=backend), xs[2:])
    r = _leaves(*(x.double() for x in xs))
    z = 2 * torch.eye(n, dtype=torch.float64) - 1
    loss = -F.logsigmoid(z * (r[2] * r[0] @ r[1].t() + r[3])).sum() / n
    want = torch.autograd.grad(loss, r[2:])
    for name, x, y in zip(("d logit_scale", "d logit_bias"), got, want, strict=True):
        rel = float((x.double() - y).abs() / y.abs())
        assert rel < 1e-3, (name, rel)  # scaled: ~5e-5; unscaled W: ~4e-2
