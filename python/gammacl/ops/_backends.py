"""The dispatch seam of an op: one table, backend name -> implementation, loaded on first use.

Every ops/<op>.py builds one `Backends` table with the names of the backend records
(gammacl.dispatch.RECORDS: torch, cpp, triton, cuda, reference) following the contract written
at the top of that file; the losses resolve the backend name once at their public boundary
(gammacl.dispatch) and the op looks it up here.
"cpp" and "cuda" call the compiled op of the same name through gammacl._ext.op, which picks the
library from the tensors' device (a registered stand-in for "cuda" on other device types:
gammacl._ext.register_cuda_provider); "triton" imports gammacl.kernels.<module> on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from gammacl._validate import acc_dtype
from gammacl.dispatch import BY_NAME

NAMES = tuple(BY_NAME)  # the backend records (gammacl.dispatch.RECORDS)


class Backends(dict):
    """backends(name) -> the op's implementation for backend `name` (loaded on first call and
    cached), or ValueError naming the op and its backends. A dict of name -> loader, so a test
    can substitute one backend (monkeypatch.setitem; a substituted loader drops the cache)."""

    def __init__(self, op: str, **loaders: Callable[[], Any]) -> None:
        if set(loaders) != set(NAMES):
            raise ValueError(f"{op}: backends must be exactly {NAMES}, got {tuple(loaders)}")
        super().__init__(loaders)
        self.op = op
        self._loaded: dict[str, Any] = {}

    def __setitem__(self, name: str, loader: Callable[[], Any]) -> None:
        self._loaded.pop(name, None)
        super().__setitem__(name, loader)

    def __call__(self, name: str) -> Any:
        if name not in self:
            raise ValueError(f"{self.op} has no backend {name!r} (backends: {NAMES})")
        if name not in self._loaded:
            self._loaded[name] = self[name]()
        return self._loaded[name]


def compiled(*names: str) -> dict[str, Callable[[], Any]]:
    """cpp= and cuda= loaders of the compiled ops `names` (one function, or a tuple of them)."""
    from gammacl import _ext

    def loader(cuda: bool) -> Callable[[], Any]:
        def load() -> Any:
            fns = tuple(_ext.op(n, cuda) for n in names)
            return fns[0] if len(fns) == 1 else fns

        return load

    return {"cpp": loader(False), "cuda": loader(True)}


def fwd_backends(op: str, reference: Callable[..., Any], torch_fwd: Callable[..., Any]) -> Backends:
    """The table of a one-function op (gamma_onepass, siglip): the reference and torch fwd given,
    the triton and compiled ones named <op>_fwd (gammacl.kernels.<op>, the C++ / CUDA library)."""
    return Backends(
        op,
        reference=lambda: reference,
        torch=lambda: torch_fwd,
        triton=kernel(op, f"{op}_fwd"),
        **compiled(f"{op}_fwd"),
    )


def fwd_fake(a: torch.Tensor, b: torch.Tensor, grad: bool, *sizes: int) -> tuple[torch.Tensor, ...]:
    """Shapes of a one-sweep fwd's outputs: an accumulation-dtype vector of each size in `sizes`,
    then da_raw [M, D] and db_raw [N, D] ([0, D] each without grad)."""
    acc = acc_dtype(a.dtype)
    vecs = tuple(a.new_empty((k,), dtype=acc) for k in sizes)
    grads = tuple(
        a.new_empty((k if grad else 0, a.shape[1]), dtype=acc) for k in (a.shape[0], b.shape[0])
    )
    return vecs + grads


def stashed_grads(g: torch.Tensor, grads: tuple[torch.Tensor, ...], n_inputs: int) -> tuple:
    """Backward of an op whose gradients were computed in its forward and stashed: the upstream
    gradient g of its one differentiable output times each stashed gradient, then None for the
    remaining inputs (n_inputs in all)."""
    return tuple(g.to(x.dtype) * x for x in grads) + (None,) * (n_inputs - len(grads))


def kernel(module: str, *names: str) -> Callable[[], Any]:
    """triton= loader: gammacl.kernels.<module>.<name> for each name, imported on first use; each
    follows the op's contract as it stands (no argument is bound here)."""

    def load() -> Any:
        mod = importlib.import_module(f"gammacl.kernels.{module}")
        fns = tuple(getattr(mod, n) for n in names)
        return fns[0] if len(fns) == 1 else fns

    return load
