"""Test setup: the Triton interpreter on CPU-only machines (before anything imports triton code),
a fixed seed per test, the list of backends usable on this machine, and the CUDA emulation
(tests/cuda_emu): a test whose `backend` parameter is "cuda" runs with CPU tensors routed to csrc's
CUDA code compiled for the CPU emulator."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _cuda_emu_routing(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "cuda":
        yield
        return
    from cuda_emu.routing import routed

    with routed():
        yield


def cpu_backends(include_triton: bool = True, include_cuda_emu: bool = True) -> list:
    """Backends that run on CPU tensors here, each a pytest.param with a skip reason when not.
    "cuda" (id cuda-emu) is the CUDA backend's source run by the CPU emulator (tests/cuda_emu)."""
    from gammacl import _ext
    from gammacl.dispatch import interpreter_on, triton_importable

    ok, why = _ext.available(cuda=False)
    params = [
        pytest.param("torch", id="torch"),
        pytest.param(
            "cpp",
            id="cpp",
            marks=pytest.mark.skipif(not ok, reason=f"C++ extension unavailable: {why}"),
        ),
    ]
    if include_triton:
        usable = triton_importable() and interpreter_on()
        params.append(
            pytest.param(
                "triton",
                id="triton",
                marks=pytest.mark.skipif(
                    not usable, reason="triton needs TRITON_INTERPRET=1 on CPU"
                ),
            )
        )
    if include_cuda_emu:
        from cuda_emu.routing import available

        ok, why = available()
        params.append(
            pytest.param(
                "cuda",
                id="cuda-emu",
                marks=[
                    pytest.mark.emu,
                    pytest.mark.skipif(not ok, reason=f"CUDA emulation unavailable: {why}"),
                ],
            )
        )
    return params
