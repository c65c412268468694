"""Test setup: the Triton interpreter on CPU-only machines (before anything imports triton code),
a fixed seed per test, and the list of backends usable on this machine."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def cpu_backends(include_triton: bool = True) -> list:
    """Backends that run on CPU tensors here, each a pytest.param with a skip reason when not."""
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
    return params
