"""W gloo ranks on this host (CPU): the one launcher of bench/dist_comm.py and the tests'
spawned worlds. The parent picks a free port and spawns `target(rank, world, port, out, *args)`
per rank; each rank joins the group with `gloo_rank` (one CPU thread per rank: W ranks share
the host's cores)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int, *, timeout_s: float = 60.0) -> Iterator[None]:
    """This process as rank `rank` of a `world`-rank gloo group rendezvousing on
    127.0.0.1:`port`; the group is destroyed on exit."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_ranks(
    target: Callable[..., None], world: int, args: Sequence[Any] = (), *, daemon: bool = True
) -> tuple[list, Any]:
    """Starts `world` spawned processes target(rank, world, port, queue, *args) on one free
    port; returns (processes, queue)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=target, args=(r, world, port, q, *args), daemon=daemon)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    return procs, q
