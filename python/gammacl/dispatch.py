"""Backend selection.

Backends: "torch" (chunked pure PyTorch), "cpp" (C++ CPU extension from csrc/), "triton" (fused
Triton kernels from kernels/; CUDA, or CPU under TRITON_INTERPRET=1 for tests), "cuda" (C++/CUDA
extension from csrc/), "reference" (naive materialised loss, for checking only).

Each backend is one `Backend` record (RECORDS): where it runs, where its implementations come
from, why it refuses a device, and its `auto` rank with the figure behind it. `auto` (or the
GAMMACL_BACKEND environment variable, read when backend="auto") takes the first usable backend
in rank order for the tensors' device type:
  CUDA tensors -> "triton", then "cuda", then "torch" (with one warning); each record's
                  `figure` names the evidence behind its rank (bench/NOTES.md).
  CPU tensors  -> "cpp" when the extension builds, else "torch" with one warning, whatever
                  TRITON_INTERPRET says (the interpreter runs only when asked for).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _warn_once(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _ext_available(cuda: bool, device_type: str = "cuda") -> tuple[bool, str]:
    from gammacl import _ext

    return _ext.available(cuda=cuda, device_type=device_type)


def _triton_refusal(device: torch.device) -> str | None:
    if not triton_importable():
        return "backend='triton' needs the triton package, which is not installed"
    if device.type == "cpu" and not interpreter_on():
        return (
            "backend='triton' runs on CUDA tensors; on CPU it needs TRITON_INTERPRET=1 "
            "(a slow test harness). Use backend='cpp' or 'torch' on CPU."
        )
    if device.type not in ("cpu", "cuda"):
        return f"backend='triton' does not support device {device}"
    return None


def _cpp_refusal(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"backend='cpp' runs on CPU tensors, got tensors on {device}"
    ok, why = _ext_available(cuda=False)
    return None if ok else f"backend='cpp' is unavailable: {why}"


def _cuda_refusal(device: torch.device) -> str | None:
    # other device types only through a registered stand-in (_ext.register_cuda_provider)
    ok, why = _ext_available(cuda=True, device_type=device.type)
    if device.type != "cuda" and not ok:
        return f"backend='cuda' runs on CUDA tensors, got tensors on {device}"
    return None if ok else f"backend='cuda' is unavailable: {why}"


@dataclass(frozen=True)
class Backend:
    """One backend's facts, in one place (Liger-Kernel's ImplInfo pattern): its name, where it
    runs, where its implementations come from (`source`: the loader every op's table uses for
    it, ops/_backends), why it refuses a device (`refusal`: None = usable, else the error), its
    `auto` rank per device type (lower first; absent: never chosen by auto) and the figure
    behind that rank. Every backend name list derives from RECORDS."""

    name: str
    runs_on: str
    source: str
    refusal: Callable[[torch.device], str | None]
    auto: tuple[tuple[str, int], ...] = ()
    figure: str = ""
    title: str = ""  # how a fallback warning names it (default: the name)


RECORDS = (
    Backend(
        "torch",
        "any device",
        "ops/<op>.py torch_fwd / torch_bwd (chunked PyTorch)",
        lambda device: None,
        auto=(("cuda", 2), ("cpu", 1)),
        figure="the fallback of every device, with one warning",
    ),
    Backend(
        "cpp",
        "cpu",
        "csrc/<op>.cpp via _ext.op(name, cuda=False) (ops/_backends.compiled)",
        _cpp_refusal,
        auto=(("cpu", 0),),
        title="the C++ CPU extension",
        figure="clip_loss fwd+bwd N=4096 D=256 fp32, 2-core AMD EPYC, median of 5: cpp 456 ms, "
        "torch 763 ms, naive 765 ms (1 thread); 243 / 409 / 452 ms (2 threads), bench/NOTES.md",
    ),
    Backend(
        "triton",
        "cuda (cpu under TRITON_INTERPRET=1, a test harness: never auto there)",
        "kernels/<op>.py via ops/_backends.kernel",
        _triton_refusal,
        auto=(("cuda", 0),),
        figure="not measured: triton before cuda is a placeholder (no GPU in the sessions so far)",
    ),
    Backend(
        "cuda",
        "cuda (or a registered stand-in: _ext.register_cuda_provider)",
        "csrc/<op>_cuda.{cu,cpp} via _ext.op(name, cuda=True) (ops/_backends.compiled)",
        _cuda_refusal,
        auto=(("cuda", 1),),
        title="the CUDA extension",
        figure="not measured (see triton)",
    ),
    Backend(
        "reference",
        "any device",
        "python/gammacl/reference/<op>.py (materialised; for checking only)",
        lambda device: None,
    ),
)
BY_NAME = {r.name: r for r in RECORDS}
BACKENDS = ("auto", *BY_NAME)


def _auto(device: torch.device) -> str:
    """The first usable backend in the records' auto order for this device type; "torch" with
    one warning (naming why the preferred ones are unusable) when none is."""
    ranked = sorted((rank, r.name) for r in RECORDS for dev, rank in r.auto if dev == device.type)
    refused: dict[str, str] = {}
    for _, name in ranked:
        if name == "torch":
            break
        why = BY_NAME[name].refusal(device)
        if why is None:
            return name
        refused[BY_NAME[name].title or name] = why
    if refused:
        which = " nor ".join(refused)
        which = f"neither {which} is usable" if len(refused) > 1 else f"{which} is unavailable"
        _warn_once(
            f"gammacl: {which} on {device.type} ({'; '.join(refused.values())}); "
            "falling back to the chunked torch backend"
        )
    return "torch"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Returns a concrete backend name for tensors on `device`, or raises."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("GAMMACL_BACKEND", "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"GAMMACL_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend == "auto":
        return _auto(device)
    why = BY_NAME[backend].refusal(device)
    if why is not None:
        raise RuntimeError(why)
    return backend


@torch.compiler.assume_constant_result
def resolve_traced(backend: str, device: torch.device) -> str:
    """resolve_backend, evaluated once when torch.compile traces a graph (dynamo does not trace
    the environment / extension probing). Every loss resolves its backend through this, once, at
    its public boundary."""
    return resolve_backend(backend, device)
