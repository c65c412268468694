"""Triton backend of simlse (kernels/simlse.py) against gammacl.reference, under TRITON_INTERPRET=1
on CPU (conftest sets it when there is no CUDA) or on a GPU.

Shapes stay tiny: the interpreter costs ~1-2 ms per program x loop trip. With the interpreter's
64 x 64 tiles and BLOCK_D <= 32, M, N in {17, 67} give one and two tiles, D in {1, 3, 17} the
single-chunk (register) path and D in {33, 64} the chunked read-modify-write path.
"""

import os

import torch

if not torch.cuda.is_available():  # before anything defines the triton kernels (as conftest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tolerances import assert_close_dtype, assert_close_fp64, simlse_fwd_bwd  # noqa: E402

import gammacl  # noqa: E402
from gammacl import reference  # noqa: E402
from gammacl.dispatch import interpreter_on, triton_importable  # noqa: E402
from gammacl.ops.simlse import simlse  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = [
    pytest.mark.skipif(
        not triton_importable() or not (ON_GPU or interpreter_on()),
        reason="the triton backend needs triton and a CUDA device or TRITON_INTERPRET=1",
    ),
    # the interpreter runs numpy: an invalid-value / overflow / divide warning means a NaN or inf
    # intermediate (e.g. exp(-inf - -inf)) that the kernels promise never to form
    pytest.mark.filterwarnings("error::RuntimeWarning"),
]

# an ImportError of the kernels themselves is a failure, never a skip: only a missing triton
# package (or device) skips, through pytestmark above
if triton_importable():
    from gammacl.kernels import simlse as K  # noqa: E402


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _feats(m, n, d, dtype, unit=False):
    a = torch.randn(m, d, dtype=torch.float64)
    b = torch.randn(n, d, dtype=torch.float64)
    if unit:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype)


def _check_simlse(m, n, d, dtype, offset, exclude, cols, scale, unit=True):
    a, b = _feats(m, n, d, dtype, unit=unit)
    s = torch.tensor(scale, dtype=_acc(dtype), device=DEVICE)
    g_row = torch.randn(m, dtype=torch.float64, device=DEVICE)
    g_col = torch.randn(n, dtype=torch.float64, device=DEVICE)
    kw = dict(offset=offset, exclude_pos=exclude, cols=cols)
    ours = simlse_fwd_bwd(
        lambda a, b, s: simlse(a, b, s, backend="triton", **kw), a, b, s, g_row, g_col, cols
    )
    ref64 = simlse_fwd_bwd(
        lambda a, b, s: reference.simlse(a, b, s, upcast=True, **kw),
        a.double(),
        b.double(),
        s.double(),
        g_row,
        g_col,
        cols,
    )
    what = f"simlse {dtype} m={m} n={n} d={d} off={offset} excl={exclude} cols={cols} s={scale}"
    names = ("row_lse", "col_lse", "grad a", "grad b", "grad scale")
    assert ours[0].dtype == _acc(dtype) and ours[2].dtype == dtype
    if not cols:
        assert ours[1].shape == (0,)
    if dtype == torch.float64:
        for name, x, y in zip(names, ours, ref64, strict=True):
            assert_close_fp64(x, y, f"{what} {name}")
        return
    same = simlse_fwd_bwd(
        lambda a, b, s: reference.simlse(a, b, s, upcast=False, **kw), a, b, s, g_row, g_col, cols
    )
    for name, x, y, z in zip(names, ours, ref64, same, strict=True):
        assert_close_dtype(x, y, z, dtype, f"{what} {name}")


# (offset, exclude_pos, cols, scale) variants, cycled over the shape grid below
_FLAGS = [
    (0, False, True, 1.0),
    (0, True, True, 14.3),
    (3, True, False, 100.0),
    (-2, True, True, 14.3),
    (1, False, False, 100.0),
]
_GRID = [
    (m, n, d) for m, n in [(1, 1), (2, 17), (17, 67), (67, 2), (67, 67)] for d in (1, 3, 33, 64)
]
# (dtype, m, n, d, offset, exclude_pos, cols, scale): fp64 and fp32 over every shape of the grid
# (odd sizes, 1 and 2 tiles, both D paths), each with one flag variant; fp16 / bf16 on a few.
CASES = [
    (dtype, m, n, d, *_FLAGS[(i + k) % len(_FLAGS)])
    for k, dtype in enumerate((torch.float64, torch.float32))
    for i, (m, n, d) in enumerate(_GRID)
] + [
    (torch.float16, 67, 67, 64, 0, True, True, 14.3),
    (torch.float16, 17, 67, 3, 2, True, True, 100.0),
    (torch.float16, 2, 17, 33, 0, False, False, 1.0),
    (torch.bfloat16, 67, 17, 33, 0, False, True, 14.3),
    (torch.bfloat16, 17, 17, 17, 1, True, False, 100.0),
    (torch.bfloat16, 1, 1, 3, 0, False, True, 1.0),
]


@pytest.mark.parametrize(
    "dtype,m,n,d,offset,exclude,cols,scale", CASES, ids=lambda v: str(v).replace("torch.", "")
)
def test_simlse_parity(dtype, m, n, d, offset, exclude, cols, scale):
    _check_simlse(m, n, d, dtype, offset, exclude, cols, scale)


def test_simlse_parity_unnormalised_fp32():
    # |l| up to ~1e3: the online max / exp2 path must keep full relative accuracy
    _check_simlse(67, 67, 33, torch.float32, 0, True, True, 14.3, unit=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_column_lse_transposed_sweep(dtype, monkeypatch):
    """Above _COL_PART_MAX_BYTES the column LSE comes from a second sweep of b against a."""
    monkeypatch.setattr(K, "_COL_PART_MAX_BYTES", 0)
    _check_simlse(67, 17, 33, dtype, 2, True, True, 14.3)


def test_all_excluded_row_is_minus_inf_with_zero_grad():
    """N=1 with exclude_pos: every row excludes its only entry -> LSE -inf, gradient 0, no NaN."""
    for dtype in (torch.float64, torch.float32):
        a, b = _feats(3, 1, 16, dtype)
        a.requires_grad_()
        b.requires_grad_()
        s = torch.tensor(14.3, dtype=_acc(dtype), device=DEVICE, requires_grad=True)
        row, col = simlse(a, b, s, offset=-1, exclude_pos=True, backend="triton")
        # row 1 holds the excluded entry (1, 0): its LSE is -inf; rows 0 and 2 are finite
        ref_row, ref_col = reference.simlse(
            a.detach(), b.detach(), s.detach(), offset=-1, exclude_pos=True
        )
        assert torch.equal(torch.isfinite(row), torch.isfinite(ref_row))
        assert float(row[1].detach()) == float("-inf")
        ok = torch.isfinite(row)
        (row[ok].sum() + col.sum()).backward()
        for g in (a.grad, b.grad, s.grad):
            assert torch.isfinite(g).all()
        assert float(a.grad[1].abs().max()) == 0.0
        # N=1, M=1 with its single entry excluded: everything -inf, every gradient exactly 0
        a1, b1 = (x[:1].detach().clone().requires_grad_() for x in (a, b))
        s1 = s.detach().clone().requires_grad_()
        row1, col1 = simlse(a1, b1, s1, exclude_pos=True, backend="triton")
        assert float(row1.detach()) == float("-inf") and float(col1.detach()) == float("-inf")
        da, db, ds = K.simlse_bwd(
            a1.detach(),
            b1.detach(),
            s1.detach(),
            row1,
            col1,
            torch.ones_like(row1),
            torch.ones_like(col1),
            0,
            True,
            True,
        )
        assert float(da.abs().max()) == 0.0 and float(db.abs().max()) == 0.0
        assert not torch.isnan(da).any() and not torch.isnan(db).any()
        assert ds.shape == () and float(ds) == 0.0


def test_strided_rows_match_contiguous():
    """Row strides larger than D (column slices) are read in place."""
    big_a = torch.randn(67, 50, dtype=torch.float64, device=DEVICE)
    big_b = torch.randn(17, 40, dtype=torch.float64, device=DEVICE)
    a, b = big_a[:, 7:40], big_b[:, 2:35]
    s = torch.tensor(3.0, dtype=torch.float64, device=DEVICE)
    g_row = torch.randn(67, dtype=torch.float64, device=DEVICE)
    g_col = torch.randn(17, dtype=torch.float64, device=DEVICE)
    out = K.simlse_fwd(a, b, s, 1, True, True)
    out_c = K.simlse_fwd(a.contiguous(), b.contiguous(), s, 1, True, True)
    for x, y in zip(out, out_c, strict=True):
        assert_close_fp64(x, y, "strided fwd")
    grads = K.simlse_bwd(a, b, s, *out, g_row, g_col, 1, True, True)
    grads_c = K.simlse_bwd(a.contiguous(), b.contiguous(), s, *out, g_row, g_col, 1, True, True)
    for x, y in zip(grads, grads_c, strict=True):
        assert_close_fp64(x, y, "strided bwd")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_clip_loss_end_to_end(dtype):
    n, d = 67, 33
    a, b = _feats(n, n, d, dtype, unit=True)
    a.requires_grad_()
    b.requires_grad_()
    s = torch.tensor(14.3, dtype=_acc(dtype), device=DEVICE, requires_grad=True)
    loss = gammacl.clip_loss(a, b, s, label_smoothing=0.1, backend="triton")
    grads = torch.autograd.grad(loss, (a, b, s))
    args64 = [x.detach().double().requires_grad_() for x in (a, b, s)]
    ref = reference.clip_loss(*args64, label_smoothing=0.1)
    ref_g = torch.autograd.grad(ref, args64)
    if dtype == torch.float64:
        assert_close_fp64(loss.detach(), ref.detach(), "clip loss")
        for x, y in zip(grads, ref_g, strict=True):
            assert_close_fp64(x, y, "clip grad")
        return
    argsd = [x.detach().clone().requires_grad_() for x in (a, b, s)]
    same = reference.clip_loss(*argsd, label_smoothing=0.1, upcast=False)
    same_g = torch.autograd.grad(same, argsd)
    assert_close_dtype(loss.detach(), ref.detach(), same.detach(), dtype, "clip loss")
    for x, y, z in zip(grads, ref_g, same_g, strict=True):
        assert_close_dtype(x, y, z, dtype, "clip grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_infonce_labels_end_to_end(dtype):
    m, n, d = 17, 67, 20
    q, k = _feats(m, n, d, dtype, unit=True)
    labels = torch.randint(0, n, (m,), device=DEVICE)
    q.requires_grad_()
    k.requires_grad_()
    s = torch.tensor(100.0, dtype=_acc(dtype), device=DEVICE, requires_grad=True)
    loss = gammacl.infonce_loss(q, k, s, labels=labels, reduction="none", backend="triton")
    up = torch.rand(m, dtype=loss.dtype, device=DEVICE)
    grads = torch.autograd.grad(loss, (q, k, s), up)
    args64 = [x.detach().double().requires_grad_() for x in (q, k, s)]
    ref = reference.infonce_loss(*args64, labels=labels, reduction="none")
    ref_g = torch.autograd.grad(ref, args64, up.double())
    if dtype == torch.float64:
        assert_close_fp64(loss.detach(), ref.detach(), "infonce loss")
        for x, y in zip(grads, ref_g, strict=True):
            assert_close_fp64(x, y, "infonce grad")
        return
    argsd = [x.detach().clone().requires_grad_() for x in (q, k, s)]
    same = reference.infonce_loss(*argsd, labels=labels, reduction="none", upcast=False)
    same_g = torch.autograd.grad(same, argsd, up)
    assert_close_dtype(loss.detach(), ref.detach(), same.detach(), dtype, "infonce loss")
    for x, y, z in zip(grads, ref_g, same_g, strict=True):
        assert_close_dtype(x, y, z, dtype, "infonce grad")


def test_clip_n1_is_zero():
    a, b = _feats(1, 1, 16, torch.float32)
    a.requires_grad_()
    b.requires_grad_()
    s = torch.tensor(14.3, device=DEVICE, requires_grad=True)
    loss = gammacl.clip_loss(a, b, s, backend="triton")
    loss.backward()
    assert float(loss.detach()) == 0.0
    for g in (a.grad, b.grad, s.grad):
        assert float(g.abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_logits_match_reference(dtype):
    """scale 100 on unnormalised features: |logits| ~ 1e4, far beyond exp's range. Loss and
    every gradient against the float64 reference with the tolerance rule."""
    n, d = 19, 24
    a = (torch.randn(n, d, device=DEVICE) * 3).to(dtype)
    b = (torch.randn(n, d, device=DEVICE) * 3).to(dtype)
    s = torch.tensor(100.0, device=DEVICE)

    def run(fn, a, b, s):
        a, b, s = (x.detach().clone().requires_grad_() for x in (a, b, s))
        loss = fn(a, b, s)
        return (loss.detach(), *torch.autograd.grad(loss, (a, b, s)))

    ours = run(lambda *t: gammacl.clip_loss(*t, backend="triton"), a, b, s)
    ref = run(reference.clip_loss, a.double(), b.double(), s.double())
    same = run(lambda *t: reference.clip_loss(*t, upcast=False), a, b, s)
    for name, x, y, z in zip(("loss", "grad a", "grad b", "grad scale"), ours, ref, same):
        assert_close_dtype(x, y, z, dtype, f"large-logit clip {name}")


def test_launcher_validation():
    a, b = _feats(5, 7, 16, torch.float32)
    s = torch.tensor(2.0, device=DEVICE)
    with pytest.raises(ValueError, match="dtypes differ"):
        K.simlse_fwd(a, b.double(), s, 0, False, True)
    with pytest.raises(ValueError, match="feature dims differ"):
        K.simlse_fwd(a, b[:, :8].contiguous(), s, 0, False, True)
    with pytest.raises(ValueError, match="contiguous last dim"):
        K.simlse_fwd(torch.randn(16, 5, device=DEVICE).t(), b, s, 0, False, True)
    with pytest.raises(ValueError, match="0-d"):
        K.simlse_fwd(a, b, s.reshape(1), 0, False, True)
    with pytest.raises(ValueError, match="scale must be a 0-d torch.float32"):
        K.simlse_fwd(a, b, s.double(), 0, False, True)
    with pytest.raises(ValueError, match="must be float16/bfloat16/float32/float64"):
        K.simlse_fwd(a.int(), b.int(), s, 0, False, True)
    row, col = K.simlse_fwd(a, b, s, 0, False, True)
    with pytest.raises(ValueError, match=r"g_col must have shape \(7,\)"):
        K.simlse_bwd(
            a, b, s, row, col, torch.ones_like(row), torch.ones(5, device=DEVICE), 0, False, True
        )
    with pytest.raises(ValueError, match="row_lse must be torch.float32"):
        K.simlse_bwd(
            a, b, s, row.double(), col, torch.ones_like(row), torch.ones_like(col), 0, False, True
        )


def test_gpu_configs_respect_dot_limits(monkeypatch):
    """Every fixed GPU config: BLOCK_D a power of two >= 16 (tl.dot K >= 16 on H100), one D
    chunk only when D fits it, and M/N tiles >= 16."""
    monkeypatch.setattr(K, "interpreter_on", lambda: False)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for kind in ("fwd", "bwd"):
            for d in (1, 3, 16, 33, 64, 100, 128, 129, 512, 768, 1024, 4096):
                c = K._config(kind, dtype, d)
                bd = c["BLOCK_D"]
                assert bd >= 16 and bd & (bd - 1) == 0, (dtype, kind, d, c)
                assert min(c["BLOCK_M"], c["BLOCK_N"]) >= 16, (dtype, kind, d, c)
                assert bd <= 128, (dtype, kind, d, c)  # registers: chunk D beyond this


@pytest.mark.skipif(not interpreter_on(), reason="checks the interpreter's config choice")
def test_no_autotune_under_interpreter():
    assert K._AUTOTUNE is False
    assert K._config("fwd", torch.float32, 64)["BLOCK_D"] == 32  # D=64 runs the chunked path


def test_fp16_small_upstream_does_not_underflow():
    """A mean loss at large N gives g ~ 1/N, so W = g * P sits far below fp16's range; the
    launcher's power-of-two normaliser makes the raw grads exactly proportional to g."""
    a, b = _feats(67, 67, 33, torch.float16, unit=True)
    s = torch.tensor(14.3, device=DEVICE)
    row, col = K.simlse_fwd(a, b, s, 0, True, True)
    g_row = torch.randn(67, device=DEVICE)
    g_col = torch.randn(67, device=DEVICE)
    big = K.simlse_bwd(a, b, s, row, col, g_row, g_col, 0, True, True)
    tiny = 2.0**-24  # g ~ 6e-8: W = g * P would be fp16-subnormal or zero
    small = K.simlse_bwd(a, b, s, row, col, g_row * tiny, g_col * tiny, 0, True, True)
    for x, y in zip(small, big, strict=True):
        assert torch.equal(x / tiny, y)


@pytest.mark.skipif(not interpreter_on(), reason="wraps the kernels in a one-config autotuner")
def test_autotune_mode_launchers(monkeypatch):
    """GAMMACL_AUTOTUNE's launch path with one config (the interpreter cannot benchmark more):
    grid from the chosen BLOCK_M, and the partials buffer sized for the smallest BLOCK_M with
    the rows this config leaves unwritten reading -inf."""
    import triton

    cfg = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32}, num_warps=4)]
    prune = {"early_config_prune": K._autotune_prune}
    fwd = triton.autotune(
        cfg, key=["M", "N", "D"], prune_configs_by=prune, restore_value=["COL_PART"]
    )(K._simlse_fwd_kernel)
    bwd = triton.autotune(cfg, key=["M", "N", "D"], prune_configs_by=prune)(K._simlse_bwd_kernel)
    monkeypatch.setattr(K, "_simlse_fwd_kernel", fwd)
    monkeypatch.setattr(K, "_simlse_bwd_kernel", bwd)
    monkeypatch.setattr(K, "_AUTOTUNE", True)
    assert K._AUTOTUNE_MIN_BLOCK_M < 64  # 67 rows: 3 partial rows allocated, 2 written
    _check_simlse(67, 17, 33, torch.float64, 1, True, True, 14.3)
