"""state_sharding="owner": the per-sample rate state split over ranks by owner; and the one door
of GammaClipLoss / SogCLRLoss to the scale-out modes (also grad_comm="local"'s step functions,
from gammacl._local_grad).

Rank r of W keeps the entries of the data-set indices k with k mod W == r, at slot k div W: a
LogRateState of ceil((num_samples - r) / W) <= ceil(num_samples / W) entries per direction,
instead of num_samples on every rank ("replicated"). rate="ema" only (update "before" or
"after"): rate="batch" has no state, rate="fixed" is set whole (set_log_rates).

Two-pass step (update before use, update="before"): the batch's (index, log Zhat) pairs are
already all-gathered (an [N, 3] float64 buffer, as for "replicated"); each rank applies the EMA
rule to the positions it owns -- every duplicate of an index has the same owner, so
LogRateState.update's duplicate rule (the last finite estimate wins) holds unchanged -- and
writes their updated log-rates into an [2, N] buffer that is zero elsewhere; one all-reduce
(sum) of it gives every rank the updated rate of every position of the global batch. Two O(N)
collectives per step, the same values as "replicated" (each position has one owner, and
x + 0 = x exactly).

One-pass step (update after use, update="after"; `lookup` / `owner_read`): the sweep needs the
STORED rates of this rank's rows (and their visited flags: first visits take this batch's
Zhat, and "all seen" picks the path), before any update. One all-gather of the [N] int64 index;
each rank writes the stored log-rates and visited flags (as 0 / 1) of the positions it owns into
a [4, N] buffer (state dtype) that is zero elsewhere; one all-reduce (sum) gives every rank
every position's entry, exactly. RatePair.check cannot tell "all seen" from a shard, so it is
set from the read (eager: a second host sync). After the sweep the write is the two-pass
step's without its all-reduce (the updated rates are not used): the [N, 3] all-gather, then each
rank's owned entries. Three O(N) collectives per step; "replicated" has only the all-gather.
The owned subset is found with a boolean mask (one host sync per use).

Checkpoints: each rank saves its shard, with (rank, world size) in the loss's extra state;
loading a shard saved at another rank / world size is refused (`check_shard`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gammacl import _validate as V
from gammacl._local_grad import neg_lse_local, neg_one_pass_local  # noqa: F401 (gamma's hooks)
from gammacl.distributed import GRAD_COMMS, World, check_grad_comm

STATE_SHARDINGS = ("replicated", "owner")


def shard_size(num_samples: int, rank: int, world_size: int) -> int:
    """Number of indices k in [0, num_samples) with k mod world_size == rank."""
    return max(0, -(-(num_samples - rank) // world_size))


def owner_update(states, all_index, all_lz, world: World, want: bool = True):
    """Updated log-rates [2, N] of every position of the global batch (module docstring), or
    None without `want` (update after use: the owned entries written, no all-reduce); `states`
    are this rank's two shards, all_index [N] global indices, all_lz [2, N]."""
    own, local = owned(all_index, world)
    new = torch.zeros_like(all_lz)
    for k, s in enumerate(states):
        new[k, own] = s.update(local, all_lz[k, own], check=False).to(new.dtype)
    return world.all_reduce_sum(new) if want else None


def owner_read(states, index: torch.Tensor, world: World):
    """(log_rate, visited) [2, n] of this rank's n positions, read from the shards (module
    docstring): the gathered index, each rank's owned positions in a [4, N] buffer that is zero
    elsewhere (rows: image and text log-rate, image and text visited as 0 / 1), one all-reduce."""
    every = world.gather(index, with_grad=False)
    own, local = owned(every, world)
    buf = torch.zeros(4, every.shape[0], dtype=states[0].log_rate.dtype, device=index.device)
    for k, s in enumerate(states):
        rate, seen = s.lookup(local, check=False)
        buf[k, own], buf[2 + k, own] = rate, seen.to(buf.dtype)
    n = index.shape[0]
    mine = world.all_reduce_sum(buf)[:, world.rank * n : (world.rank + 1) * n]
    return mine[:2], mine[2:] != 0


def owned(index: torch.Tensor, world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the positions this rank owns, their slots in its shard)."""
    own = torch.remainder(index, world.size) == world.rank
    return own, torch.div(index[own], world.size, rounding_mode="floor")


def check_shard(saved: object, current: tuple[int, int], what: str) -> None:
    """Refuses a checkpoint shard saved at another (rank, world size)."""
    saved = tuple(saved) if saved is not None else None
    if saved != current:
        got = (
            "a replicated (full) state"
            if saved is None
            else f"the shard of rank {saved[0]} of {saved[1]}"
        )
        raise ValueError(
            f"{what}: state_sharding='owner' checkpoint holds {got}, but this process is rank "
            f"{current[0]} of {current[1]}; resume at the same world size and rank (each rank "
            "loads the shard it saved), or reshard offline: entry k lives on rank k mod W at "
            "slot k div W"
        )


def modes(grad_comm: str, state_sharding: str, rate: str, update: str) -> tuple[str, str]:
    """Validated (grad_comm, state_sharding) of a GammaClipLoss / SogCLRLoss: "owner" shards the
    EMA state (rate="ema"; update "before": two-pass path, "after": one-pass); "local" on every
    path. `update` is validated by the caller."""
    check_grad_comm(grad_comm)
    if state_sharding not in STATE_SHARDINGS:
        raise ValueError(f"state_sharding must be one of {STATE_SHARDINGS}, got {state_sharding!r}")
    if state_sharding == "owner" and rate != "ema":
        raise ValueError(
            "state_sharding='owner' shards the moving-average rate state (rate='ema', update "
            "'before' or 'after'); rate='batch' keeps no state and rate='fixed' is set whole by "
            f"set_log_rates, got rate={rate!r}"
        )
    return grad_comm, state_sharding


def mode_code(loss) -> int:
    """A loss's (grad_comm, state_sharding) as one int for the metadata agreement."""
    return GRAD_COMMS.index(loss.grad_comm) + 2 * STATE_SHARDINGS.index(loss.state_sharding)


def shard_for(loss) -> OwnerShard | None:
    """The loss's OwnerShard (state_sharding="owner"; its world resolved now), else None."""
    if loss.state_sharding != "owner":
        return None
    return OwnerShard(loss._world(), type(loss).__name__)


def rate_states(loss, state_cls, num_samples: int):
    """(image, text) rate states of a loss: None for rate="batch"; state_cls(size, ema) of the
    whole data set, or of this rank's shard, tagged with its place (`shard_place`, read by
    `update`)."""
    if loss.rate == "batch":
        return None, None
    size = loss.shard.size(num_samples) if loss.shard is not None else num_samples
    states = state_cls(size, loss.ema), state_cls(size, loss.ema)
    for s in states:
        s.shard_place = loss.shard.place if loss.shard is not None else None
    return states


class OwnerShard(nn.Module):
    """This rank's place (rank, world size) in an owner-sharded state, fixed at construction. A
    child module of the loss registered before its rate states, so its extra state (the place)
    is checked on load before their buffers are (`check_shard`)."""

    def __init__(self, world: World, what: str = "GammaClipLoss") -> None:
        super().__init__()
        self.place = (world.rank, world.size)
        self.what = what

    def extra_repr(self) -> str:
        return f"rank={self.place[0]}, world_size={self.place[1]}"

    def size(self, num_samples: int) -> int:
        return shard_size(num_samples, *self.place)

    def get_extra_state(self) -> dict:
        return {"shard": self.place}

    def set_extra_state(self, state: dict) -> None:
        check_shard(state.get("shard"), self.place, self.what)


def place(state) -> tuple[int, int] | None:
    """The (rank, world size) of an owner shard (tagged by rate_states); None: the whole state."""
    return getattr(state, "shard_place", None)


def _owner_place(states, world: World) -> tuple[int, int] | None:
    """The shards' place (checked against the world the step runs in), None when replicated."""
    where = place(states[0])
    if where is not None and (world.rank, world.size) != where:
        raise ValueError(
            f"state_sharding='owner': this loss holds the shard of rank {where[0]} of "
            f"{where[1]} (fixed at construction), but runs as rank {world.rank} of {world.size}"
        )
    return where


def update(states, all_index, all_lz, world: World, want: bool = True) -> torch.Tensor | None:
    """Updated log-rates [2, N] of every position of the (gathered) batch: the replicated rule
    on the whole state, or `owner_update` on this rank's shard (states tagged by rate_states)."""
    if _owner_place(states, world) is None:
        return torch.stack([s.update(all_index, lz, check=False) for s, lz in zip(states, all_lz)])
    return owner_update(states, all_index, all_lz, world, want)


def lookup(states, idx, world: World):
    """(log_rate, visited) [2, n] of this rank's rows and `idx` (a gamma.CheckedIndex): the
    replicated state's LogRateState.lookup, or `owner_read` with idx.all_seen set from it (eager:
    one host sync; RatePair.check left it None, the shard cannot see other ranks' entries)."""
    if _owner_place(states, world) is None:
        got = [s.lookup(idx) for s in states]
        return torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got]), idx
    stored, seen = owner_read(states, idx.index, world)
    if not torch.compiler.is_compiling():
        idx = dataclasses.replace(idx, all_seen=bool(seen.all()))
    return stored, seen, idx


def update_state(loss, index, log_zhat_image, log_zhat_text) -> None:
    """GammaClipLoss.update_state: every argument checked (index range against num_samples)
    before either direction is written (a raise changes nothing); then every given entry, or
    (owner) those this rank owns."""
    index = loss._rates.check(index, None, loss.image_rate.log_rate.device, False).index
    V.check_log_zhat("log_zhat_image", log_zhat_image, index)
    V.check_log_zhat("log_zhat_text", log_zhat_text, index)
    lz = (log_zhat_image, log_zhat_text)
    if loss.shard is not None:
        own, index = owned(index, World(*loss.shard.place))
        lz = tuple(x[own] for x in lz)
    loss.image_rate.update(index, lz[0], check=False)
    loss.text_rate.update(index, lz[1], check=False)
