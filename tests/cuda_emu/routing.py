"""Routes backend="cuda" on CPU tensors to the emulated CUDA library (cuda_emu.build), so the
backend-parametrised tests run csrc's CUDA kernels and bindings on a CPU: see tests/conftest.py
(the "cuda-emu" backend of cpu_backends()).

Inside `routed()` the emulation library is gammacl's registered stand-in for the CUDA library on
device type "cpu" (gammacl._ext.register_cuda_provider, the seam every op's "cuda" backend goes
through): resolve_backend("cuda", cpu) -> "cuda", and the ops call torch.ops.gammacl_cuda_emu.
Nothing of gammacl is patched.
"""

from __future__ import annotations

import contextlib

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
    """backend="cuda" on CPU tensors runs the emulated CUDA library while inside (registered as
    the CUDA library's stand-in for device type "cpu": gammacl._ext.register_cuda_provider)."""
    from gammacl import _ext

    ops = build.load()
    previous = _ext.cuda_provider("cpu")
    _ext.register_cuda_provider("cpu", build.load)
    try:
        yield ops
    finally:
        _ext.register_cuda_provider("cpu", previous)
