"""GPU parity tests (marker `gpu`; `python -m pytest -m gpu` is the GPU run, bench/gpu_session.sh
runs it on a lent GPU). Every test takes a device fixture that skips, with the reason, where
there is no CUDA device (or, for the Triton backend, where TRITON_INTERPRET is set: these tests
are for compiled kernels). The same case builders (tests/gpu_cases.py) run on CPU through the
CUDA emulator and the Triton interpreter in tests/test_gpucheck.py.

Backend "triton" (kernels/simlse.py, kernels/gamma_onepass.py) and backend "cuda" (csrc/):
simlse forward / backward and clip_loss at bf16 / fp16 / fp32 for N in {1, 17, 4096/4097} and
D in {64, 512, 1024} (fp64 on two shapes), exclude_pos with an offset, cols=False, strided rows,
the transposed column sweep, row offsets beyond 2^31 elements, several CUDA chunks, N = 65536
(N^2 > 2^31), a CUDA graph capture, and the gamma one-pass op, each against gammacl.reference
with the tolerance rule of tests/tolerances.py.
"""

from __future__ import annotations

import functools

import gpu_cases as C
import pytest
import torch

pytestmark = pytest.mark.gpu
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.fixture(scope="module")
def cuda_device() -> str:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    return "cuda"


@pytest.fixture(scope="module")
def triton_device(cuda_device) -> str:
    from gammacl.dispatch import interpreter_on

    if interpreter_on():
        pytest.skip("TRITON_INTERPRET is set: the GPU tests check compiled Triton kernels")
    return cuda_device


@pytest.fixture(scope="module")
def cuda_ext_device(cuda_device) -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    from gammacl import _ext

    if CUDA_HOME is None:
        pytest.skip("no CUDA toolkit (nvcc) to build the cuda backend")
    ok, why = _ext.available(cuda=True)
    assert ok, f"the CUDA extension does not build: {why}"
    return cuda_device


def _check(fn) -> None:
    detail = fn()
    assert detail.startswith(("max|err|", "loss ")), detail


def _tag(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# triton backend
# ----------------------------------------------------------------------------------------------
def _triton_cases() -> list:
    case = functools.partial(C.simlse_case, "triton")
    out = []
    for dt in DTYPES:
        t = _tag(dt)
        for n in (1, 17, 4097):
            for d in (64, 512, 1024):
                out.append(pytest.param(case(dt, n, d), id=f"simlse-{t}-N{n}-D{d}"))
        out += [
            pytest.param(
                case(dt, 4097, 512, offset=1, exclude=True, scale=100.0),
                id=f"simlse-{t}-exclude-off1",
            ),
            pytest.param(case(dt, 4097, 1024, cols=False), id=f"simlse-{t}-nocols"),
            pytest.param(C.clip_case("triton", dt, 4097, 1024), id=f"clip-{t}"),
            pytest.param(C.onepass_case("triton", dt, 17, 64), id=f"onepass-{t}-N17"),
            pytest.param(C.onepass_case("triton", dt, 4097, 1024), id=f"onepass-{t}-N4097"),
            pytest.param(
                C.onepass_case("triton", dt, 4097, 64, clamp=-2.0, offset=1),
                id=f"onepass-{t}-cap-off1",
            ),
        ]
    for n in (17, 4097):
        out.append(
            pytest.param(
                case(torch.float64, n, 64, offset=-2, exclude=True), id=f"simlse-float64-N{n}"
            )
        )
    out.append(pytest.param(C.onepass_case("triton", torch.float64, 17, 64), id="onepass-fp64"))
    return out


@pytest.mark.parametrize("check", _triton_cases())
def test_triton_parity(triton_device, check):
    _check(check)


def test_triton_transposed_column_sweep(triton_device, monkeypatch):
    from gammacl.kernels import simlse as K

    monkeypatch.setattr(K, "_COL_PART_MAX_BYTES", 0)
    _check(C.simlse_case("triton", torch.bfloat16, 4097, 512, offset=3, exclude=True))


def test_triton_int64_row_offsets(triton_device):
    """Rows 2^20 elements apart: row offsets pass 2^31 from row 2048 on; strided == contiguous
    bitwise."""
    from gammacl.kernels import simlse as K

    n, d, pitch, dev = 4097, 64, 2**20, triton_device
    big_a = torch.randn(n, pitch, device=dev, dtype=torch.bfloat16)
    big_b = torch.randn(n, pitch, device=dev, dtype=torch.bfloat16)
    a, b = big_a[:, :d], big_b[:, :d]
    s = torch.tensor(10.0, device=dev)
    out = K.simlse_fwd(a, b, s, 0, True, True)
    out_c = K.simlse_fwd(a.contiguous(), b.contiguous(), s, 0, True, True)
    g_row = torch.randn(n, device=dev) / n
    g_col = torch.randn(n, device=dev) / n
    gr = K.simlse_bwd(a, b, s, *out, g_row, g_col, 0, True, True)
    gr_c = K.simlse_bwd(a.contiguous(), b.contiguous(), s, *out_c, g_row, g_col, 0, True, True)
    names = ("row", "col", "da", "db", "dscale")
    for nm, x, y in zip(names, (*out, *gr), (*out_c, *gr_c), strict=True):
        assert torch.equal(x, y), f"{nm}: max diff {float((x - y).abs().max()):.3e}"
    assert torch.isfinite(out[0]).all() and float(gr[0].abs().max()) > 0


# ----------------------------------------------------------------------------------------------
# cuda backend
# ----------------------------------------------------------------------------------------------
def _cuda_cases() -> list:
    case = functools.partial(C.simlse_case, "cuda", nan_free=True)
    out = []
    for dt in DTYPES:
        t = _tag(dt)
        for n in (1, 17, 4096, 4097):  # 4096: 16-byte vector path; 4097: scalar path
            for d in (64, 1024):
                out.append(pytest.param(case(dt, n, d), id=f"simlse-{t}-N{n}-D{d}"))
        out += [
            pytest.param(
                case(dt, 4097, 512, offset=1, exclude=True, scale=100.0),
                id=f"simlse-{t}-exclude-off1",
            ),
            pytest.param(case(dt, 1, 64, exclude=True), id=f"simlse-{t}-all-excluded"),
            pytest.param(case(dt, 4096, 1024, cols=False), id=f"simlse-{t}-nocols"),
            pytest.param(
                case(dt, 4096, 64, strided=True, exclude=True, offset=-3), id=f"simlse-{t}-strided"
            ),
            pytest.param(C.clip_case("cuda", dt, 4097, 1024), id=f"clip-{t}"),
        ]
    for n in (17, 4097):
        out.append(
            pytest.param(
                case(torch.float64, n, 64, offset=-2, exclude=True), id=f"simlse-float64-N{n}"
            )
        )
    for dt in (*DTYPES, torch.float64):
        t = _tag(dt)
        for n, d in ((17, 64), (4096, 1024), (4097, 256)):
            if not (dt == torch.float64 and n > 4096):
                out.append(
                    pytest.param(C.onepass_case("cuda", dt, n, d), id=f"onepass-{t}-N{n}-D{d}")
                )
        out.append(
            pytest.param(
                C.onepass_case("cuda", dt, 4097, 64, clamp=-2.0, offset=1), id=f"onepass-{t}-cap"
            )
        )
    return out


@pytest.mark.parametrize("check", _cuda_cases())
def test_cuda_parity(cuda_ext_device, check):
    _check(check)


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=_tag)
def test_cuda_many_chunks(cuda_ext_device, monkeypatch, dtype):
    """GAMMACL_CUDA_CHUNK_MIB=3: a few hundred rows per chunk and a short last chunk."""
    monkeypatch.setenv("GAMMACL_CUDA_CHUNK_MIB", "3")
    if dtype != torch.float64:
        _check(C.simlse_case("cuda", dtype, 4097, 64, offset=2, exclude=True, nan_free=True))
    _check(C.onepass_case("cuda", dtype, 4097, 64, offset=-2))


def test_cuda_large_n_int64(cuda_ext_device, monkeypatch):
    """N = 65536, D = 64 bf16 (N^2 = 4.3e9 > 2^31 entries), exclude_pos, offset 7: forward and
    backward against the chunked fp32 torch backend."""
    from gammacl import _ext
    from gammacl.ops import simlse as S

    torch.manual_seed(0)
    n, d, off = 65536, 64, 7
    a, b = C.feats(n, n, d, torch.bfloat16, cuda_ext_device)
    s = torch.tensor(30.0, device=cuda_ext_device)
    ops = _ext.load(cuda=True)
    row, col = ops.simlse_fwd(a, b, s, off, True, True)
    g_row = torch.randn(n, device=cuda_ext_device) / n
    g_col = torch.randn(n, device=cuda_ext_device) / n
    da, db, _ = ops.simlse_bwd(a, b, s, row, col, g_row, g_col, off, True, True)
    monkeypatch.setenv("GAMMACL_CHUNK_MIB", "1024")
    rrow, rcol = S.torch_fwd(a, b, s, off, True, True)
    rda, rdb = S.torch_bwd(a, b, s, rrow, rcol, g_row, g_col, off, True, True)
    for nm, x, y, tol in (
        ("row", row, rrow, 1e-4),
        ("col", col, rcol, 1e-4),
        ("da", da, rda, 1e-3),
        ("db", db, rdb, 1e-3),
    ):
        err = float((x - y).abs().max())
        ref_scale = max(1.0, float(y.abs().max()))
        assert err <= tol * ref_scale, f"{nm}: max error {err:.3e} > {tol:g} x {ref_scale:.3g}"


def test_cuda_graph_capture(cuda_ext_device):
    """clip_loss fwd + bwd captured once: replays bitwise equal, equal to eager, follow new
    inputs."""
    import gammacl

    torch.manual_seed(1)
    n, d = 4096, 256
    a0, b0 = C.feats(n, n, d, torch.bfloat16, cuda_ext_device)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    s = torch.tensor(14.3, device=cuda_ext_device, requires_grad=True)

    def step():
        loss = gammacl.clip_loss(a, b, s, backend="cuda")
        return (loss, *torch.autograd.grad(loss, (a, b, s)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    eager = [x.clone() for x in step()]
    graph.replay()
    first = [x.clone() for x in static_out]
    graph.replay()
    torch.cuda.synchronize()
    for nm, x, y, z in zip(("loss", "da", "db", "dscale"), first, static_out, eager, strict=True):
        assert torch.equal(x, y), f"{nm}: two replays differ"
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6, msg=f"{nm}: replay vs eager")
    with torch.no_grad():  # new inputs, same graph
        a.copy_(torch.flip(a0, dims=[0]))
    graph.replay()
    new_eager = step()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out[0], new_eager[0], rtol=1e-5, atol=1e-6)
