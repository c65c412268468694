"""The backend resolution table of gammacl.dispatch.resolve_backend, with the availability of
triton and the C++/CUDA extensions monkeypatched (no GPU or toolchain needed), and one end-to-end
check that auto really runs the cpp kernels on CPU, whatever TRITON_INTERPRET says."""

import importlib
import warnings

import pytest
import torch

import gammacl
from gammacl import _ext, dispatch

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture
def table(monkeypatch):
    """set(triton=, cpp=, cuda=, interpret=) fixes what is available; warnings are counted."""
    monkeypatch.delenv("GAMMACL_BACKEND", raising=False)
    dispatch._warn_once.cache_clear()

    def set_(triton=True, cpp=True, cuda=True, interpret=False):
        def ext(cuda: bool, device_type: str = "cuda"):
            if cuda and device_type != "cuda":  # no stand-in registered in this table
                return False, f"not on {device_type!r} tensors"
            return (have_cuda, "no cuda here") if cuda else (cpp, "no compiler here")

        have_cuda = cuda
        monkeypatch.setattr(dispatch, "triton_importable", lambda: triton)
        monkeypatch.setattr(dispatch, "_ext_available", ext)
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")

    yield set_
    dispatch._warn_once.cache_clear()


def _resolve(backend, device):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        name = dispatch.resolve_backend(backend, device)
    return name, [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]


# (triton, cpp, cuda, interpret, device) -> (auto's choice, number of warnings)
AUTO = [
    (True, True, True, False, CPU, "cpp", 0),
    (True, True, True, True, CPU, "cpp", 0),  # the interpreter never changes auto
    (False, True, False, True, CPU, "cpp", 0),
    (True, False, True, False, CPU, "torch", 1),
    (True, False, True, True, CPU, "torch", 1),
    (True, True, True, False, CUDA, "triton", 0),
    (False, True, True, False, CUDA, "cuda", 0),
    (False, True, False, False, CUDA, "torch", 1),
    (True, True, True, True, MPS, "torch", 0),
]


@pytest.mark.parametrize("triton,cpp,cuda,interpret,device,want,warns", AUTO)
def test_auto_resolution_table(table, triton, cpp, cuda, interpret, device, want, warns):
    table(triton=triton, cpp=cpp, cuda=cuda, interpret=interpret)
    name, msgs = _resolve("auto", device)
    assert name == want
    assert len(msgs) == warns, msgs
    if warns:
        assert "falling back to the chunked torch backend" in msgs[0]
        assert "no compiler here" in msgs[0] or "neither triton nor" in msgs[0]
        _, again = _resolve("auto", device)  # one warning per process, not per call
        assert again == []


@pytest.mark.parametrize("env,want", [("torch", "torch"), ("reference", "reference")])
def test_env_variable_chooses_for_auto_only(table, monkeypatch, env, want):
    table()
    monkeypatch.setenv("GAMMACL_BACKEND", env)
    assert _resolve("auto", CPU) == (want, [])
    assert _resolve("cpp", CPU) == ("cpp", [])  # an explicit backend wins over the variable


def test_env_variable_triton_on_cpu_needs_the_interpreter(table, monkeypatch):
    table(interpret=False)
    monkeypatch.setenv("GAMMACL_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve_backend("auto", CPU)
    table(interpret=True)
    monkeypatch.setenv("GAMMACL_BACKEND", "triton")
    assert _resolve("auto", CPU) == ("triton", [])


def test_bad_names(table, monkeypatch):
    table()
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_backend("gpu", CPU)
    monkeypatch.setenv("GAMMACL_BACKEND", "fast")
    with pytest.raises(ValueError, match="GAMMACL_BACKEND must be one of .* got 'fast'"):
        dispatch.resolve_backend("auto", CPU)


# forced backends: (backend, device, availability kwargs, error pattern or the name returned)
FORCED = [
    ("cpp", CPU, {}, "cpp"),
    ("cpp", CPU, {"cpp": False}, "backend='cpp' is unavailable: no compiler here"),
    ("cpp", CUDA, {}, "backend='cpp' runs on CPU tensors"),
    ("cuda", CUDA, {}, "cuda"),
    ("cuda", CUDA, {"cuda": False}, "backend='cuda' is unavailable: no cuda here"),
    ("cuda", CPU, {}, "backend='cuda' runs on CUDA tensors"),
    ("triton", CUDA, {}, "triton"),
    ("triton", CUDA, {"triton": False}, "needs the triton package"),
    ("triton", CPU, {"interpret": False}, "on CPU it needs TRITON_INTERPRET=1"),
    ("triton", CPU, {"interpret": True}, "triton"),
    ("triton", MPS, {"interpret": True}, "does not support device mps"),
    ("torch", CPU, {"cpp": False, "triton": False, "cuda": False}, "torch"),
    ("torch", CUDA, {"cpp": False, "triton": False, "cuda": False}, "torch"),
    ("reference", CUDA, {"cpp": False, "triton": False, "cuda": False}, "reference"),
]


# (the parameter is not called "backend": conftest routes backend="cuda" tests to the emulator)
@pytest.mark.parametrize("name,device,avail,want", FORCED)
def test_forced_backends(table, name, device, avail, want):
    table(**avail)
    if want in dispatch.BACKENDS:
        assert _resolve(name, device) == (want, [])
    else:
        with pytest.raises(RuntimeError, match=want):
            dispatch.resolve_backend(name, device)


@pytest.mark.skipif(not _ext.available()[0], reason="C++ extension unavailable")
def test_auto_runs_cpp_on_cpu_under_the_interpreter(monkeypatch):
    """End to end: with TRITON_INTERPRET=1 set (as tests/conftest.py does) clip_loss(backend=
    "auto") calls the cpp op, not the torch backend."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("GAMMACL_BACKEND", raising=False)
    op = importlib.import_module("gammacl.ops.simlse")

    seen = []
    real = op._backend_impl
    monkeypatch.setattr(
        op, "_backend_impl", lambda name, *dev: seen.append(name) or real(name, *dev)
    )
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    loss = gammacl.clip_loss(a, b, 2.0)
    assert seen == ["cpp"]
    assert torch.allclose(loss, gammacl.clip_loss(a, b, 2.0, backend="torch"), atol=1e-6)


def test_cuda_provider_seam_routes_cuda_backend_on_other_device_types():
    """_ext.register_cuda_provider: backend="cuda" on CPU tensors resolves and calls the
    registered library's ops (how tests/cuda_emu plugs in); removed, it is refused again."""
    from gammacl import _ext
    from gammacl.ops.simlse import simlse

    calls = []

    class FakeOps:
        def simlse_fwd(self, a, b, scale, offset, exclude_pos, cols):
            calls.append("simlse_fwd")
            return torch.full((a.shape[0],), 7.0), torch.full((b.shape[0],), 8.0)

    assert _ext.cuda_provider("cpu") is None
    with pytest.raises(RuntimeError, match="backend='cuda' runs on CUDA tensors"):
        dispatch.resolve_backend("cuda", CPU)
    _ext.register_cuda_provider("cpu", FakeOps)
    try:
        assert dispatch.resolve_backend("cuda", CPU) == "cuda"
        assert _ext.available(cuda=True, device_type="cpu") == (True, "")
        a = torch.randn(3, 4)
        row, col = simlse(a, torch.randn(5, 4), torch.tensor(1.0), backend="cuda")
        assert calls == ["simlse_fwd"] and row.tolist() == [7.0] * 3 and col.tolist() == [8.0] * 5
    finally:
        _ext.register_cuda_provider("cpu", None)
    assert _ext.cuda_provider("cpu") is None
    with pytest.raises(RuntimeError, match="backend='cuda' runs on CUDA tensors"):
        dispatch.resolve_backend("cuda", CPU)
    with pytest.raises(ValueError, match="serves device type 'cuda'"):
        _ext.register_cuda_provider("cuda", FakeOps)
