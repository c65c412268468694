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


# Triton 3.6's interpreter takes int() of 1-element arrays (a loop bound read from a tensor);
# numpy >= 2.5 refuses that ("only 0-dimensional arrays can be converted to Python scalars"), so
# on that pair (the GPU machines' stack: triton 3.6.0, numpy 2.5) no Triton kernel runs on the
# CPU. A test failing with exactly that error is reported as skipped, with the versions.
_NUMPY_SCALAR_ERROR = "only 0-dimensional arrays can be converted to Python scalars"


def _interpreter_numpy_clash(excinfo) -> str | None:
    if excinfo is None:
        return None
    exc = excinfo.value
    while exc is not None:
        if type(exc).__name__ == "InterpreterError" and _NUMPY_SCALAR_ERROR in str(exc):
            import numpy
            import triton

            return (
                f"the Triton {triton.__version__} interpreter cannot run under numpy "
                f"{numpy.__version__}: it calls int() on a 1-element array, which numpy >= 2.5 "
                "refuses (triton/runtime/interpreter.py; outside gammacl)"
            )
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    reason = _interpreter_numpy_clash(call.excinfo) if report.failed else None
    if reason is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {reason}")
