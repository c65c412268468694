"""Collectives, and only collectives: the world a loss step runs in.

A loss step (gammacl.clip.clip_step, GammaClipLoss._step) is written once against a `World`:
its local rows are this rank's, its columns are every rank's rows gathered in rank order. A single
process is a world of one, where every collective is the identity and the rank offset is 0, so
the same step serves both cases.

    World.resolve(rank, world_size, group)  the world from explicit values or the process group
    World.from_args(...)                    the world a loss module's constructor arguments name
                                            (InWorld._world: ClipLoss, SigLipLoss, GammaClipLoss)
    World.check(what, args, flags, err)     metadata agreement (below); raises the same error on
                                            every rank instead of leaving the others waiting
    World.agree(what, check, args, flags)   a step's validation, then World.check
    World.gather(x, with_grad)              rows of every rank in rank order; with_grad: the
                                            backward sends each rank the sum over ranks of its
                                            slice's gradient (open_clip's gather_with_grad)
    World.reinsert(gathered, local)         the local slot replaced by the local tensor (keeps
                                            its graph; open_clip's gather without grad)
    World.all_reduce_sum(x)                 the sum over ranks, in place
    World.broadcast(x)                      rank 0's tensor on every rank
    CommCounter()                           counts every collective's bytes (a dispatch mode)

Agreement check: before any feature collective, one all-gather of a few int64 metadata per rank
(shapes, dtypes, devices, declared rank/world size, flags, "local validation passed"). Any
disagreement -- uneven batches from drop_last=False, different D or dtype, one rank's invalid
input, a wrong rank= -- raises the same ValueError on every rank instead of a hang. Cost: one
W*K int64 all-gather and one host sync per call (skipped while torch.compile traces; only on
the first call of each loss with set_agreement_check("first")).

No ring exchange: the all-gather moves the same (W-1) n D elements per rank a ring would, in one
collective; a ring only pays off when overlapped with compute.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import TypeVar

import torch

_T = TypeVar("_T")

# dtype codes for the metadata collective (index + 1; 0 = not a tensor / other dtype)
_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
)
_DEVICE_TYPES = ("cpu", "cuda")
_NDIM_SLOTS = 3  # dims recorded per tensor (enough to name any shape the losses accept)
GRAD_COMMS = ("reduce", "local")
AGREEMENT_CHECKS = ("always", "first", "off")
_agreement = {"mode": os.environ.get("GAMMACL_AGREEMENT_CHECK", "always"), "seen": set()}


def set_agreement_check(mode: str) -> None:
    """When World.check runs its metadata all-gather: "always" (default; every call), "first"
    (the first call of each loss kind in this process, then never: no collective and no host
    sync per step) or "off". With "first" / "off" a later disagreement (an uneven last batch, a
    bad input on one rank) is no longer one clear error on every rank: the feature collective
    fails or hangs until the process group's timeout. Every rank must use the same mode. Also
    from the environment: GAMMACL_AGREEMENT_CHECK. Cost measured in docs/distributed.md."""
    if mode not in AGREEMENT_CHECKS:
        raise ValueError(f"agreement check mode must be one of {AGREEMENT_CHECKS}, got {mode!r}")
    _agreement["mode"] = mode
    _agreement["seen"] = set()


def _agree_now(what: str) -> bool:
    mode = _agreement["mode"]
    if mode == "first":
        first = what not in _agreement["seen"]
        _agreement["seen"].add(what)
        return first
    return mode != "off"


def check_grad_comm(grad_comm: object, gather_with_grad: bool = True) -> str:
    """grad_comm: "reduce" (the gathered features' gradient is reduced to their owners, an N x D
    collective in backward) or "local" (each rank computes its own rows' gradient from gathered
    statistics: gammacl._local_grad). "local" replaces gather_with_grad=True's collective, so it
    needs gather_with_grad=True."""
    if grad_comm not in GRAD_COMMS:
        raise ValueError(f"grad_comm must be one of {GRAD_COMMS}, got {grad_comm!r}")
    if grad_comm == "local" and not gather_with_grad:
        raise ValueError(
            "grad_comm='local' gives the gather_with_grad=True gradient without its collective; "
            "with gather_with_grad=False there is no feature-gradient collective to replace "
            "(pass gather_with_grad=True, or grad_comm='reduce')"
        )
    return grad_comm


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialised and the group has more than one rank."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def resolve_world(rank: int | None, world_size: int | None, group=None) -> tuple[int, int]:
    """(rank, world_size): the given values, or the process group's where None. world_size=None
    without an initialised process group means a single process."""
    dist = _dist()
    up = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size(group) if up else 1
    if rank is None:
        rank = dist.get_rank(group) if up else 0
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, Integral):
            raise TypeError(f"{name} must be an int or None, got {v!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must lie in [0, world_size) and world_size >= 1, got rank={rank}, "
            f"world_size={world_size}"
        )
    if world_size > 1 and not up:
        raise RuntimeError(
            f"rank={rank}, world_size={world_size} needs an initialised torch.distributed "
            "process group (call torch.distributed.init_process_group first), or pass "
            "rank=0, world_size=1"
        )
    return int(rank), int(world_size)


def _comm_device(group, like: object) -> torch.device:
    """Device for the small metadata tensors: CPU for gloo / mpi, else the features' device."""
    backend = str(_dist().get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if isinstance(like, torch.Tensor) and like.device.type != "cpu":
        return like.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# metadata agreement


def _describe(x: object) -> list[int]:
    """[kind, ndim, dim0, dim1, dim2, dtype code, device code] for one argument."""
    if not isinstance(x, torch.Tensor):
        return [0, 0] + [-1] * _NDIM_SLOTS + [0, -1]
    dims = list(x.shape[:_NDIM_SLOTS]) + [-1] * max(0, _NDIM_SLOTS - x.ndim)
    dcode = _DTYPES.index(x.dtype) + 1 if x.dtype in _DTYPES else 0
    dev = _DEVICE_TYPES.index(x.device.type) if x.device.type in _DEVICE_TYPES else 2
    return [1, x.ndim] + dims + [dcode, dev]


_PER_ARG = 2 + _NDIM_SLOTS + 2


def _fmt_arg(name: str, row: Sequence[int]) -> str:
    kind, ndim = row[0], row[1]
    if kind == 0:
        return f"{name}=<not a tensor>"
    dims = [str(d) for d in row[2 : 2 + min(ndim, _NDIM_SLOTS)]]
    if ndim > _NDIM_SLOTS:
        dims.append("...")
    shape = "(" + ", ".join(dims) + ("," if ndim == 1 else "") + ")"
    dcode, dev = row[2 + _NDIM_SLOTS], row[3 + _NDIM_SLOTS]
    dtype = str(_DTYPES[dcode - 1]).replace("torch.", "") if dcode else "other-dtype"
    device = _DEVICE_TYPES[dev] if 0 <= dev < len(_DEVICE_TYPES) else "other-device"
    return f"{name} {shape} {dtype} {device}"


def check_agreement(
    what: str,
    args: Sequence[tuple[str, object]],
    *,
    flags: Sequence[tuple[str, int]] = (),
    local_error: BaseException | None = None,
    group=None,
) -> None:
    """One small all-gather of every rank's argument metadata; raises the same ValueError on every
    rank when any rank's local validation failed or when shapes, dtypes, devices or `flags`
    differ between ranks. Must be called by every rank of `group` (it is a collective)."""
    dist = _dist()
    world = dist.get_world_size(group)
    row: list[int] = [0 if local_error is not None else 1]
    for _, x in args:
        row += _describe(x)
    row += [int(v) for _, v in flags]
    like = next((x for _, x in args if isinstance(x, torch.Tensor)), None)
    device = _comm_device(group, like)
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    out = torch.empty(world * len(row), dtype=torch.int64, device=device)
    _all_gather_flat(out, mine, group)
    table = out.view(world, len(row)).tolist()  # the one host sync of the check

    problems = []
    bad = [r for r in range(world) if table[r][0] == 0]
    if bad:
        problems.append(
            f"input validation failed on rank(s) {bad} (on each of them the local error "
            "is this error's __cause__)"
        )
    ref = table[0]
    for k, (name, _) in enumerate(args):
        lo, hi = 1 + k * _PER_ARG, 1 + (k + 1) * _PER_ARG
        if any(t[lo:hi] != ref[lo:hi] for t in table):
            problems.append(f"{name} differs between ranks")
    base = 1 + len(args) * _PER_ARG
    for k, (name, _) in enumerate(flags):
        vals = [t[base + k] for t in table]
        if name == "rank":
            if vals != list(range(world)):
                problems.append(
                    f"rank= must equal each process's torch.distributed rank "
                    f"(0..{world - 1}), got {vals}"
                )
        elif name == "world_size":
            if any(v != world for v in vals):
                problems.append(
                    f"world_size= must equal the process group size {world}, got {vals}"
                )
        elif len(set(vals)) > 1:
            problems.append(f"{name} differs between ranks: {vals}")
    if not problems:
        return
    per_rank = "; ".join(
        f"rank {r}: "
        + ", ".join(
            _fmt_arg(name, t[1 + k * _PER_ARG : 1 + (k + 1) * _PER_ARG])
            for k, (name, _) in enumerate(args)
        )
        for r, t in enumerate(table)
    )
    msg = (
        f"{what}: inputs disagree across the {world} ranks: {'; '.join(problems)}. "
        f"Every rank must pass the same batch size, feature dimension, dtype and device "
        f"(use drop_last=True in the DataLoader). Per rank: {per_rank}"
    )
    raise ValueError(msg) from local_error


# ---------------------------------------------------------------------------------------------
# gathers


def _all_gather_flat(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """out[W*n, ...] <- concatenation of every rank's x (no autograd)."""
    dist = _dist()
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def all_gather_rows(x: torch.Tensor, *, with_grad: bool, group=None) -> torch.Tensor:
    """Concatenation over ranks (dim 0) of x. with_grad: the backward sends each rank the sum over
    ranks of the gradient of its slice (open_clip's gather_with_grad); otherwise detached."""
    dist = _dist()
    x = x.contiguous()  # pytorch #120386: non-contiguous gathers lost their gradient
    if with_grad:
        from torch.distributed import _functional_collectives as fc

        fn = getattr(fc, "all_gather_single_autograd", None) or getattr(
            fc, "all_gather_tensor_autograd", None
        )
        if fn is not None:
            g = group if group is not None else dist.group.WORLD
            out = fn(x, 0, g)
            if isinstance(out, fc.AsyncCollectiveTensor):
                out = out.wait()
            return out
        import torch.distributed.nn.functional as dnf

        return torch.cat(dnf.all_gather(x, group=group or dist.group.WORLD), dim=0)
    out = torch.empty(
        (dist.get_world_size(group) * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device
    )
    _all_gather_flat(out, x.detach(), group)
    return out


def _reinsert(gathered: torch.Tensor, local: torch.Tensor, rank: int) -> torch.Tensor:
    """gathered with rows [rank*n, (rank+1)*n) replaced by `local` (which keeps its graph)."""
    n = local.shape[0]
    return torch.cat([gathered[: rank * n], local, gathered[(rank + 1) * n :]], dim=0)


# ---------------------------------------------------------------------------------------------
# the world a step runs in


@dataclass(frozen=True)
class World:
    """This process's place among `size` ranks of `group` (a single process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    group: object = None

    @staticmethod
    def resolve(rank: int | None = None, world_size: int | None = None, group=None) -> World:
        rank, world_size = resolve_world(rank, world_size, group)
        return World(rank, world_size, group)

    @staticmethod
    def from_args(
        rank: int | None = None,
        world_size: int | None = None,
        *,
        group=None,
        distributed: bool | None = None,
        owner: str = "loss",
    ) -> World:
        """The world a loss module's constructor arguments name: open_clip's rank / world_size
        (None: the process group's; world_size 1: a single process of that rank), gated by
        gammacl's `distributed` switch (False: a single process; True: the process group must be
        initialised, `owner` names the module in that error)."""
        if distributed is False:
            return World()
        if rank is None or world_size is None or world_size != 1:  # resolve_world validates
            world = World.resolve(rank, world_size, group)
        else:
            world = World(int(rank), 1)
        if distributed and world.size == 1 and not _dist_up():
            raise RuntimeError(
                f"{owner}(distributed=True) needs an initialised torch.distributed process group"
            )
        return world

    @staticmethod
    def of_group(group=None) -> World:
        """The process group's world, or a single process when torch.distributed is not up."""
        if not is_distributed(group):
            return World()
        dist = _dist()
        return World(dist.get_rank(group), dist.get_world_size(group), group)

    def check(
        self,
        what: str,
        args: Sequence[tuple[str, object]],
        *,
        flags: Sequence[tuple[str, int]] = (),
        local_error: BaseException | None = None,
    ) -> None:
        """Raises this rank's validation error, after every rank agreed on the metadata (a
        collective when size > 1; nothing to agree on in a single process or while
        torch.compile traces, where the inputs are trusted)."""
        if self.size > 1 and not torch.compiler.is_compiling() and _agree_now(what):
            check_agreement(what, args, flags=flags, local_error=local_error, group=self.group)
        if local_error is not None:
            raise local_error

    def agree(
        self,
        what: str,
        check: Callable[[], _T],
        args: Sequence[tuple[str, object]] | Callable[[_T | None], Sequence[tuple[str, object]]],
        *,
        flags: Sequence[tuple[str, int]] = (),
    ) -> _T:
        """check()'s value: this rank's host-side validation, agreed with every rank (World.check)
        before any feature collective, so one rank's bad input is the same error everywhere.
        `args` may be a function of check()'s value (None when it raised), for tensors the check
        converts."""
        out, err = None, None
        try:
            out = check()
        except (TypeError, ValueError, RuntimeError) as e:
            err = e
        self.check(what, args(out) if callable(args) else args, flags=flags, local_error=err)
        return out  # type: ignore[return-value]

    def gather(self, x: torch.Tensor, *, with_grad: bool) -> torch.Tensor:
        if self.size == 1:
            return x if with_grad else x.detach()
        return all_gather_rows(x, with_grad=with_grad, group=self.group)

    def reinsert(self, gathered: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return local
        return _reinsert(gathered, local, self.rank)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of x, in place, on every rank."""
        if self.size > 1:
            _dist().all_reduce(x, group=self.group)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (x must have the same shape and dtype everywhere)."""
        if self.size == 1:
            return x
        dist = _dist()
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        x = x.contiguous()
        dist.broadcast(x, src=src, group=self.group)
        return x


# ---------------------------------------------------------------------------------------------
# communication accounting

_COMM_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
_NOT_COMM = ("wait_tensor", "_wrap_tensor_autograd")


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


class CommCounter:
    """Records every collective this process runs while active, forward and backward alike
    (autograd collectives included): a TorchDispatchMode on the c10d / functional-collective
    ops. Each record is (phase, op, bytes), bytes = the collective's largest buffer (the
    gathered output of an all-gather, the input of a reduce-scatter, the tensor of an
    all-reduce / broadcast). `phase` is the label set by the caller (e.g. "forward",
    "backward"). Bench and test instrument only: every op of the process goes through it."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, int]] = []
        self.phase = "forward"
        self._mode = None

    def __enter__(self) -> CommCounter:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = func.name().split("::")[-1].split(".")[0]
                if func.namespace in _COMM_NAMESPACES and name not in _NOT_COMM:
                    ts = _tensors(list(args) + list((kwargs or {}).values())) + _tensors(out)
                    size = max((t.numel() * t.element_size() for t in ts), default=0)
                    counter.records.append((counter.phase, name, int(size)))
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def total(self, phase: str | None = None) -> int:
        return sum(b for p, _, b in self.records if phase is None or p == phase)

    def largest(self, phase: str | None = None) -> int:
        return max((b for p, _, b in self.records if phase is None or p == phase), default=0)


def _dist_up() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


class InWorld:
    """Mixin of the loss modules: `_world()`, the World of the module's constructor arguments
    (World.from_args). A module sets the attributes it takes; the rest keep these defaults."""

    rank: int | None = None
    world_size: int | None = None
    distributed: bool | None = None
    process_group: object = None

    def _world(self) -> World:
        return World.from_args(
            self.rank,
            self.world_size,
            group=self.process_group,
            distributed=self.distributed,
            owner=type(self).__name__,
        )
