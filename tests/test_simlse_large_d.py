"""The large-D (GEMM-structured) Triton paths of simlse and gamma_onepass
(kernels/simlse_tiled.py, kernels/gamma_onepass.py, kernels/tiles.py) against the float64
reference, under TRITON_INTERPRET=1 on CPU (conftest) or on a GPU.

The path is chosen by the public launchers from D and dtype (tiles.use_large_d: D > 128 for
16-bit, D > 64 for fp32). Under the interpreter the tiles are 32 x 32 with a K step of 32, so
M, N in 40..130 give 2-5 row and column tiles (none a multiple of 32) and D = 512 gives 16 K
trips; GAMMACL_TRITON_CHUNK_MIB = 0.001 makes every chunk one 32-row tile (many chunks).
"""

import os

import torch

if not torch.cuda.is_available():  # before anything defines the triton kernels (as conftest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tolerances import assert_close_dtype, simlse_fwd_bwd  # noqa: E402

from gammacl import reference  # noqa: E402
from gammacl.dispatch import interpreter_on, triton_importable  # noqa: E402
from gammacl.ops.gamma_onepass import _backend_impl as _onepass_impl  # noqa: E402
from gammacl.ops.simlse import simlse  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = [
    pytest.mark.skipif(
        not triton_importable() or not (ON_GPU or interpreter_on()),
        reason="the triton backend needs triton and a CUDA device or TRITON_INTERPRET=1",
    ),
    pytest.mark.filterwarnings("error::RuntimeWarning"),
]

K = pytest.importorskip("gammacl.kernels.simlse")
KT = pytest.importorskip("gammacl.kernels.simlse_tiled")
G = pytest.importorskip("gammacl.kernels.gamma_onepass")
T = pytest.importorskip("gammacl.kernels.tiles")

TINY_CHUNK = "0.001"  # MiB: one BLOCK_M row tile per chunk


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _feats(m, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype)


@pytest.fixture
def count_paths(monkeypatch):
    """Counts calls of the large-D launchers (so each test proves which path it ran)."""
    calls = {"simlse_fwd": 0, "simlse_bwd": 0, "onepass": 0}

    def wrap(mod, name, key):
        orig = getattr(mod, name)

        def f(*args, **kw):
            calls[key] += 1
            return orig(*args, **kw)

        monkeypatch.setattr(mod, name, f)

    wrap(KT, "large_d_fwd", "simlse_fwd")
    wrap(KT, "large_d_bwd", "simlse_bwd")
    wrap(G, "_large_d_fwd", "onepass")
    return calls


def _check_simlse(m, n, d, dtype, offset, exclude, cols, scale):
    a, b = _feats(m, n, d, dtype)
    s = torch.tensor(scale, dtype=_acc(dtype), device=DEVICE)
    g = torch.Generator().manual_seed(1)
    g_row = torch.randn(m, generator=g, dtype=torch.float64).to(DEVICE)
    g_col = torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE)
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
    same = simlse_fwd_bwd(
        lambda a, b, s: reference.simlse(a, b, s, upcast=False, **kw), a, b, s, g_row, g_col, cols
    )
    what = f"simlse {dtype} m={m} n={n} d={d} off={offset} excl={exclude} cols={cols}"
    for name, x, y, z in zip(("row", "col", "da", "db", "ds"), ours, ref64, same, strict=True):
        assert_close_dtype(x, y, z, dtype, f"{what} {name}")


# (dtype, m, n, d, offset, exclude_pos, cols, scale)
LARGE = [
    (torch.float32, 70, 45, 512, 2, True, True, 14.3),
    (torch.bfloat16, 45, 70, 512, -3, True, True, 14.3),
    (torch.float16, 70, 70, 512, 0, False, True, 100.0),
    (torch.float32, 41, 70, 512, 0, True, False, 100.0),
]
SMALL = [  # the fused kernels at their D limit: D = 64 (fp32), 128 (16-bit)
    (torch.float32, 70, 45, 64, 2, True, True, 14.3),
    (torch.bfloat16, 45, 70, 128, -1, True, True, 14.3),
    (torch.float16, 70, 45, 128, 0, True, False, 100.0),
]
IDS = lambda v: str(v).replace("torch.", "")  # noqa: E731


def _chunk_cases(cases):
    """Each case with one chunk and with many; the default run keeps one of the two per case
    (alternating), the other is marked slow."""
    out = []
    for i, case in enumerate(cases):
        for j, chunk in enumerate((None, TINY_CHUNK)):
            marks = [pytest.mark.slow] if (i + j) % 2 else []
            name = "many-chunks" if chunk else "one-chunk"
            ident = "-".join(map(IDS, (*case, name)))
            out.append(pytest.param(*case, chunk, marks=marks, id=ident))
    return out


@pytest.mark.parametrize("dtype,m,n,d,offset,exclude,cols,scale,chunk", _chunk_cases(LARGE))
def test_simlse_large_d_parity(dtype, m, n, d, offset, exclude, cols, scale, chunk, count_paths):
    if chunk is not None:
        os.environ["GAMMACL_TRITON_CHUNK_MIB"] = chunk
    try:
        _check_simlse(m, n, d, dtype, offset, exclude, cols, scale)
    finally:
        os.environ.pop("GAMMACL_TRITON_CHUNK_MIB", None)
    assert count_paths["simlse_fwd"] == 1 and count_paths["simlse_bwd"] == 1


@pytest.mark.parametrize("dtype,m,n,d,offset,exclude,cols,scale", SMALL, ids=IDS)
def test_simlse_small_d_keeps_fused_path(dtype, m, n, d, offset, exclude, cols, scale, count_paths):
    _check_simlse(m, n, d, dtype, offset, exclude, cols, scale)
    assert count_paths["simlse_fwd"] == 0 and count_paths["simlse_bwd"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=IDS)
@pytest.mark.parametrize("d", [768, 1000, 1024])
def test_simlse_large_d_sweep(dtype, d, count_paths, monkeypatch):
    monkeypatch.setenv("GAMMACL_TRITON_CHUNK_MIB", TINY_CHUNK)
    _check_simlse(67, 45, d, dtype, 1, True, True, 14.3)
    assert count_paths["simlse_bwd"] == 1


def test_path_choice():
    assert not T.use_large_d(torch.bfloat16, 128) and T.use_large_d(torch.bfloat16, 129)
    assert not T.use_large_d(torch.float16, 128) and T.use_large_d(torch.float16, 512)
    assert not T.use_large_d(torch.float32, 64) and T.use_large_d(torch.float32, 65)
    assert not T.use_large_d(torch.float64, 4096)


def test_chunk_rows_budget(monkeypatch):
    """R from GAMMACL_TRITON_CHUNK_MIB: the largest multiple of the row tile under the budget,
    at least one tile, at most M; default 256 MiB of bf16 W at N = 65536 is 2048 rows."""
    monkeypatch.delenv("GAMMACL_TRITON_CHUNK_MIB", raising=False)
    assert T.chunk_rows(65536, 65536 * 2, 128) == 2048
    assert T.chunk_rows(1000, 65536 * 2, 128) == 1000
    monkeypatch.setenv("GAMMACL_TRITON_CHUNK_MIB", "1")
    assert T.chunk_rows(65536, 4096, 128) == 256
    monkeypatch.setenv("GAMMACL_TRITON_CHUNK_MIB", TINY_CHUNK)
    assert T.chunk_rows(65536, 65536 * 2, 128) == 128


def test_large_d_fp16_small_upstream_is_exact(count_paths):
    """fp16 W scaled by 1/gmax (a power of two on the device): raw grads proportional to g."""
    a, b = _feats(45, 40, 256, torch.float16)
    s = torch.tensor(14.3, device=DEVICE)
    row, col = K.simlse_fwd(a, b, s, 0, True, True)
    g_row = torch.randn(45, device=DEVICE)
    g_col = torch.randn(40, device=DEVICE)
    big = K.simlse_bwd(a, b, s, row, col, g_row, g_col, 0, True, True)
    tiny = 2.0**-24
    small = K.simlse_bwd(a, b, s, row, col, g_row * tiny, g_col * tiny, 0, True, True)
    for x, y in zip(small, big, strict=True):
        assert float(y.abs().max()) > 0
        assert torch.equal(x / tiny, y)
    assert count_paths["simlse_bwd"] == 2


def test_large_d_all_excluded_row(count_paths):
    """N = 1 with exclude_pos: the row holding the excluded entry has LSE -inf and zero grad."""
    a, b = _feats(3, 1, 200, torch.float32)
    s = torch.tensor(14.3, device=DEVICE)
    row, col = K.simlse_fwd(a, b, s, -1, True, True)
    want_row, want_col = reference.simlse(
        a.double(), b.double(), s.double(), offset=-1, exclude_pos=True
    )
    assert float(row[1]) == float("-inf")
    assert torch.equal(torch.isfinite(row), torch.isfinite(want_row))
    torch.testing.assert_close(row[[0, 2]].double(), want_row[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col.double(), want_col, rtol=1e-5, atol=1e-5)
    g = torch.ones(3, device=DEVICE)
    da, db, _ = K.simlse_bwd(a, b, s, row, col, g, torch.ones(1, device=DEVICE), -1, True, True)
    assert not torch.isnan(da).any() and float(da[1].abs().max()) == 0.0
    assert count_paths["simlse_fwd"] == 1


# ------------------------------------------------------------------------------------------------
# gamma_onepass
# ------------------------------------------------------------------------------------------------
OUTPUTS = ("row_lse", "col_lse", "row_term", "col_term", "da_raw", "db_raw")


def _check_onepass(m, n, d, dtype, offset, clamp, grad=True):
    from gammacl.reference import gamma as ref

    a, b = _feats(m, n, d, dtype, seed=3)
    acc = _acc(dtype)
    g = torch.Generator().manual_seed(4)
    ar = (torch.randn(m, generator=g, dtype=torch.float64) - 2.0).to(DEVICE, acc)
    ac = (torch.randn(n, generator=g, dtype=torch.float64) - 2.0).to(DEVICE, acc)
    s = torch.tensor(8.0, dtype=acc, device=DEVICE)
    out = _onepass_impl("triton")(a, b, s, ar, ac, 0.3, 0.7, clamp, offset, grad)
    r64 = ref.gamma_onepass(a, b, s, ar, ac, 0.3, 0.7, clamp, offset, upcast=True)
    same = ref.gamma_onepass(a, b, s, ar, ac, 0.3, 0.7, clamp, offset, upcast=False)
    names = OUTPUTS if grad else OUTPUTS[:4]
    for name, x, y, z in zip(names, out, r64, same, strict=False):
        assert_close_dtype(x, y, z, dtype, f"onepass {dtype} {m}x{n}x{d} off={offset} {name}")
    if not grad:
        assert out[4].shape == (0, d) and out[5].shape == (0, d)


@pytest.mark.parametrize(
    "dtype,m,n,offset,clamp,chunk",
    _chunk_cases([(torch.float32, 70, 45, 1, 30.0), (torch.bfloat16, 45, 70, -2, 0.5)]),
)
def test_onepass_large_d_parity(dtype, m, n, offset, clamp, chunk, count_paths, monkeypatch):
    if chunk is not None:
        monkeypatch.setenv("GAMMACL_TRITON_CHUNK_MIB", chunk)
    _check_onepass(m, n, 512, dtype, offset, clamp)
    assert count_paths["onepass"] == 1


def test_onepass_large_d_no_grad(count_paths):
    _check_onepass(40, 37, 200, torch.float32, 0, 30.0, grad=False)
    assert count_paths["onepass"] == 1


def test_onepass_fp16_keeps_fused_path(count_paths):
    _check_onepass(40, 37, 512, torch.float16, 0, 30.0)
    assert count_paths["onepass"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=IDS)
@pytest.mark.parametrize("d", [768, 1000, 1024])
def test_onepass_large_d_sweep(dtype, d, monkeypatch):
    monkeypatch.setenv("GAMMACL_TRITON_CHUNK_MIB", TINY_CHUNK)
    _check_onepass(67, 45, d, dtype, 1, 30.0)


@pytest.mark.parametrize("update", [pytest.param("before", marks=pytest.mark.slow), "after"])
def test_gamma_clip_loss_large_d(update, count_paths, monkeypatch):
    """GammaClipLoss on the triton backend at D = 512 fp32 (both update modes; "after" takes the
    one-pass op) against the float64 reference step, over several steps of the rate state."""
    from gammacl.gamma import GammaClipLoss, draw_log_weights
    from gammacl.reference import gamma as ref

    monkeypatch.setenv("GAMMACL_TRITON_CHUNK_MIB", TINY_CHUNK)
    n_data, bsz, d = 80, 40, 512
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n_data, d, generator=g), dim=1).to(DEVICE)
    txt = torch.nn.functional.normalize(img + 0.7 * torch.randn(n_data, d, generator=g).to(DEVICE))
    mod = GammaClipLoss(
        n_data, ema=0.2, update=update, backend="triton", generator=torch.Generator().manual_seed(0)
    )
    replay = torch.Generator().manual_seed(0)
    state = tuple((torch.zeros(n_data), torch.zeros(n_data, dtype=torch.bool)) for _ in range(2))
    paths = []
    for idx in (range(0, 40), range(40, 80), range(0, 40)):
        index = torch.tensor(list(idx))
        leaves = [x.detach().clone().requires_grad_() for x in (img[index], txt[index])]
        sc = torch.tensor(10.0, device=DEVICE, requires_grad=True)
        loss = mod(*leaves, sc, index.to(DEVICE))
        paths.append(mod.last_path)
        grads = torch.autograd.grad(loss, (*leaves, sc))
        log_w = draw_log_weights(mod.shape, bsz, generator=replay).double()
        want_in = [x.detach().cpu().double().requires_grad_() for x in (*leaves, sc)]
        want, state = ref.gamma_clip_step(
            *want_in,
            index,
            log_w,
            state,
            ema=0.2,
            update=update,
            clamp=mod.clamp if update == "after" else None,
        )
        want_g = torch.autograd.grad(want, want_in)
        assert_close_dtype(mod.last_surrogate.cpu(), want.detach(), None, torch.float32, "loss")
        for x, y in zip(grads, want_g, strict=True):
            assert_close_dtype(x.cpu(), y, None, torch.float32, f"{update} grad")
        torch.testing.assert_close(mod.image_rate.log_rate.cpu(), state[0][0], rtol=0, atol=1e-5)
    if update == "after":
        assert "one_pass" in paths[-1] and count_paths["onepass"] >= 1
    else:
        assert count_paths["simlse_bwd"] >= 1
