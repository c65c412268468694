"""gamma_onepass op (value + gradient of the decomposable negative term in one sweep) on every
CPU backend against gammacl.reference.gamma.gamma_onepass."""

import importlib
import math

import pytest
import torch
from conftest import cpu_backends
from tolerances import assert_close_dtype, assert_close_fp64

from gammacl.ops.gamma_onepass import _gamma_onepass_op, gamma_onepass
from gammacl.reference import gamma as ref

ALL = cpu_backends()
OUTPUTS = ("row_lse", "col_lse", "row_term", "col_term", "da_raw", "db_raw")


def _backend_fwd(backend):
    from gammacl.ops.gamma_onepass import _backend_impl

    return _backend_impl(backend)


def _inputs(m, n, d, dtype, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    alpha_r = (torch.randn(m, generator=g, dtype=torch.float64) - 2.0).to(acc)
    alpha_c = (torch.randn(n, generator=g, dtype=torch.float64) - 2.0).to(acc)
    return a.to(dtype), b.to(dtype), torch.tensor(scale, dtype=acc), alpha_r, alpha_c


# (M, N, D, offset): odd sizes, several tiles and D chunks for the interpreter (32-wide tiles),
# rectangular with positive / negative offsets
SHAPES = [(7, 7, 5, 0), (37, 37, 40, 0), (10, 13, 4, 3), (40, 35, 20, -2)]


# (backend, dtype) pairs; the torch backend up-casts to fp32 first, so 16-bit adds nothing there
_BACKEND_DTYPES = [
    pytest.param(p.values[0], dt, id=f"{p.id}-{str(dt).removeprefix('torch.')}", marks=p.marks)
    for p in ALL
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    if not (p.values[0] == "torch" and dt in (torch.float16, torch.bfloat16))
]


@pytest.mark.parametrize("backend,dtype", _BACKEND_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("clamp", [30.0, 0.5], ids=["cap-idle", "cap-bites"])
def test_onepass_outputs_match_reference(backend, dtype, shape, clamp):
    m, n, d, off = shape
    a, b, s, ar, ac = _inputs(m, n, d, dtype)
    out = _backend_fwd(backend)(a, b, s, ar, ac, 0.3, 0.7, clamp, off, True)
    r64 = ref.gamma_onepass(a, b, s, ar, ac, 0.3, 0.7, clamp, off, upcast=True)
    same = ref.gamma_onepass(a, b, s, ar, ac, 0.3, 0.7, clamp, off, upcast=False)
    for name, x, y, z in zip(OUTPUTS, out, r64, same, strict=True):
        assert x.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        assert_close_dtype(x, y, z, dtype, f"{backend} {dtype} {shape} clamp={clamp} {name}")


@pytest.mark.parametrize("backend", ALL)
def test_onepass_no_grad_skips_gradients(backend):
    a, b, s, ar, ac = _inputs(9, 9, 20, torch.float64)
    full = _backend_fwd(backend)(a, b, s, ar, ac, 0.5, 0.5, 30.0, 0, True)
    stats = _backend_fwd(backend)(a, b, s, ar, ac, 0.5, 0.5, 30.0, 0, False)
    assert stats[4].shape == (0, 20) and stats[5].shape == (0, 20)
    for name, x, y in zip(OUTPUTS[:4], stats[:4], full[:4], strict=True):
        assert_close_fp64(x, y, name)


@pytest.mark.parametrize("backend", ALL)
def test_onepass_all_excluded_and_nonfinite(backend):
    # N = 1 with the positive excluded: no entry at all -> LSE -inf, term 0, zero gradient
    a, b, s, ar, ac = _inputs(1, 1, 16, torch.float64)
    out = _backend_fwd(backend)(a, b, s, ar, ac, 0.5, 0.5, 30.0, 0, True)
    assert out[0].item() == float("-inf") and out[1].item() == float("-inf")
    assert out[2].item() == 0.0 and out[3].item() == 0.0
    assert torch.equal(out[4], torch.zeros_like(out[4])) and torch.equal(out[5], out[5] * 0)
    # a NaN feature makes exactly the statistics it touches NaN (what the rate state's guard
    # keys on): row 2, and every column but 2 (whose entry (2, 2) is the excluded positive)
    a, b, s, ar, ac = _inputs(6, 6, 16, torch.float32)
    a[2, 3] = float("nan")
    out = _backend_fwd(backend)(a, b, s, ar, ac, 0.5, 0.5, 30.0, 0, True)
    hit = torch.arange(6) == 2
    for name, x, want in zip(OUTPUTS[:4], out[:4], (hit, ~hit, hit, ~hit), strict=True):
        assert torch.equal(torch.isnan(x), want), f"{name}: {x}"


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("clamp", [30.0, -1.5], ids=["cap-idle", "cap-bites"])
def test_onepass_function_value_and_grads(backend, clamp):
    """neg and its stashed gradients (dA = scale W b, dB = scale W^T a, dscale = <a, W b>), also
    scaled by an upstream gradient."""
    m, n, d = 11, 11, 18
    a, b, s, ar, ac = _inputs(m, n, d, torch.float64)
    a.requires_grad_()
    b.requires_grad_()
    s.requires_grad_()
    neg, row, col, rt, ct = gamma_onepass(
        a, b, s, ar, ac, w_row=0.25, w_col=0.75, clamp=clamp, backend=backend
    )
    grads = torch.autograd.grad(3.0 * neg, (a, b, s))
    r = ref.gamma_onepass(a.detach(), b.detach(), s.detach(), ar, ac, 0.25, 0.75, clamp)
    assert_close_fp64(neg, 0.25 * r[2].sum() + 0.75 * r[3].sum(), "neg")
    for name, x, y in zip(OUTPUTS[:4], (row, col, rt, ct), r[:4], strict=True):
        assert not x.requires_grad
        assert_close_fp64(x, y, name)
    want = (3.0 * s.detach() * r[4], 3.0 * s.detach() * r[5], 3.0 * (a.detach() * r[4]).sum())
    for name, x, y in zip("abs", grads, want, strict=True):
        assert_close_fp64(x, y, f"grad {name}")
    if clamp > 0:  # cap idle: the stashed gradient is the true derivative of neg (autograd ref)
        a2, b2, s2 = (x.detach().clone().requires_grad_() for x in (a, b, s))
        r2 = ref.gamma_onepass(a2, b2, s2, ar, ac, 0.25, 0.75, clamp)
        ref_grads = torch.autograd.grad(
            3.0 * (0.25 * r2[2].sum() + 0.75 * r2[3].sum()), (a2, b2, s2)
        )
        for name, x, y in zip("abs", grads, ref_grads, strict=True):
            assert_close_fp64(x, y, f"autograd grad {name}")


@pytest.mark.parametrize("backend", ALL)
def test_onepass_gradcheck(backend):
    a, b, s, ar, ac = _inputs(5, 5, 16, torch.float64, scale=2.5)
    a.requires_grad_()
    b.requires_grad_()
    s.requires_grad_()
    fn = lambda a, b, s: gamma_onepass(a, b, s, ar, ac, w_row=0.1, w_col=0.1, backend=backend)[0]
    # fast_mode (random projections of the Jacobian) under the interpreter: ~1 s instead of 13
    assert torch.autograd.gradcheck(
        fn, (a, b, s), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=backend == "triton"
    )


def test_onepass_under_no_grad_and_frozen_inputs():
    a, b, s, ar, ac = _inputs(6, 6, 16, torch.float64)
    with torch.no_grad():
        neg0 = gamma_onepass(a, b, s, ar, ac, w_row=0.5, w_col=0.5, backend="torch")[0]
    neg1 = gamma_onepass(a, b, s, ar, ac, w_row=0.5, w_col=0.5, backend="torch")[0]
    assert not neg0.requires_grad and not neg1.requires_grad
    assert_close_fp64(neg0, neg1, "neg")


def test_onepass_opcheck():
    a, b, s, ar, ac = _inputs(6, 5, 16, torch.float32)
    # grad=False (what gamma_onepass passes when nothing needs a gradient): statistics only
    torch.library.opcheck(_gamma_onepass_op, (a, b, s, ar, ac, 0.5, 0.5, 30.0, 1, False, "torch"))
    a.requires_grad_()
    b.requires_grad_()
    s.requires_grad_()
    torch.library.opcheck(_gamma_onepass_op, (a, b, s, ar, ac, 0.5, 0.5, 30.0, 1, True, "torch"))


@pytest.mark.parametrize("backend", [p for p in ALL if p.values[0] in ("torch", "cpp")])
def test_onepass_many_row_chunks(backend, monkeypatch):
    """Chunked backends with a chunk of a few rows: column statistics merge across chunks."""
    simlse_mod = importlib.import_module("gammacl.ops.simlse")  # the package re-exports a function
    monkeypatch.setattr(simlse_mod, "_CHUNK_BYTES", 37 * 8 * 4)  # torch: 4 rows per chunk
    monkeypatch.setenv("GAMMACL_CPU_CHUNK_MIB", str(37 * 8 * 4 / 2**20))  # cpp: likewise
    a, b, s, ar, ac = _inputs(37, 37, 20, torch.float64)
    out = _backend_fwd(backend)(a, b, s, ar, ac, 0.3, 0.7, 30.0, 1, True)
    r64 = ref.gamma_onepass(a, b, s, ar, ac, 0.3, 0.7, 30.0, 1)
    for name, x, y in zip(OUTPUTS, out, r64, strict=True):
        assert_close_fp64(x, y, name)


NOT_TORCH = [p for p in ALL if p.values[0] != "torch"]


@pytest.mark.parametrize("backend", NOT_TORCH)
def test_onepass_fp16_large_batch_weights(backend):
    """fp16 inputs with the weights of a batch of B = 131072 (w = 0.5/B, alpha = -log(B-1)):
    W ~ 0.5/B^2 is below fp16's normal range, so an unscaled fp16 W loses the gradient (rel.
    error 0.7 before the per-tile power-of-two scaling). Compared with the fp32 torch backend
    relative to max|ref| (the gradients are ~1e-8: a max(1, .) scale would hide the loss)."""
    big_b = 131072
    a, b, s, _, _ = _inputs(32, 32, 16, torch.float16, scale=10.0)
    al = torch.full((32,), -math.log(big_b - 1), dtype=torch.float32)
    args = (s, al, al.clone(), 0.5 / big_b, 0.5 / big_b, 30.0, 0, True)
    out = _backend_fwd(backend)(a, b, *args)
    want = _backend_fwd("torch")(a, b, *args)
    for name, x, y in zip(OUTPUTS, out, want, strict=True):
        fin = torch.isfinite(y)
        m = float(y[fin].abs().max()) if fin.any() else 1.0
        m = m if m > 0 else 1.0  # compare at unit scale: the rule's absolute floor sits above 1e-8
        assert_close_dtype(x / m, y / m, None, torch.float16, f"{backend} B={big_b} {name}")


# the column-partial buffer budget exists only in the triton backend
_HUGE = [
    pytest.param(
        p.values[0], small, id=f"{p.id}-{'transposed' if small else 'merge'}", marks=p.marks
    )
    for p in NOT_TORCH
    for small in (False, True)
    if p.values[0] == "triton" or not small
]


@pytest.mark.parametrize("backend,small_part_buffer", _HUGE)
def test_onepass_huge_logits_fp64(backend, small_part_buffer, monkeypatch):
    """Unnormalised features, logits up to ~+-1000: e^{l} overflows fp64, so column partials
    must be merged in log space (col_lse finite and equal to the torch backend). With a tiny
    column-partial budget the triton backend takes the transposed atomic-free launch."""
    if small_part_buffer:
        monkeypatch.setattr(
            importlib.import_module("gammacl.kernels.gamma_onepass"), "_COL_PART_MAX_BYTES", 0
        )
    a, b, s, ar, ac = _inputs(40, 35, 16, torch.float64, scale=10.0)
    a, b = a * 10.0, b * 10.0
    assert float((s * a @ b.T).abs().max()) > 709.0  # past fp64's e^x range
    args = (s, ar, ac, 0.3, 0.7, 30.0, 1, True)
    out = _backend_fwd(backend)(a, b, *args)
    want = _backend_fwd("torch")(a, b, *args)
    assert torch.isfinite(out[1]).all(), out[1]
    for name, x, y in zip(OUTPUTS, out, want, strict=True):
        assert_close_fp64(x, y, f"{backend} {name}")


@pytest.mark.parametrize("backend", ALL)
def test_onepass_large_logits_within_10x_of_torch(backend):
    """Unnormalised features at scale 100 (|l| ~ 1e3): alpha = -(row / column max logit) keeps
    e^(l + alpha) in range, so every output depends on logits rounded at ~ulp(1e3). Each fp32
    output within 10x of the torch backend's own fp32 error against float64 (issue 13: the
    shift and the exponent from one rounded logit, in every backend)."""
    g = torch.Generator().manual_seed(7)
    m, n, d = 37, 29, 24
    a, b = torch.randn(m, d, generator=g) * 3, torch.randn(n, d, generator=g) * 3
    s = torch.tensor(100.0)
    lg = 100.0 * a.double() @ b.double().T
    ar, ac = (-lg.amax(1)).float(), (-lg.amax(0)).float()
    args = (0.3, 0.7, 30.0, 2)
    want = ref.gamma_onepass(a.double(), b.double(), s.double(), ar.double(), ac.double(), *args)
    base = _backend_fwd("torch")(a, b, s, ar, ac, *args, True)
    got = _backend_fwd(backend)(a, b, s, ar, ac, *args, True)

    def rel(u, y):
        return float((u.double() - y).abs().max() / y.abs().max().clamp_min(1e-300))

    for name, x, y, t in zip(OUTPUTS, got, want, base, strict=True):
        err, torch_err = rel(x, y), rel(t, y)
        assert err <= 10 * torch_err + 1e-7, f"{backend} {name}: {err:.2e} vs torch {torch_err:.2e}"
