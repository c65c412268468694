"""Routes backend="cuda" on CPU tensors to the emulated CUDA library (cuda_emu.build), so the
backend-parametrised tests run csrc's CUDA kernels and bindings on a CPU: see tests/conftest.py
(the "cuda-emu" backend of cpu_backends()).

Inside `routed()`:
  gammacl._ext.load(cuda=True)       -> torch.ops.gammacl_cuda_emu (CPU kernels of the CUDA code)
  gammacl._ext.available(cuda=True)  -> (True, "")
  resolve_backend("cuda", cpu)       -> "cuda" (everywhere gammacl imported resolve_backend)
Everything else is unchanged.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from cuda_emu import build

_STATE: dict[str, object] = {}


def available() -> tuple[bool, str]:
    """(True, "") when the emulation library builds and loads here, else (False, reason)."""
    if "ok" not in _STATE:
        from gammacl import _ext

        ok, why = _ext.available(cuda=False)
        if ok:
            try:
                build.load()
            except Exception as exc:  # compiler errors: report as a skip reason
                ok, why = False, f"building the CUDA emulation library failed: {exc}"[-1500:]
        _STATE["ok"], _STATE["why"] = ok, why
    return bool(_STATE["ok"]), str(_STATE["why"])


@contextlib.contextmanager
def routed():
    from gammacl import _ext, dispatch

    ops = build.load()
    real_load, real_available, real_resolve = _ext.load, _ext.available, dispatch.resolve_backend

    def load(cuda: bool = False):
        return ops if cuda else real_load(cuda=False)

    def available_(cuda: bool = False):
        return (True, "") if cuda else real_available(cuda=False)

    def resolve(backend: str, device):
        if backend == "cuda" and torch.device(device).type == "cpu":
            return "cuda"
        return real_resolve(backend, device)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_ext, "load", load)
        mp.setattr(_ext, "available", available_)
        for name, mod in list(sys.modules.items()):
            if (name == "gammacl" or name.startswith("gammacl.")) and getattr(
                mod, "resolve_backend", None
            ) is real_resolve:
                mp.setattr(mod, "resolve_backend", resolve)
        yield ops
