"""Random draws of gammacl's modules as one opaque op (gammacl::draw), and the generator registry
it draws from, so eager and torch.compile'd runs consume the same random stream."""

from __future__ import annotations

import math
import sys

import torch


def draw_log_weights(
    shape: float,
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """log(G / shape), G ~ Gamma(shape, 1) i.i.d., as a [2, n] float32 tensor on `device`
    (row 0: image anchors, row 1: text anchors). Drawn on the generator's device when one is
    given (so a CPU generator reproduces a run on any device)."""
    dev = generator.device if generator is not None else device
    conc = torch.full((2, n), float(shape), dtype=torch.float32, device=dev)
    g = torch._standard_gamma(conc, generator=generator)
    return (g.log() - math.log(shape)).to(device)


# Draws inside torch.compile. Dynamo cannot put a torch.Generator into a graph (graph break), and
# inductor would swap torch.rand for its own Philox stream (compiled draws != eager draws). So
# every random draw of gammacl's modules is this opaque op: it takes the generator by key (the
# id of a generator registered below; -1 = the device's default generator) and draws from that
# very generator at run time, in eager and compiled runs alike. Tagged nondeterministic_seeded,
# so it is never CSE'd, dead-code-eliminated while used, or recomputed in the backward.
#
# The registry holds its generators strongly: torch.Generator cannot be weak-referenced before
# torch 2.12 ("cannot create weak reference to 'torch._C.Generator' object" on 2.11, the GPU
# machines' torch). A generator is dropped again once nothing but the registry refers to it
# (checked on every registration), so the registry stays as small as a weak one and an id is
# never reused while its entry is alive.
_GENERATORS: dict[int, torch.Generator] = {}
# sys.getrefcount of a value held only by the registry: the dict's reference and getrefcount's
# own argument.
_ONLY_REGISTRY_REFS = 2


def _prune() -> None:
    for key in list(_GENERATORS):
        if sys.getrefcount(_GENERATORS[key]) <= _ONLY_REGISTRY_REFS:
            del _GENERATORS[key]


def _register_generator(generator: torch.Generator | None) -> None:
    if generator is not None:
        _prune()
        _GENERATORS[id(generator)] = generator


def _generator_key(generator: torch.Generator | None) -> int:
    if generator is None:
        return -1
    if not torch.compiler.is_compiling():
        _register_generator(generator)
    return id(generator)


@torch.library.custom_op(
    "gammacl::draw", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def _draw_op(
    kind: str,
    shape: float,
    n: int,
    generator_key: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """kind "log_gamma": draw_log_weights(shape, n) [2, n]; "uniform": torch.rand(n); in
    `dtype` on `device`, from the registered generator `generator_key` (-1: default RNG)."""
    generator = None
    if generator_key != -1:
        generator = _GENERATORS.get(generator_key)
        if generator is None:
            raise RuntimeError(
                "gammacl::draw: the module's torch.Generator is not registered (was the "
                "module copied without pickling, or its generator replaced through __dict__?); "
                "assign it with `module.generator = g` or run one eager forward first"
            )
    if kind == "log_gamma":
        return draw_log_weights(shape, n, generator=generator, device=device).to(dtype)
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device, dtype=dtype)
    raise ValueError(f"gammacl::draw has no kind {kind!r}")


@_draw_op.register_fake
def _(kind, shape, n, generator_key, device, dtype):
    return torch.empty((2, n) if kind == "log_gamma" else (n,), dtype=dtype, device=device)


class _GeneratorAttr:
    """Mixin for modules with a `generator` attribute: assigning it (constructor, user code,
    unpickling / deepcopy) registers the generator for gammacl::draw."""

    @property
    def generator(self) -> torch.Generator | None:
        return self._generator

    @generator.setter
    def generator(self, value: torch.Generator | None) -> None:
        self._generator = value
        _register_generator(value)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _register_generator(self.__dict__.get("_generator"))

    def _generator_key(self) -> int:
        return _generator_key(self._generator)
