"""The gamma-weighted decomposable contrastive loss (Paper A, stochastic EM), its per-sample
partition-function state, and SogCLR as its mean-E-step special case. Design note with every
choice: docs/gamma.md; derivation: docs/math.md.

Objective (positive excluded from the denominator, l = logit_scale * <image_i, text_j>):
    G = 1/2 mean_i [-l_ii + log Z_i] + 1/2 mean_j [-l_jj + log Z^T_j],  Z_i = mean_{j!=i} e^{l_ij}
over the whole data set. Each step draws G_i ~ Gamma(a, 1)/a per anchor and direction and
minimises the decomposable surrogate
    1/2 mean_i [-l_ii + u_i Zhat_i] + 1/2 mean_j [-l_jj + v_j Zhat^T_j],   u_i = G_i / R_i
(Zhat over the B - 1 in-batch negatives, u without gradient), whose expected gradient is grad G
when R_i = Z_i, for any batch size:
    dloss/dl_ij = 1/(2B) (e^{l_ij + alpha_i} + e^{l_ij + alpha^T_j}) (i != j),  -1/B (i == j)
    alpha_i = log(G_i / a) - log R_i - log(B - 1)
update="before": rate updated with this batch, then used (two sweeps, 8MND, weights <= G/(a ema));
update="after": stored rate used, then updated (gamma_onepass: one sweep, 6MND, exponents capped).
One step method, `GammaClipLoss._step`, serves a single process and torch.distributed alike; it
reads and writes the rate state through one door, `RatePair` (the index checked once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gammacl import _validate as V
from gammacl import sharded_state as SS  # the scale-out hooks (docs/distributed.md)
from gammacl._random import _draw_op, _GeneratorAttr, draw_log_weights  # noqa: F401
from gammacl._trainstate import estimate_valued_step
from gammacl.clip import _pos_logits
from gammacl.dispatch import resolve_traced
from gammacl.distributed import InWorld, World
from gammacl.ops.gamma_onepass import DEFAULT_CLAMP, gamma_onepass
from gammacl.ops.simlse import simlse
from gammacl.temperature import TemperatureMixin, rgcl_output

RATES = ("ema", "batch", "fixed")
UPDATES = ("before", "after")
_RATE_CODES = {"ema": 0, "batch": 1, "fixed": 2}
_NO_TERM = -1e30  # alpha of an unused direction in gamma_onepass: e^{l - 1e30} = 0, no inf - inf


def _check_index_tensor(index: object, batch: int | None) -> torch.Tensor:
    if not isinstance(index, torch.Tensor):
        raise TypeError(
            f"index must be an int64 tensor of data-set indices, got {type(index).__name__}"
        )
    if index.device.type == "meta" and not torch.compiler.is_compiling():
        raise ValueError("index is on the meta device (no values); pass the data-set indices")
    if index.dtype == torch.bool or index.dtype.is_floating_point or index.dtype.is_complex:
        raise TypeError(
            f"index must be an integer (int64) tensor of data-set indices, got dtype {index.dtype}"
        )
    if index.ndim != 1 or (batch is not None and index.shape[0] != batch):
        want = f"({batch},)" if batch is not None else "(B,)"
        raise ValueError(
            f"index must have shape {want}, one data-set index per pair, got {tuple(index.shape)}"
        )
    return index


def _range_error(num_samples: int, lo: int, hi: int) -> ValueError:
    return ValueError(
        f"index values must lie in [0, {num_samples - 1}] "
        f"(num_samples={num_samples}), got values in [{lo}, {hi}]"
    )


@dataclass(frozen=True)
class CheckedIndex:
    """A batch's data-set indices after their one check (RatePair.check): `index` int64 on the
    state's device (clamped into range while compiling), `all_seen` (eager, when asked: every
    sample visited in both directions; None when compiled: unknown on the host; owner shard: None
    until RatePair.lookup's read sets it), `bad` (compiled: 0-d device bool "some index was out of
    range"; None in eager). LogRateState.lookup / update take it as it is, without a second
    check."""

    index: torch.Tensor | None
    all_seen: bool | None = True
    bad: torch.Tensor | None = None


class LogRateState(nn.Module):
    """Per-sample log partition-function estimates log R for ONE direction (docs/math.md §K.1).

    Buffers (saved by state_dict): `log_rate` [num_samples] fp32, `visited` [num_samples] bool,
    `nonfinite` (int64: rows whose log Zhat was non-finite and were therefore not stored).
    `update(index, log_zhat)` is the one update rule; a distributed caller can pass gathered
    indices and log Zhat from every rank. `check=True` validates the index range on the host
    (one sync) in eager mode; while torch.compile traces, the index is trusted (GammaClipLoss's
    compiled forward clamps it and turns an out-of-range batch into a NaN loss itself).
    """

    def __init__(self, num_samples: int, ema: float = 0.1) -> None:
        super().__init__()
        self.num_samples = int(num_samples)
        self.ema = float(ema)
        self.register_buffer("log_rate", torch.zeros(self.num_samples, dtype=torch.float32))
        self.register_buffer("visited", torch.zeros(self.num_samples, dtype=torch.bool))
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, ema={self.ema}"

    def _index(self, index: object, check: bool) -> torch.Tensor:
        if isinstance(index, CheckedIndex):  # checked once, by RatePair.check
            return index.index
        index = _check_index_tensor(index, None).to(self.log_rate.device, torch.int64)
        if check and index.numel() and not torch.compiler.is_compiling():  # compiled: trusted
            lo, hi = torch.stack([index.min(), index.max()]).tolist()  # one host sync
            if lo < 0 or hi >= self.num_samples:
                raise _range_error(self.num_samples, lo, hi)
        return index

    def lookup(
        self, index: torch.Tensor | CheckedIndex, *, check: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_rate[index], visited[index])."""
        index = self._index(index, check)
        return self.log_rate[index], self.visited[index]

    @torch.no_grad()
    def update(
        self, index: torch.Tensor | CheckedIndex, log_zhat: torch.Tensor, *, check: bool = True
    ) -> torch.Tensor:
        """Applies the EMA rule for positions `index` with batch estimates `log_zhat` (same
        length) and returns the updated log-rates per position (in log_zhat's dtype, computed
        from the state as it was before this call: the "update before use" rates)."""
        index = self._index(index, check)
        V.check_log_zhat("log_zhat", log_zhat, index)
        lz = log_zhat.detach().to(self.log_rate.device)
        keep = math.log1p(-self.ema) if self.ema < 1.0 else float("-inf")
        old, seen = self.log_rate[index].to(lz.dtype), self.visited[index]
        new = torch.where(seen, torch.logaddexp(old + keep, lz + math.log(self.ema)), lz)
        ok = torch.isfinite(lz)
        # Each index stores the value of its last finite position: a stable sort by
        # (index, finite) puts that position last in its group, and searchsorted(right) - 1 finds
        # the group's last slot; every duplicate then writes the same value (deterministic).
        order = torch.argsort(index * 2 + ok.long(), stable=True)
        sorted_idx = index[order]
        winner = torch.empty_like(index)
        winner[order] = order[torch.searchsorted(sorted_idx, sorted_idx, right=True) - 1]
        store = ok[winner]
        self.log_rate[index] = torch.where(store, new[winner].float(), old.float())
        self.visited[index] = seen | store
        self.nonfinite += (~ok).sum()
        return new

    @torch.no_grad()
    def set_log_rates(self, log_rate: torch.Tensor) -> None:
        """Sets every sample's log-rate (rate="fixed"); must be finite, shape [num_samples]."""
        V.check_log_rates("log-rates", log_rate, self.num_samples)
        self.log_rate.copy_(log_rate.detach())
        self.visited.fill_(True)


class RatePair:
    """The rate state of both anchor directions (image, text; None for rate="batch") of one loss,
    and the step's one door to it: `check` validates a batch's index once (one host sync in eager
    mode), `lookup` and `update` read and write both directions through LogRateState.lookup /
    update with that CheckedIndex."""

    def __init__(self, image: LogRateState | None, text: LogRateState | None, num_samples: int):
        self.image, self.text, self.num_samples = image, text, num_samples

    def _on(self, device: torch.device) -> tuple[LogRateState, LogRateState]:
        if self.image.log_rate.device != device:
            self.image.to(device)
            self.text.to(device)
        return self.image, self.text

    def check(self, index: object, b: int, device: torch.device, want_seen: bool) -> CheckedIndex:
        """Eager: the int64 index on `device`, range-checked and (want_seen) whether every
        sample in it was visited in both directions, in one host sync. Compiled (no host sync):
        clamped into range, `bad` flags an out-of-range value. None passes for a state-free
        loss (rate="batch")."""
        if index is None and self.image is None:
            return CheckedIndex(None)
        index = _check_index_tensor(index, b).to(device=device, dtype=torch.int64)
        if torch.compiler.is_compiling():
            bad = ((index < 0) | (index >= self.num_samples)).any()
            return CheckedIndex(index.clamp(0, self.num_samples - 1), None, bad)
        stats = [index.min(), index.max()]
        owner = want_seen and SS.place(self.image) is not None  # owner: seen after the read
        if want_seen and not owner:
            safe = index.clamp(0, self.num_samples - 1)
            img, txt = self._on(device)
            stats.append((img.visited[safe] & txt.visited[safe]).all().long())
        vals = torch.stack(stats).tolist()
        if vals[0] < 0 or vals[1] >= self.num_samples:
            raise _range_error(self.num_samples, vals[0], vals[1])
        return CheckedIndex(index, None if owner else bool(vals[2]) if want_seen else True)

    def lookup(self, idx: CheckedIndex, world: World):
        """(log_rate, visited) [2, n] of the batch's samples (row 0 image, row 1 text), and idx
        (owner: with all_seen from the read, sharded_state.lookup)."""
        return SS.lookup(self._on(idx.index.device), idx, world)

    def update(self, idx: CheckedIndex, log_zhat, world: World, want: bool = True):
        """The rate update from every rank's (index, log Zhat) (identical state on every rank);
        returns the updated log-rates of this rank's rows [2, n] (update-before-use rates), or
        None when not `want`ed (update after use: owner skips its all-reduce)."""
        index = idx.index
        if world.size > 1:  # one all-gather of an [n, 3] float64 buffer (indices < 2^53 exact)
            packed = torch.cat([index.to(torch.float64)[:, None], log_zhat.t().double()], dim=1)
            out = world.gather(packed, with_grad=False)
            every = CheckedIndex(out[:, 0].long())
            all_lz = out[:, 1:].t().to(log_zhat.dtype)
        else:
            every, all_lz = idx, log_zhat
        img, txt = self._on(log_zhat.device)
        new = SS.update((img, txt), every.index, all_lz, world, want)  # replicated, or owner's
        n = index.shape[0]
        return None if new is None else new[:, world.rank * n : (world.rank + 1) * n]


def _valid_estimates(image, text, all_image, all_text, off: int, scale) -> torch.Tensor:
    """[2, n] mask of this rank's log Zhat that rest on finite inputs only: image anchor i needs
    image_i and every gathered text but its positive (global column i + off) finite, text anchors
    likewise. Rows outside it are never stored, whatever a backend makes of a NaN (O(BD), no
    host sync)."""
    n = image.shape[0]
    bad_i, bad_t = (~torch.isfinite(x.detach()).all(dim=1) for x in (all_image, all_text))
    row_ok = torch.isfinite(image.detach()).all(dim=1) & (
        bad_t.sum() - bad_t[off : off + n].long() == 0
    )
    col_ok = torch.isfinite(text.detach()).all(dim=1) & (
        bad_i.sum() - bad_i[off : off + n].long() == 0
    )
    return torch.stack([row_ok, col_ok]) & torch.isfinite(scale.detach())


def _neg_lse(image, text, all_image, all_text, scale, off: int, world: World, backend: str):
    """Negatives-only LSEs [M], [M] of this rank's image anchors (against the gathered texts) and
    text anchors (against the gathered images), the positive (column i + off) left out. A world
    of one: one symmetric sweep (row and column statistics together); else two row sweeps."""
    if world.size == 1:
        return simlse(image, text, scale, exclude_pos=True, backend=backend)
    row, _ = simlse(
        image, all_text, scale, offset=off, exclude_pos=True, cols=False, backend=backend
    )
    col, _ = simlse(
        text, all_image, scale, offset=off, exclude_pos=True, cols=False, backend=backend
    )
    return row, col


def _log_zhat(row, col, valid, log_m: float) -> torch.Tensor:
    """This batch's log Zhat [2, n] (detached), NaN where it rests on a non-finite input (so the
    state never stores it)."""
    return torch.where(valid, torch.stack([row, col]).detach() - log_m, float("nan"))


def _neg_two_pass(row, col, log_w, log_r, log_m):
    """1/2 mean_i u_i Zhat_i + 1/2 mean_j v_j Zhat^T_j with Zhat from the excluded-positive LSEs
    (row, col carry simlse's autograd): u_i Zhat_i = exp(alpha_i + row_i), so simlse's backward
    forms exactly the weights e^{l_ij + alpha_i}, alpha = log_w - log_r - log(B - 1)."""
    alpha = (log_w - log_r).detach() - log_m
    return 0.5 * torch.exp(alpha + torch.stack([row, col])).mean(dim=1).sum()


def _neg_one_pass(
    image,
    text,
    all_image,
    all_text,
    scale,
    log_w,
    log_r,
    log_m,
    clamp,
    off,
    world: World,
    backend: str,
):
    """The negative term, its gradient and the excluded-positive LSEs from gamma_onepass; weight
    1/(2n) per local anchor (summed over ranks: 1/(2B) per anchor of the global batch)."""
    n = image.shape[0]
    alpha = (log_w - log_r).detach() - log_m
    w = 0.5 / n
    if world.size == 1:
        neg, row, col, _, _ = gamma_onepass(
            image, text, scale, alpha[0], alpha[1], w_row=w, w_col=w, clamp=clamp, backend=backend
        )
        return neg, row, col
    no_term = torch.full((all_text.shape[0],), _NO_TERM, dtype=alpha.dtype, device=image.device)
    out = [
        gamma_onepass(
            x,
            y,
            scale,
            alpha[k],
            no_term,
            w_row=w,
            w_col=0.0,
            clamp=clamp,
            offset=off,
            backend=backend,
        )
        for k, (x, y) in enumerate(((image, all_text), (text, all_image)))
    ]
    return out[0][0] + out[1][0], out[0][1], out[1][1]


def _check_step_vector(name: str, x: object, b: int, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.shape != (2, b) or not x.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a float tensor of shape (2, {b}) (image anchors, text "
            f"anchors), got {getattr(x, 'shape', type(x))}"
        )
    return x.detach().to(device=like.device, dtype=V.acc_dtype(like.dtype))


def gamma_step_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    log_weight: torch.Tensor,
    log_rate: torch.Tensor,
    *,
    one_pass: bool = False,
    clamp: float = DEFAULT_CLAMP,
    backend: str = "auto",
) -> torch.Tensor:
    """One M-step loss for GIVEN draws and rates (module docstring): log_weight = log u R, e.g.
    log(G / a), and log_rate = log R, both [2, B] (row 0 image anchors, row 1 text anchors) and
    held constant. one_pass=False: simlse + its backward (no cap); one_pass=True: gamma_onepass
    with exponents capped at `clamp`. This is the function GammaClipLoss runs each step after
    its E-step and rate bookkeeping; with the draws fixed it is deterministic (gradcheck-able)."""
    V.check_pair("image_features", image_features, "text_features", text_features, same_batch=True)
    b = image_features.shape[0]
    if b < 2:
        raise ValueError(
            f"the gamma loss needs at least 2 pairs (B - 1 in-batch negatives), got B = {b}"
        )
    scale = V.as_scale("logit_scale", logit_scale, image_features)
    log_w = _check_step_vector("log_weight", log_weight, b, image_features)
    log_r = _check_step_vector("log_rate", log_rate, b, image_features)
    name = resolve_traced(backend, image_features.device)
    log_m = math.log(b - 1)
    pos = _pos_logits(image_features, text_features, scale)
    if one_pass:
        x, y = image_features, text_features
        neg = _neg_one_pass(x, y, x, y, scale, log_w, log_r, log_m, clamp, 0, World(), name)[0]
    else:
        row, col = simlse(image_features, text_features, scale, exclude_pos=True, backend=name)
        neg = _neg_two_pass(row, col, log_w, log_r, log_m)
    return neg - pos.mean()


def default_clamp(rate: str, ema: float, update: str) -> float:
    """The exponent cap when `clamp` is not given: log(1/ema) for the one-pass mode on EMA rates
    (update="after", rate="ema", ema < 1; the bound "before" guarantees, u_i Zhat_i <= 1/ema; the
    stale rate is unbounded: docs/experiments.md), else DEFAULT_CLAMP (30, a numerical guard)."""
    if update == "after" and rate == "ema" and 0.0 < ema < 1.0:
        return min(DEFAULT_CLAMP, math.log(1.0 / ema))
    return DEFAULT_CLAMP


class GammaClipLoss(InWorld, _GeneratorAttr, TemperatureMixin, nn.Module):
    """Gamma-weighted decomposable symmetric contrastive loss with per-sample rate state
    (stochastic EM; the objective and estimator: module docstring; every choice: docs/gamma.md).

    Args:
        num_samples: data-set size n; `index` values lie in [0, n).
        shape: Gamma shape a > 0 (a = 1: Exponential, Paper A's draw; a -> inf: SogCLR); draws
            have mean 1 and variance 1/a. Default 10. What holds at small batch is the moving-
            average rate (SogCLR); the draw only adds variance (docs/experiments.md, docs/gamma.md).
        rate: "ema" (per-sample moving average, default), "batch" (no state) or "fixed"
            (set_log_rates).
        ema: weight of the new batch estimate in the moving average, 0 < ema <= 1. Default 0.5
            (docs/experiments.md: 0.02-0.1 are too stale at batch 8, 0.9 keeps no correction).
        update: "before" (update, then use; bounded weights; two passes) or "after" (the stored,
            one-epoch-stale rate, then update; one fused pass, exponents capped at `clamp`,
            default log(1/ema)). From batch 16 one-pass trains worse than minibatch InfoNCE
            (global loss: 4 of 5 seeds at B=16, all at B >= 32; docs/experiments.md).
        generator: torch.Generator for the draws (reproducible runs); its state is saved in
            state_dict() so a checkpoint resumes the same draws (a module built without a
            generator gets one, on the saved device, when it loads a checkpoint that has one).
        backend: "auto", "torch", "cpp", "triton", "cuda" or "reference".
        clamp: exponent cap of the one-pass path; None (default): `default_clamp(rate, ema,
            update)`, i.e. log(1/ema) for update="after" with EMA rates, else 30.
        distributed: None (default): run over the process group's world whenever
            torch.distributed is initialised with more than one rank (in `process_group`,
            default the world): every rank passes its own pairs and their global data-set
            indices; the state is updated from all ranks' rows and stays identical everywhere
            (save it from any rank), rank 0's draws are broadcast. True: always; False: never
            (each rank keeps its own state and sees only its own batch).
        process_group: the torch.distributed group for distributed use (default: the world).
        grad_comm, state_sharding: scale-out modes, SogCLRLoss too (docs/distributed.md).
        **temperature: temperature ("input", "rgcl", "individual"), rho, tau_init, tau_min,
            tau_max, tau_lr, tau_momentum, ema_schedule ("constant", "cosine"),
            ema_decay_epochs (gammacl.temperature.TemperatureMixin.init_temperature).
    forward(image_features, text_features, logit_scale, index, output_dict=False) returns the
    0-d loss (fp32; fp64 for fp64 features) or {"contrastive_loss": loss}; `index` [B] holds each
    pair's data-set index (int64; may be None for rate="batch"). Value: global_loss_estimate (G
    at this batch with the rates used: what a trainer logs); gradient: the surrogate's. The state
    changes only while training (gammacl._trainstate), or by update_state().
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shape: float = 10.0,
        rate: str = "ema",
        ema: float = 0.5,
        update: str = "before",
        generator: torch.Generator | None = None,
        backend: str = "auto",
        clamp: float | None = None,
        distributed: bool | None = None,
        process_group=None,
        grad_comm: str = "reduce",
        state_sharding: str = "replicated",
        **temperature: Any,
    ) -> None:
        super().__init__()
        V.check_choice("distributed", distributed, (None, True, False))
        num_samples = V.check_positive_int("num_samples", num_samples)
        shape = V.check_real("shape (the Gamma shape a)", shape)
        V.check_choice("rate", rate, RATES)
        ema = V.check_real("ema (weight of the new batch estimate)", ema, high=1.0)
        V.check_choice("update", update, UPDATES)
        self.grad_comm, self.state_sharding = SS.modes(grad_comm, state_sharding, rate, update)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        V.check_backend(backend)
        clamp = V.check_real("clamp", default_clamp(rate, ema, update) if clamp is None else clamp)
        self.num_samples = num_samples
        self.shape = shape
        self.rate = rate
        self.ema = ema
        self.update = update
        self.generator = generator
        self.backend = backend
        self.clamp = clamp
        self.distributed = distributed
        self.process_group = process_group
        self._mean_estep = False  # SogCLR: u = 1/R instead of a draw
        self.shard = SS.shard_for(self)  # state_sharding="owner": this rank's place, else None
        self.image_rate, self.text_rate = SS.rate_states(self, LogRateState, num_samples)
        self._fixed_set = False
        self.last_path: str | None = None  # "two_pass", "one_pass" or "lse+one_pass"
        self.global_loss_estimate: torch.Tensor | None = None
        self.init_temperature(**temperature)

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, shape={self.shape}, rate={self.rate!r}, "
            f"ema={self.ema}, update={self.update!r}, backend={self.backend!r}"
        )

    def update_state(
        self, index: torch.Tensor, log_zhat_image: torch.Tensor, log_zhat_text: torch.Tensor
    ) -> None:
        """Applies the rate update for (possibly gathered) indices and batch log Zhat of both
        directions; what forward does after (or before) use."""
        if self.rate != "ema":
            raise RuntimeError(f"update_state needs rate='ema', this loss has rate={self.rate!r}")
        SS.update_state(self, index, log_zhat_image, log_zhat_text)  # checked, then written

    def set_log_rates(self, image_log_rate: torch.Tensor, text_log_rate: torch.Tensor) -> None:
        """rate="fixed": the log-rates log R of every sample, per direction, [num_samples]."""
        if self.rate != "fixed":
            raise RuntimeError(
                f"set_log_rates needs rate='fixed', this loss has rate={self.rate!r}"
            )
        V.check_log_rates("image_log_rate", image_log_rate, self.num_samples)  # both checked
        V.check_log_rates("text_log_rate", text_log_rate, self.num_samples)  # before any write
        self.image_rate.set_log_rates(image_log_rate)
        self.text_rate.set_log_rates(text_log_rate)
        self._fixed_set = True

    def get_extra_state(self) -> dict:
        gen = self.generator
        dev, gen_state = (None, None) if gen is None else (str(gen.device), gen.get_state())
        out = {"generator_state": gen_state, "generator_device": dev, "epoch": self.epoch}
        return out | {"fixed_set": self._fixed_set}

    def set_extra_state(self, state: dict) -> None:
        gen_state = state.get("generator_state")
        if gen_state is not None:
            if self.generator is None:
                # the checkpoint's draws came from its own generator: a module built without one
                # gets a generator on the saved device, so the resumed run draws the same stream
                self.generator = torch.Generator(state.get("generator_device") or "cpu")
            self.generator.set_state(gen_state)
        self._fixed_set = bool(state.get("fixed_set", self._fixed_set))
        if state.get("epoch") is not None:
            self.set_epoch(state["epoch"])

    # -- one step ------------------------------------------------------------------------------
    @property
    def _rates(self) -> RatePair:
        return RatePair(self.image_rate, self.text_rate, self.num_samples)

    def _one_pass(self) -> bool:
        return self.rate == "fixed" or (self.rate == "ema" and self.update == "after")

    def _agree(self, image_features, text_features, logit_scale, index, world: World):
        """(scale, backend name, CheckedIndex): the step's arguments validated once and, on
        several ranks, agreed before any feature collective."""

        def check():
            scale, name = V.check_paired_step(
                image_features, text_features, logit_scale, self.backend
            )
            n = image_features.shape[0]
            if world.size * n < 2:
                raise ValueError(
                    f"{type(self).__name__} needs at least 2 pairs per batch (B - 1 in-batch "
                    f"negatives per anchor), got B = {world.size * n}"
                )
            if self.rate == "fixed" and not self._fixed_set:
                raise RuntimeError(
                    "rate='fixed' needs set_log_rates(image_log_rate, text_log_rate) "
                    "before the first forward"
                )
            want_seen = self.rate == "ema" and self._one_pass()
            return scale, name, self._rates.check(index, n, image_features.device, want_seen)

        return world.agree(
            f"gammacl {type(self).__name__} (distributed)",
            check,
            lambda out: [
                ("image_features", image_features),
                ("text_features", text_features),
                ("index", index if out is None else out[2].index),
            ],
            flags=[
                ("num_samples", self.num_samples),
                ("rate", _RATE_CODES[self.rate]),
                ("update", int(self.update == "after")),
                ("mean_estep", int(self._mean_estep)),
                ("grad_comm/state_sharding", SS.mode_code(self)),
                *self.temperature_flags(),
            ],
        )

    def _log_weights(self, b: int, like: torch.Tensor, world: World) -> torch.Tensor:
        """log(G / a) [2, b] for the global batch, drawn as one process would draw it (by rank 0,
        broadcast); zeros for SogCLR's mean E-step."""
        acc = V.acc_dtype(like.dtype)
        if self._mean_estep:
            return torch.zeros(2, b, dtype=acc, device=like.device)
        # draw_log_weights(shape, b, generator, device).to(acc), as an opaque op (see _draw_op)
        w = _draw_op("log_gamma", self.shape, b, self._generator_key(), like.device, acc)
        return world.broadcast(w)

    def _step(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: float | torch.Tensor,
        index: torch.Tensor | None,
        world: World,
    ) -> torch.Tensor:
        """One stochastic-EM step in `world`: E-step draws and rate bookkeeping, then the M-step
        surrogate (module docstring), a 0-d tensor.

        The global batch is every rank's n pairs (B = W n); this rank's anchors (image and text)
        meet all gathered columns (with gradient), so the mean over ranks of the loss is the
        single-process loss of the global batch (same draws: rank 0's, broadcast) and each rank's
        feature gradient is W x that loss's gradient for its rows (open_clip's local_loss +
        gather_with_grad; DDP's average gives the global gradient). The state is updated from
        every rank's (index, log Zhat), so it stays identical on every rank. Eager: one host sync
        for the index check (range, and for update="after" whether every sample was seen).
        Compiled: no host sync (docs/gamma.md)."""
        scale, name, idx = self._agree(image_features, text_features, logit_scale, index, world)
        rates = self._rates
        n = image_features.shape[0]
        total, off = world.size * n, world.rank * n
        log_m = math.log(total - 1)
        log_w = self._log_weights(total, image_features, world)[:, off : off + n]
        acc = log_w.dtype
        local = self.grad_comm == "local" and world.size > 1  # no feature-gradient collective
        all_image = world.gather(image_features, with_grad=not local)
        all_text = world.gather(text_features, with_grad=not local)
        feats = (image_features, text_features, all_image, all_text)  # local rows, every rank's
        valid = _valid_estimates(*feats, off, scale)
        if idx.bad is not None:  # compiled, out-of-range index: store nothing
            valid = valid & ~idx.bad
        pos = _pos_logits(image_features, text_features, scale)

        if not self._one_pass():  # LSE pass (simlse fwd) -> rates -> gradient pass (simlse bwd)
            row, col = (SS.neg_lse_local if local else _neg_lse)(*feats, scale, off, world, name)
            log_zhat = _log_zhat(row, col, valid, log_m)
            log_r = log_zhat if self.rate == "batch" else rates.update(idx, log_zhat, world)
            neg = _neg_two_pass(row, col, log_w, log_r, log_m)
            path = "two_pass"
        else:
            stored, seen, idx = rates.lookup(idx, world)  # owner: one all-reduce, all_seen
            stored = stored.to(acc)
            log_zhat = None
            if self.rate == "fixed" or idx.all_seen:  # (all_seen is None when compiled: unknown)
                log_r = stored
                path = "one_pass"
            else:  # first visits need this batch's Zhat before the weights exist
                with torch.no_grad():
                    r0, c0 = _neg_lse(
                        *(t.detach() for t in feats), scale.detach(), off, world, name
                    )
                log_zhat = _log_zhat(r0, c0, valid, log_m)
                log_r = torch.where(seen, stored, log_zhat)
                path = "lse+one_pass"
            neg, row, col = (SS.neg_one_pass_local if local else _neg_one_pass)(
                *feats, scale, log_w, log_r, log_m, self.clamp, off, world, name
            )
            if self.rate == "ema":  # update after use
                if log_zhat is None or idx.all_seen is None:
                    one = _log_zhat(row, col, valid, log_m)
                    # eager: every sample seen -> the one-pass statistics, else the LSE pass's;
                    # compiled: the same choice, made on the device
                    log_zhat = one if log_zhat is None else torch.where(seen.all(), one, log_zhat)
                rates.update(idx, log_zhat, world, want=False)
        out = neg - pos.mean()
        estimate = 0.5 * log_r.mean(dim=1).sum() - pos.mean()
        if idx.bad is not None:  # compiled: an out-of-range index poisons the loss and every grad
            poison = torch.where(idx.bad, float("nan"), 1.0).to(out.dtype)
            out, estimate = out * poison, estimate * poison
        if self.temperature == "rgcl":  # q_i = sum_j w_ij = e^{alpha_i + row_i}: temperature.py
            q = torch.exp((log_w - log_r).detach() - log_m + torch.stack([row, col]).detach())
            out = rgcl_output(out, estimate, scale, pos, q, self.rho)
            estimate = (estimate.detach() + self.rho) / scale.detach()  # F: the value returned
        self.global_loss_estimate = estimate.detach()
        self.last_path = path
        return out

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: float | torch.Tensor | None,
        index: torch.Tensor | None,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        step = type(self)._step if self.temperature != "individual" else type(self)._individual_step
        loss = estimate_valued_step(
            self, step, image_features, text_features, logit_scale, index, self._world()
        )
        return {"contrastive_loss": loss} if output_dict else loss


class SogCLRLoss(GammaClipLoss):
    """SogCLR (Yuan et al., ICML 2022; docs/math.md §S) for the objective G of gammacl.gamma: the
    mean E-step of GammaClipLoss, u_i = 1/R_i, with the same per-sample moving-average state.
    SogCLR's code scales the loss by tau = 1/logit_scale: temperature="rgcl" (FastCLIP-v3) does,
    and learns tau. `**options`: GammaClipLoss's temperature, schedule and scale-out keywords;
    the rest (update, state_dict, index checks, non-finite guard) is GammaClipLoss's too.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        ema: float = 0.5,
        update: str = "before",
        backend: str = "auto",
        clamp: float | None = None,
        distributed: bool | None = None,
        process_group=None,
        **options: Any,
    ) -> None:
        super().__init__(
            num_samples,
            shape=1.0,
            rate="ema",
            ema=ema,
            update=update,
            backend=backend,
            clamp=clamp,
            distributed=distributed,
            process_group=process_group,
            **options,
        )
        self._mean_estep = True

    def extra_repr(self) -> str:
        return super().extra_repr().replace(f"shape={self.shape}, rate='ema', ", "")
