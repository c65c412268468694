"""Vector scales in the simlse op (issue 24): a row scale rs [M] for the row LSE and a column
scale cs [N] for the column LSE (gammacl.ops.simlse, docs/math.md §1.1), on every backend that
runs on CPU tensors here, against the float64 reference; the reference's own backward against
autograd of its forward; gradcheck, opcheck, torch.compile and the argument checks.

Chunking is forced to more than one trip (torch: _CHUNK_BYTES; cpp: GAMMACL_CPU_CHUNK_MIB; cuda
emulator: GAMMACL_CUDA_CHUNK_MIB); triton's tiles are 64 x 64 under the interpreter, so its
shapes cross a tile edge (M, N = 67).
"""

import importlib

import pytest
import torch
from conftest import cpu_backends
from tolerances import assert_close_dtype, assert_close_fp64

from gammacl import reference
from gammacl.ops.simlse import _simlse_backward_op, simlse

simlse_mod = importlib.import_module("gammacl.ops.simlse")  # gammacl.ops.simlse is also the op

# the backends with the vector-scale path (issue 24 item 2 lands them one by one)
VEC = ("torch", "cpp", "triton", "cuda")
BACKENDS = [p for p in cpu_backends() if p.values[0] in VEC]
NAMES = ("row", "col", "da", "db", "drs", "dcs")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(m, n, d, dtype, lo=1.0, hi=100.0, unit=True):
    """Features (unit rows unless told) and scales spread over [lo, hi] (1/tau for tau in
    [1/hi, 1/lo]: the per-sample temperatures of iSogCLR), float64 master copies."""
    a, b = torch.randn(m, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    if unit:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    rs = lo + (hi - lo) * torch.rand(m, dtype=torch.float64)
    cs = lo + (hi - lo) * torch.rand(n, dtype=torch.float64)
    return a.to(dtype), b.to(dtype), rs.to(_acc(dtype)), cs.to(_acc(dtype))


def _fwd_bwd(fn, a, b, rs, cs, g_row, g_col, cols):
    """(row, col, dA, dB, drs, dcs) of sum(g_row * row) + [cols] sum(g_col * col) on fresh leaves
    (upstream 0 where an LSE is -inf: all-excluded rows / columns)."""
    a, b, rs, cs = (x.detach().clone().requires_grad_() for x in (a, b, rs, cs))
    row, col = fn(a, b, rs, cs)
    loss = (torch.where(torch.isfinite(row), row, 0) * g_row.to(row.dtype)).sum()
    if cols:
        loss = loss + (torch.where(torch.isfinite(col), col, 0) * g_col.to(col.dtype)).sum()
    grads = torch.autograd.grad(loss, (a, b, rs, cs), allow_unused=True)
    grads = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (a, b, rs, cs)))
    return (row.detach(), col.detach(), *grads)


def _op(backend, offset, exclude, cols):
    return lambda a, b, rs, cs: simlse(
        a, b, rs, offset=offset, exclude_pos=exclude, cols=cols, backend=backend, col_scale=cs
    )


def _ref(offset, exclude, cols, upcast):
    return lambda a, b, rs, cs: reference.simlse(
        a, b, rs, offset=offset, exclude_pos=exclude, cols=cols, upcast=upcast, col_scale=cs
    )


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Every chunked backend at a few rows per chunk (several trips and a short last one)."""
    monkeypatch.setattr(simlse_mod, "_CHUNK_BYTES", 3 * 67 * 8)  # torch: 3 rows at N <= 67
    monkeypatch.setenv("GAMMACL_CPU_CHUNK_MIB", str(3 * 67 * 8 / 2**20))
    monkeypatch.setenv("GAMMACL_CUDA_CHUNK_MIB", str(3 * 67 * 8 / 2**20))
    monkeypatch.setenv("GAMMACL_TRITON_CHUNK_MIB", str(32 * 67 * 2 / 2**20))  # large D: 32 rows


SHAPES = [  # m, n, d, offset
    (17, 67, 3, 0),
    (67, 17, 33, 1),
    (1, 5, 4, -2),
    (9, 1, 2, 0),
]


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *BACKENDS])
@pytest.mark.parametrize(("m", "n", "d", "offset"), SHAPES)
def test_vscale_fp64_parity(backend, m, n, d, offset, tiny_chunks):
    """Every statistic and gradient at float64, scales over [1, 100] (logits up to +-100),
    exclude_pos x cols, the excluded diagonal at several offsets."""
    a, b, rs, cs = _inputs(m, n, d, torch.float64)
    g_row, g_col = torch.randn(m, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    for exclude in (False, True):
        for cols in (False, True):
            args = (a, b, rs, cs, g_row, g_col, cols)
            got = _fwd_bwd(_op(backend, offset, exclude, cols), *args)
            want = _fwd_bwd(_ref(offset, exclude, cols, True), *args)
            for name, x, y in zip(NAMES, got, want, strict=True):
                assert_close_fp64(x, y, f"{name} exclude={exclude} cols={cols}")
                assert not torch.isnan(x).any(), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vscale_low_precision(backend, dtype, tiny_chunks):
    """At the inputs' own dtype: error at most 2x PyTorch's own (the reference run in that dtype)
    plus the table's allowance (tests/tolerances.py); unnormalised features, logits to ~+-300."""
    m, n, d, offset = 67, 17, 33, 1
    a, b, rs, cs = _inputs(m, n, d, dtype, lo=0.5, hi=60.0, unit=False)
    a, b = (x / x.float().norm(dim=1, keepdim=True).mean().to(dtype) * 2 for x in (a, b))
    g_row, g_col = torch.randn(m), torch.randn(n)
    for exclude, cols in ((False, True), (True, True), (True, False)):
        args = (g_row, g_col, cols)
        got = _fwd_bwd(_op(backend, offset, exclude, cols), a, b, rs, cs, *args)
        up = (a.double(), b.double(), rs.double(), cs.double())
        want = _fwd_bwd(_ref(offset, exclude, cols, True), *up, *args)
        same = _fwd_bwd(_ref(offset, exclude, cols, False), a, b, rs, cs, *args)
        for name, x, y, z in zip(NAMES, got, want, same, strict=True):
            assert x.dtype == (dtype if name in ("da", "db") else _acc(dtype)), (name, x.dtype)
            assert_close_dtype(x, y, z, dtype, f"{name} {dtype} exclude={exclude} cols={cols}")


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "triton"])
@pytest.mark.parametrize(("dtype", "d"), [(torch.float32, 80), (torch.bfloat16, 136)])
def test_vscale_triton_large_d(backend, dtype, d, tiny_chunks):
    """The GEMM-tiled path (kernels/simlse_tiled.py: D > 64 fp32, > 128 16-bit) with vector
    scales: 40 rows in two chunks of 32, 2 x 2 tiles of 32 under the interpreter, K loop of 2-3."""
    m, n, offset = 40, 33, -1
    a, b, rs, cs = _inputs(m, n, d, dtype, lo=0.5, hi=60.0)
    g_row, g_col = torch.randn(m), torch.randn(n)
    for exclude, cols in ((False, True), (True, True), (True, False)):
        args = (g_row, g_col, cols)
        got = _fwd_bwd(_op(backend, offset, exclude, cols), a, b, rs, cs, *args)
        up = (a.double(), b.double(), rs.double(), cs.double())
        want = _fwd_bwd(_ref(offset, exclude, cols, True), *up, *args)
        same = _fwd_bwd(_ref(offset, exclude, cols, False), a, b, rs, cs, *args)
        for name, x, y, z in zip(NAMES, got, want, same, strict=True):
            assert_close_dtype(x, y, z, dtype, f"{name} {dtype} exclude={exclude} cols={cols}")


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(*p.values, marks=[*p.marks, pytest.mark.slow], id=p.id)
        if p.values[0] == "triton"
        else p
        for p in BACKENDS
    ],
)
def test_vscale_gradcheck(backend, tiny_chunks):
    """Finite differences of the op itself, all four inputs, both excluded and plain."""
    a, b, rs, cs = _inputs(6, 5, 3, torch.float64, lo=0.5, hi=8.0)
    leaves = tuple(x.requires_grad_() for x in (a, b, rs, cs))
    for offset, exclude, cols in ((0, False, True), (1, True, True), (-1, True, False)):
        fn = _op(backend, offset, exclude, cols)
        assert torch.autograd.gradcheck(fn, leaves), (offset, exclude, cols)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "offset", "exclude", "cols"),
    [
        (torch.float64, 0, False, True),
        (torch.float32, 1, True, False),
        (torch.bfloat16, -2, True, True),
    ],
)
def test_vscale_opcheck(backend, dtype, offset, exclude, cols):
    a, b, rs, cs = _inputs(7, 5, 16, dtype, lo=0.5, hi=8.0)
    if dtype == torch.float64:
        a, b, rs, cs = (x.requires_grad_() for x in (a, b, rs, cs))
    torch.library.opcheck(simlse, (a, b, rs, offset, exclude, cols, backend, cs))
    a, b, rs, cs = (x.detach() for x in (a, b, rs, cs))
    row, col = simlse(a, b, rs, offset, exclude, cols, backend, cs)
    g_row, g_col = torch.rand_like(row), torch.rand_like(col)
    torch.library.opcheck(
        _simlse_backward_op,
        (a, b, rs, row, col, g_row, g_col, offset, exclude, cols, backend, cs if cols else None),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_vscale_constant_equals_scalar(backend):
    """rs = cs = t reproduces the scalar op: both LSEs, dA, dB, and sum(drs) + sum(dcs) = dt
    (every logit reads the one t)."""
    m, n, d = 11, 9, 5
    a, b, _, _ = _inputs(m, n, d, torch.float64)
    t = torch.tensor(37.0, dtype=torch.float64)
    g_row, g_col = torch.randn(m, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    for exclude, cols in ((False, True), (True, True), (True, False)):
        vec = _fwd_bwd(
            _op(backend, 1, exclude, cols), a, b, t.expand(m), t.expand(n), g_row, g_col, cols
        )
        leaves = (
            a.clone().requires_grad_(),
            b.clone().requires_grad_(),
            t.clone().requires_grad_(),
        )
        row, col = simlse(*leaves, offset=1, exclude_pos=exclude, cols=cols, backend=backend)
        loss = (torch.where(torch.isfinite(row), row, 0) * g_row).sum() + (
            (col * g_col).sum() if cols else 0
        )
        da, db, dt = torch.autograd.grad(loss, leaves)
        for name, x, y in zip(NAMES[:4], vec[:4], (row, col, da, db)):
            assert_close_fp64(x, y, f"{name} exclude={exclude} cols={cols}")
        assert_close_fp64(vec[4].sum() + vec[5].sum(), dt, f"dt exclude={exclude} cols={cols}")


def test_reference_backward_is_autograd_of_reference_forward():
    """The reference's explicit vector-mode backward (dA, dB, cat(drs, dcs)) equals autograd of
    its materialised forward, so every backend's parity rests on two independent routes."""
    m, n, d = 8, 6, 4
    a, b, rs, cs = _inputs(m, n, d, torch.float64, lo=0.5, hi=30.0)
    g_row, g_col = torch.randn(m, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    for offset, exclude, cols in ((0, False, True), (1, True, True), (-3, True, False)):
        want = _fwd_bwd(_ref(offset, exclude, cols, True), a, b, rs, cs, g_row, g_col, cols)
        row, col = want[:2]
        da, db, ds = reference.simlse_backward(
            a,
            b,
            rs,
            row,
            col,
            g_row,
            g_col,
            offset=offset,
            exclude_pos=exclude,
            cols=cols,
            col_scale=cs,
        )
        got = (da, db, ds[:m], ds[m:] if cols else torch.zeros(n, dtype=torch.float64))
        for name, x, y in zip(NAMES[2:], got, want[2:], strict=True):
            assert_close_fp64(x, y, f"{name} offset={offset} exclude={exclude} cols={cols}")


def test_reference_vector_forward_by_hand():
    """r_i = LSE_j rs_i s_ij and c_j = LSE_i cs_j s_ij written out entry by entry."""
    a, b, rs, cs = _inputs(3, 4, 2, torch.float64, lo=0.5, hi=5.0)
    row, col = reference.simlse(a, b, rs, col_scale=cs, exclude_pos=True, offset=1)
    s = [[float(a[i] @ b[j]) for j in range(4)] for i in range(3)]
    want_row = [
        torch.tensor([rs[i] * s[i][j] for j in range(4) if j != i + 1]).logsumexp(0)
        for i in range(3)
    ]
    want_col = [
        torch.tensor([cs[j] * s[i][j] for i in range(3) if j != i + 1]).logsumexp(0)
        for j in range(4)
    ]
    assert_close_fp64(row, torch.stack(want_row).double(), "row")
    assert_close_fp64(col, torch.stack(want_col).double(), "col")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vscale_all_excluded_rows(backend):
    """N = 1 with exclude_pos: row 0 has no entry left -> LSE -inf, zero dA row, zero drs."""
    a, b, rs, cs = _inputs(5, 1, 4, torch.float64, lo=1.0, hi=20.0)
    got = _fwd_bwd(
        _op(backend, 0, True, True), a, b, rs, cs, torch.ones(5), torch.ones(1), cols=True
    )
    row, col, da, _, drs, _ = got
    assert torch.isneginf(row[0]) and torch.isfinite(row[1:]).all() and torch.isfinite(col).all()
    assert torch.equal(da[0], torch.zeros(4)) and drs[0] == 0
    for x in got[2:]:
        assert torch.isfinite(x).all()


@pytest.mark.slow
def test_vscale_compile_fullgraph():
    """torch.compile(fullgraph=True) sees one opaque node and matches eager, scale gradients
    included."""
    a, b, rs, cs = (x.requires_grad_() for x in _inputs(9, 7, 5, torch.float64, hi=10.0))

    def f(a, b, rs, cs):
        row, col = simlse(a, b, rs, exclude_pos=True, backend="torch", col_scale=cs)
        return row.sum() + (col * col).sum()

    out = torch.compile(f, fullgraph=True)(a, b, rs, cs)
    ref = f(a, b, rs, cs)
    for x, y in zip(
        torch.autograd.grad(out, (a, b, rs, cs)), torch.autograd.grad(ref, (a, b, rs, cs))
    ):
        assert_close_fp64(x, y, "compiled grads")


def test_vscale_argument_checks():
    a, b, rs, cs = _inputs(4, 3, 2, torch.float32)
    t = torch.tensor(2.0)
    with pytest.raises(ValueError, match=r"col_scale needs a vector scale of shape \[M\]"):
        simlse(a, b, t, col_scale=cs)
    with pytest.raises(ValueError, match=r"needs col_scale of shape \[3\]"):
        simlse(a, b, rs)
    with pytest.raises(
        ValueError, match=r"scale must be 0-d or have shape \[4\].*got shape \(3,\)"
    ):
        simlse(a, b, cs, col_scale=cs)
    with pytest.raises(ValueError, match=r"col_scale must be 0-d or have shape \[3\].*\(4,\)"):
        simlse(a, b, rs, col_scale=rs)
    with pytest.raises(ValueError, match=r"col_scale must be torch.float32 .*got torch.float64"):
        simlse(a, b, rs, col_scale=cs.double())
    row, col = simlse(a, b, rs, cols=False)  # no column LSE: no column scale needed
    assert row.shape == (4,) and col.shape == (0,)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_vscale_cpp_thread_counts(threads, tiny_chunks):
    """The cpp backend's row blocks (one per thread, each with its own column partials of the
    LSE and of sum_i p^c_ij s_ij, merged at the end) at 1, 2 and 3 threads, several chunks."""
    if "cpp" not in [p.values[0] for p in BACKENDS]:
        pytest.skip("C++ extension unavailable")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        m, n, d = 67, 29, 5
        a, b, rs, cs = _inputs(m, n, d, torch.float64)
        g_row, g_col = torch.randn(m, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
        args = (a, b, rs, cs, g_row, g_col, True)
        got = _fwd_bwd(_op("cpp", -1, True, True), *args)
        want = _fwd_bwd(_ref(-1, True, True, True), *args)
        for name, x, y in zip(NAMES, got, want, strict=True):
            assert_close_fp64(x, y, f"{name} threads={threads}")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cols", [True, False])
def test_vscale_compiled_op_opcheck(cols):
    """The compiled gammacl::simlse_fwd / simlse_bwd with vector scales (schema Tensor?
    col_scale, the fake kernels of gammacl._ext: a [M + N or M] third output)."""
    from gammacl import _ext

    ok, why = _ext.available(cuda=False)
    if not ok:
        pytest.skip(f"C++ extension unavailable: {why}")
    ops = _ext.load()
    a, b, rs, cs = _inputs(9, 7, 5, torch.float32, hi=10.0)
    cs = cs if cols else None
    torch.library.opcheck(ops.simlse_fwd.default, (a, b, rs, 1, True, cols, cs))
    row, col = ops.simlse_fwd(a, b, rs, 1, True, cols, cs)
    g_row, g_col = torch.randn(9), torch.randn(7 if cols else 0)
    args = (a, b, rs, row, col, g_row, g_col, 1, True, cols, cs)
    torch.library.opcheck(ops.simlse_bwd.default, args)
    assert ops.simlse_bwd(*args)[2].shape == (9 + (7 if cols else 0),)
    with pytest.raises(RuntimeError, match=r"col_scale must have shape \[7\]"):
        ops.simlse_fwd(a, b, rs, 0, False, True, torch.ones(6))
    with pytest.raises(RuntimeError, match="col_scale needs a vector scale"):
        ops.simlse_fwd(a, b, torch.tensor(1.0), 0, False, True, torch.ones(7))
