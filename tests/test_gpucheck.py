"""The GPU tests' case builders (tests/gpu_cases.py, used by tests/test_gpu.py under the `gpu`
marker) run here on CPU tensors: backend "cuda" through the CPU emulator (tests/cuda_emu, marker
`emu`) and backend "triton" under the interpreter. Each case must pass with the expected
summary, and a case must fail when the backend's output is off, so a GPU session's short device
time is not lost to a broken check."""

import gpu_cases as C
import pytest
import torch
from cuda_emu.routing import available, routed


@pytest.fixture
def emulated():
    ok, why = available()
    if not ok:
        pytest.skip(f"CUDA emulation unavailable: {why}")
    with routed():
        yield "cpu"


def _run(check, prefix: str) -> str:
    detail = check()
    assert detail.startswith(prefix), detail
    return detail


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_parity_cases_pass_on_the_emulated_cuda_backend(emulated, dtype):
    kw = dict(dev="cpu")
    _run(
        C.simlse_case("cuda", dtype, 37, 16, offset=1, exclude=True, nan_free=True, **kw),
        "max|err| row",
    )
    _run(C.simlse_case("cuda", dtype, 20, 8, strided=True, cols=False, **kw), "max|err| row")
    _run(C.onepass_case("cuda", dtype, 37, 16, **kw), "max|err| row_lse")
    _run(C.onepass_case("cuda", dtype, 21, 8, clamp=-2.0, offset=1, **kw), "max|err| row_lse")
    if dtype != torch.float64:
        _run(C.clip_case("cuda", dtype, 33, 16, dev="cpu"), "loss ")


def _interpreted_triton():
    from gammacl.dispatch import interpreter_on, triton_importable

    if not (triton_importable() and interpreter_on()):
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_parity_cases_pass_on_the_triton_interpreter(dtype):
    _interpreted_triton()
    _run(C.onepass_case("triton", dtype, 21, 8, offset=1, dev="cpu"), "max|err| row_lse")
    _run(C.simlse_case("triton", dtype, 21, 8, offset=1, exclude=True, dev="cpu"), "max|err| row")


@pytest.mark.parametrize("target", ["simlse", "onepass", "clip"])
def test_a_case_fails_when_the_backend_is_off(monkeypatch, target):
    """One output 1% off (the torch backend, perturbed) must raise: the cases can fail."""
    import importlib

    import gammacl

    simlse = importlib.import_module("gammacl.ops.simlse")
    gamma_onepass = importlib.import_module("gammacl.ops.gamma_onepass")

    if target == "simlse":
        real = simlse.simlse

        def off(*a, **k):
            row, col = real(*a, **k)
            return row * 1.01, col

        monkeypatch.setattr(simlse, "simlse", off)
        check = C.simlse_case("torch", torch.float32, 17, 8, dev="cpu")
    elif target == "onepass":
        real_impl = gamma_onepass._backend_impl

        def impl(backend):
            fn = real_impl(backend)
            return lambda *a: (*fn(*a)[:4], fn(*a)[4] * 1.01, fn(*a)[5])

        monkeypatch.setattr(gamma_onepass, "_backend_impl", impl)
        check = C.onepass_case("torch", torch.float32, 17, 8, dev="cpu")
    else:
        real_clip = gammacl.clip_loss
        monkeypatch.setattr(gammacl, "clip_loss", lambda *a, **k: real_clip(*a, **k) * 1.01)
        check = C.clip_case("torch", torch.float32, 17, 8, dev="cpu")
    with pytest.raises(AssertionError):
        check()
