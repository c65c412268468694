"""The gamma-weighted decomposable contrastive loss (stochastic EM, docs/math.md §A.2-A.5), its
per-sample partition-function state, and SogCLR (docs/math.md §S) as its mean-E-step special case.

Objective (fixed; the "global" symmetric contrastive loss, positive EXCLUDED from the
denominator, l = logit_scale * s, s_ij = <image_i, text_j>):
    G = 1/2 mean_i [-l_ii + log Z_i] + 1/2 mean_j [-l_jj + log Z^T_j],
    Z_i = mean_{j != i} e^{l_ij} over the whole data set (Z^T_j: over images, for text j).
A minibatch estimate of log Z_i has an O(1/B) bias that moves the minimiser (docs/math.md §A.2). The
gamma identity 1/Z = E[G]/Z, G ~ Gamma(a, 1) / a, makes the loss linear in Z (decomposable): with
in-batch Zhat_i = mean over the B - 1 in-batch negatives (unbiased for Z_i),
    loss = 1/2 mean_i [-l_ii + u_i Zhat_i] + 1/2 mean_j [-l_jj + v_j Zhat^T_j],  u_i = G_i / (a R_i)
G_i drawn once per step per anchor per direction, R_i the rate estimate of Z_i; u carries no
gradient (E-step), so E[grad] = grad G when R = Z, for any batch size.
    dloss/dl_ij = 1/(2B) (e^{l_ij + alpha_i} + e^{l_ij + alpha^T_j}),  i != j;  -1/B on i == j
    alpha_i = log(G_i / a) - log R_i - log(B - 1)
Draws are normalised by a (mean 1): for a = 1 this is exactly u = G / R with G ~ Exponential(1);
for other a it is the augmented loss -a l_ii + u Z, u ~ Gamma(a, rate Z) (docs/math.md §A.3),
divided by a (the same minimiser; without the 1/a the step would follow -l_ii + a log Z
instead). The shape a only sets the noise: Var(G/a) = 1/a. SogCLR replaces the draw by its mean
(u = 1/R).

Rates (`rate=`):
  "ema"   per-sample state log R (fp32, one table per direction, indexed by the data-set index,
          on the features' device). First visit: log R_k = log Zhat; later visits:
              log R_k <- logaddexp(log(1 - ema) + log R_k, log(ema) + log Zhat)
          (ema is the weight of the new batch estimate; ema = 1 is the plain batch estimate).
          update="before": update with this batch, then use (SogCLR's order). Then
              u_i Zhat_i <= G_i / (a ema)        (docs/math.md §K.1: R_i >= ema Zhat_i)
          so every weight is bounded and no clamp is needed. Two passes (8MND FLOPs): the
          excluded-positive LSEs (simlse), the state update, then simlse's backward with weights
          e^{l_ij + alpha_i}.
          update="after": use the stored rate (this batch's Zhat on a first visit), then update.
          The weights need no batch normaliser, so loss and gradient come out of ONE sweep
          (gamma_onepass, 6MND FLOPs). A stale rate is unbounded, so every exponent is capped:
          e^{min(l_ij + alpha_i, clamp)}, clamp = 30 by default (weights <= 1e13; the gradient
          keeps the capped weight). A batch that contains first visits first runs an LSE-only
          pass (2MND) to get their Zhat.
  "batch" no state: R = this batch's Zhat (biased, docs/math.md §A.4 R1); two passes.
  "fixed" user-supplied log-rates per sample (set_log_rates; e.g. exact rates in a toy); never
          updated; one pass with the cap.

Caveats. With a learnable logit_scale the stored log R was computed at an older scale (SogCLR
accepts the same staleness). The loss value is a random surrogate, not comparable with
InfoNCE; `global_loss_estimate` (set by every forward, detached) holds
1/2 mean(-l_ii + log R_i) + 1/2 mean(-l_jj + log R^T_j) with the rates this step used.
Eager forwards check the index values (range, and for update="after" whether every sample was
seen): one host sync per step, as gammacl's labels check does. Duplicate indices in one batch
each read the state as it was before the batch; the last finite occurrence is stored.
A row whose log Zhat is non-finite, or rests on a non-finite feature or logit_scale, leaves its
state untouched and is counted in `nonfinite` of each LogRateState (other rows of the batch are
stored as usual: image anchor i's Zhat uses image_i and the other texts only).
B = 1 has no in-batch negative: ValueError.
Every forward updates the state, in train and eval mode and under torch.no_grad() alike (the
state is training data, not a parameter): evaluate with gammacl.ClipLoss / clip_loss (the gamma
loss value is a random surrogate anyway), or snapshot state_dict() and restore it afterwards.

torch.compile (fullgraph=True, no graph break, no host sync in the graph). Under
torch.compiler.is_compiling() the forward takes a sync-free form with the eager results (up to
the compiler's floating-point reassociation; the fp32 state came out bitwise equal in tests):
  * the index is trusted on the host: an out-of-range value makes the step's loss (and so every
    gradient) NaN and leaves the whole batch unstored (each row counted in `nonfinite`); reads
    and writes use the index clamped into [0, num_samples), so no kernel ever goes out of bounds;
  * update="after" always runs the LSE pass (2MND, so 8MND per step like update="before"): the
    first-visit rows take its Zhat by a device-side torch.where, and the state update takes the
    one-pass statistics when every sample was seen, else the LSE pass's (torch.where on the
    device-side "all seen" flag), exactly the eager choice; last_path is "lse+one_pass";
  * draws go through the opaque op gammacl::draw, which draws from the module's own generator (or
    the global RNG) at run time, so compiled and eager runs consume the same random stream
    (a CPU generator with CUDA features copies the [2, B] draws to the device each step, a
    blocking copy; a generator on the features' device avoids it).
The state buffers are mutated in place (dynamo functionalises the module-buffer mutation).
Determinism: with torch.use_deterministic_algorithms(True) repeated steps are meant to be bitwise
reproducible on every backend (the Triton one-pass kernel then takes its atomic-free path);
tested on CPU (torch, cpp, triton under the interpreter), not measured on GPU.
"""

from __future__ import annotations

import math
import weakref
from numbers import Real

import torch
from torch import nn

from gammacl import _validate as V
from gammacl.dispatch import BACKENDS, resolve_backend
from gammacl.functional import _pos_logits
from gammacl.ops.gamma_onepass import DEFAULT_CLAMP, gamma_onepass
from gammacl.ops.simlse import simlse

RATES = ("ema", "batch", "fixed")
UPDATES = ("before", "after")


@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device: torch.device) -> str:
    """resolve_backend, evaluated once when a graph is traced (as the ops do): dynamo does not
    trace the environment / extension probing (also used by gammacl.modality)."""
    return resolve_backend(backend, device)


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
_GENERATORS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _register_generator(generator: torch.Generator | None) -> None:
    if generator is not None:
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


def _check_index_tensor(index: object, batch: int | None) -> torch.Tensor:
    if not isinstance(index, torch.Tensor):
        raise TypeError(
            f"index must be an int64 tensor of data-set indices, got {type(index).__name__}"
        )
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
        index = _check_index_tensor(index, None).to(self.log_rate.device, torch.int64)
        if check and index.numel() and not torch.compiler.is_compiling():  # compiled: trusted
            lo, hi = torch.stack([index.min(), index.max()]).tolist()  # one host sync
            if lo < 0 or hi >= self.num_samples:
                raise _range_error(self.num_samples, lo, hi)
        return index

    def lookup(
        self, index: torch.Tensor, *, check: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_rate[index], visited[index])."""
        index = self._index(index, check)
        return self.log_rate[index], self.visited[index]

    @torch.no_grad()
    def update(
        self, index: torch.Tensor, log_zhat: torch.Tensor, *, check: bool = True
    ) -> torch.Tensor:
        """Applies the EMA rule for positions `index` with batch estimates `log_zhat` (same
        length) and returns the updated log-rates per position (in log_zhat's dtype, computed
        from the state as it was before this call: the "update before use" rates)."""
        index = self._index(index, check)
        if not isinstance(log_zhat, torch.Tensor) or log_zhat.shape != index.shape:
            raise ValueError(
                f"log_zhat must be a tensor of shape {tuple(index.shape)}, got "
                f"{getattr(log_zhat, 'shape', type(log_zhat))}"
            )
        lz = log_zhat.detach().to(self.log_rate.device)
        if not lz.dtype.is_floating_point:
            raise TypeError(f"log_zhat must be floating point, got {lz.dtype}")
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
        if not isinstance(log_rate, torch.Tensor) or log_rate.shape != (self.num_samples,):
            raise ValueError(
                f"log-rates must be a tensor of shape ({self.num_samples},), got "
                f"{getattr(log_rate, 'shape', type(log_rate))}"
            )
        if not bool(torch.isfinite(log_rate).all()):
            raise ValueError("log-rates must be finite")
        self.log_rate.copy_(log_rate.detach())
        self.visited.fill_(True)


def _valid_estimates(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[2, B] mask of the log Zhat that rest on finite inputs only: image anchor i needs image_i
    and every text_j (j != i) finite, text anchor j likewise. Rows outside it are never stored,
    whatever a backend makes of a NaN (O(BD) work, no host sync)."""
    bad_i = ~torch.isfinite(image).all(dim=1)
    bad_t = ~torch.isfinite(text).all(dim=1)
    row_ok = ~bad_i & (bad_t.sum() - bad_t.long() == 0)
    col_ok = ~bad_t & (bad_i.sum() - bad_i.long() == 0)
    return torch.stack([row_ok, col_ok]) & torch.isfinite(scale.detach())


def _batch_log_zhat(row, col, image, text, scale, log_m) -> torch.Tensor:
    """This batch's log Zhat [2, B] from the excluded-positive LSEs (detached), NaN where it rests
    on a non-finite input (so the state never stores it)."""
    log_zhat = torch.stack([row, col]).detach() - log_m
    return torch.where(_valid_estimates(image, text, scale), log_zhat, float("nan"))


def _neg_two_pass(row, col, log_w, log_r, log_m):
    """1/2 mean_i u_i Zhat_i + 1/2 mean_j v_j Zhat^T_j with Zhat from the excluded-positive LSEs
    (row, col carry simlse's autograd): u_i Zhat_i = exp(alpha_i + row_i), so simlse's backward
    forms exactly the weights e^{l_ij + alpha_i}, alpha = log_w - log_r - log(B - 1)."""
    alpha = (log_w - log_r).detach() - log_m
    return 0.5 * torch.exp(alpha + torch.stack([row, col])).mean(dim=1).sum()


def _neg_one_pass(image, text, scale, log_w, log_r, log_m, clamp, backend):
    b = image.shape[0]
    alpha = (log_w - log_r).detach() - log_m
    neg, row, col, _, _ = gamma_onepass(
        image,
        text,
        scale,
        alpha[0],
        alpha[1],
        w_row=0.5 / b,
        w_col=0.5 / b,
        clamp=clamp,
        backend=backend,
    )
    return neg, row, col


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
    name = _resolve_backend(backend, image_features.device)
    log_m = math.log(b - 1)
    pos = _pos_logits(image_features, text_features, scale)
    if one_pass:
        neg = _neg_one_pass(image_features, text_features, scale, log_w, log_r, log_m, clamp, name)[
            0
        ]
    else:
        row, col = simlse(image_features, text_features, scale, exclude_pos=True, backend=name)
        neg = _neg_two_pass(row, col, log_w, log_r, log_m)
    return neg - pos.mean()


class GammaClipLoss(_GeneratorAttr, nn.Module):
    """Gamma-weighted decomposable symmetric contrastive loss with per-sample rate state
    (stochastic EM; see the module docstring of gammacl.gamma for the objective, the estimator
    and the numerics).

    Args:
        num_samples: data-set size n; `index` values lie in [0, n).
        shape: Gamma shape a > 0 (a = 1: Exponential). Draws are normalised to mean 1.
        rate: "ema" (per-sample moving average, default), "batch" (no state) or "fixed"
            (set_log_rates).
        ema: weight of the new batch estimate in the moving average, 0 < ema <= 1.
        update: "before" (update, then use; bounded weights; two passes) or "after" (use the
            stored rate, then update; one fused pass, exponents capped at `clamp`).
        generator: torch.Generator for the draws (reproducible runs); its state is saved in
            state_dict() so a checkpoint resumes the same draws.
        backend: "auto", "torch", "cpp", "triton", "cuda" or "reference".
        clamp: exponent cap of the one-pass path (default 30).
        distributed: None (default): use gammacl.distributed.gamma_loss_distributed whenever
            torch.distributed is initialised with more than one rank (in `process_group`, default
            the world): every rank passes its own pairs and their global data-set indices; the
            state is updated from all ranks' rows and stays identical everywhere (save it from
            any rank), rank 0's draws are broadcast. True: always; False: never (each rank keeps
            its own state and sees only its own batch).
        process_group: the torch.distributed group for distributed use (default: the world).
    forward(image_features, text_features, logit_scale, index, output_dict=False) returns the
    0-d loss (fp32; fp64 for fp64 features) or {"contrastive_loss": loss}; `index` [B] holds each
    pair's data-set index (int64; may be None for rate="batch").
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shape: float = 1.0,
        rate: str = "ema",
        ema: float = 0.1,
        update: str = "before",
        generator: torch.Generator | None = None,
        backend: str = "auto",
        clamp: float = DEFAULT_CLAMP,
        distributed: bool | None = None,
        process_group=None,
    ) -> None:
        super().__init__()
        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be None (auto), True or False, got {distributed!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if (
            isinstance(shape, bool)
            or not isinstance(shape, Real)
            or not math.isfinite(float(shape))
            or float(shape) <= 0
        ):
            raise ValueError(
                f"shape (the Gamma shape a) must be a finite number > 0, got {shape!r}"
            )
        if rate not in RATES:
            raise ValueError(f"rate must be one of {RATES}, got {rate!r}")
        if isinstance(ema, bool) or not isinstance(ema, Real) or not 0.0 < float(ema) <= 1.0:
            raise ValueError(
                f"ema (weight of the new batch estimate) must be in (0, 1], got {ema!r}"
            )
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if (
            isinstance(clamp, bool)
            or not isinstance(clamp, Real)
            or not math.isfinite(float(clamp))
            or float(clamp) <= 0
        ):
            raise ValueError(f"clamp must be a finite number > 0, got {clamp!r}")
        self.num_samples = num_samples
        self.shape = float(shape)
        self.rate = rate
        self.ema = float(ema)
        self.update = update
        self.generator = generator
        self.backend = backend
        self.clamp = float(clamp)
        self.distributed = distributed
        self.process_group = process_group
        self._mean_estep = False  # SogCLR: u = 1/R instead of a draw
        self.image_rate = LogRateState(num_samples, self.ema) if rate != "batch" else None
        self.text_rate = LogRateState(num_samples, self.ema) if rate != "batch" else None
        self._fixed_set = False
        self.last_path: str | None = None  # "two_pass", "one_pass" or "lse+one_pass"
        self.global_loss_estimate: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, shape={self.shape}, rate={self.rate!r}, "
            f"ema={self.ema}, update={self.update!r}, backend={self.backend!r}"
        )

    # -- state ---------------------------------------------------------------------------------
    def _states(self, device: torch.device) -> tuple[LogRateState, LogRateState]:
        if self.image_rate.log_rate.device != device:
            self.image_rate.to(device)
            self.text_rate.to(device)
        return self.image_rate, self.text_rate

    def update_state(
        self, index: torch.Tensor, log_zhat_image: torch.Tensor, log_zhat_text: torch.Tensor
    ) -> None:
        """Applies the rate update for (possibly gathered) indices and batch log Zhat of both
        directions; what forward does after (or before) use."""
        if self.rate != "ema":
            raise RuntimeError(f"update_state needs rate='ema', this loss has rate={self.rate!r}")
        self.image_rate.update(index, log_zhat_image)
        self.text_rate.update(index, log_zhat_text, check=False)

    def set_log_rates(self, image_log_rate: torch.Tensor, text_log_rate: torch.Tensor) -> None:
        """rate="fixed": the log-rates log R of every sample, per direction, [num_samples]."""
        if self.rate != "fixed":
            raise RuntimeError(
                f"set_log_rates needs rate='fixed', this loss has rate={self.rate!r}"
            )
        self.image_rate.set_log_rates(image_log_rate)
        self.text_rate.set_log_rates(text_log_rate)
        self._fixed_set = True

    def get_extra_state(self) -> dict:
        gen = self.generator.get_state() if self.generator is not None else None
        return {"generator_state": gen, "fixed_set": self._fixed_set}

    def set_extra_state(self, state: dict) -> None:
        if state.get("generator_state") is not None and self.generator is not None:
            self.generator.set_state(state["generator_state"])
        self._fixed_set = bool(state.get("fixed_set", self._fixed_set))

    # -- one step ------------------------------------------------------------------------------
    def _check_index(self, index, b: int, device: torch.device, want_seen: bool):
        """(index, all_seen, bad). Eager: the validated int64 index on `device`, whether every
        sample in it was visited in both directions (want_seen; one host sync for both), bad =
        None. Compiled (no host sync): the index clamped into range, all_seen = None (unknown
        on the host), bad = 0-d device bool "some index was out of range"."""
        if index is None and self.rate == "batch":
            return None, True, None
        index = _check_index_tensor(index, b).to(device=device, dtype=torch.int64)
        if torch.compiler.is_compiling():
            bad = ((index < 0) | (index >= self.num_samples)).any()
            return index.clamp(0, self.num_samples - 1), None, bad
        stats = [index.min(), index.max()]
        if want_seen:
            safe = index.clamp(0, self.num_samples - 1)
            img, txt = self._states(device)
            stats.append((img.visited[safe] & txt.visited[safe]).all().long())
        vals = torch.stack(stats).tolist()
        if vals[0] < 0 or vals[1] >= self.num_samples:
            raise _range_error(self.num_samples, vals[0], vals[1])
        return index, bool(vals[2]) if want_seen else True, None

    def _log_weights(self, b: int, like: torch.Tensor) -> torch.Tensor:
        acc = V.acc_dtype(like.dtype)
        if self._mean_estep:
            return torch.zeros(2, b, dtype=acc, device=like.device)
        # draw_log_weights(shape, b, generator, device).to(acc), as an opaque op (see _draw_op)
        return _draw_op("log_gamma", self.shape, b, self._generator_key(), like.device, acc)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: float | torch.Tensor,
        index: torch.Tensor | None,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.distributed is not False:
            from gammacl import distributed as D

            if self.distributed or D.is_distributed(self.process_group):
                loss = D.gamma_loss_distributed(
                    self,
                    image_features,
                    text_features,
                    logit_scale,
                    index,
                    group=self.process_group,
                )
                return {"contrastive_loss": loss} if output_dict else loss
        V.check_pair(
            "image_features", image_features, "text_features", text_features, same_batch=True
        )
        b = image_features.shape[0]
        if b < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 pairs per batch (B - 1 "
                f"in-batch negatives per anchor), got B = {b}"
            )
        scale = V.as_scale("logit_scale", logit_scale, image_features)
        dev = image_features.device
        name = _resolve_backend(self.backend, dev)
        if self.rate == "fixed" and not self._fixed_set:
            raise RuntimeError(
                "rate='fixed' needs set_log_rates(image_log_rate, text_log_rate) "
                "before the first forward"
            )
        one_pass = self.rate == "fixed" or (self.rate == "ema" and self.update == "after")
        index, all_seen, bad = self._check_index(
            index, b, dev, want_seen=self.rate == "ema" and one_pass
        )
        states = self._states(dev) if self.rate != "batch" else None
        log_w = self._log_weights(b, image_features)
        log_m = math.log(b - 1)
        acc = log_w.dtype
        pos = _pos_logits(image_features, text_features, scale)

        if not one_pass:  # LSE pass (simlse fwd) -> rates -> gradient pass (simlse bwd)
            row, col = simlse(image_features, text_features, scale, exclude_pos=True, backend=name)
            log_zhat = _batch_log_zhat(row, col, image_features, text_features, scale, log_m)
            if bad is not None:  # compiled, out-of-range index: store nothing
                log_zhat = torch.where(bad, float("nan"), log_zhat)
            if self.rate == "batch":
                log_r = log_zhat
            else:
                log_r = torch.stack(
                    [s.update(index, log_zhat[d], check=False) for d, s in enumerate(states)]
                )
            neg = _neg_two_pass(row, col, log_w, log_r, log_m)
            self.last_path = "two_pass"
        else:
            stored = torch.stack([s.log_rate[index] for s in states]).to(acc)
            log_zhat = seen = None
            if self.rate == "fixed" or all_seen:  # (all_seen is None when compiled: unknown)
                log_r = stored
                self.last_path = "one_pass"
            else:  # first visits need this batch's Zhat before the weights exist
                with torch.no_grad():
                    row, col = simlse(
                        image_features.detach(),
                        text_features.detach(),
                        scale.detach(),
                        exclude_pos=True,
                        backend=name,
                    )
                log_zhat = _batch_log_zhat(row, col, image_features, text_features, scale, log_m)
                seen = torch.stack([s.visited[index] for s in states])
                log_r = torch.where(seen, stored, log_zhat)
                self.last_path = "lse+one_pass"
            neg, row, col = _neg_one_pass(
                image_features, text_features, scale, log_w, log_r, log_m, self.clamp, name
            )
            if self.rate == "ema":  # update after use
                if log_zhat is None or all_seen is None:
                    one = _batch_log_zhat(row, col, image_features, text_features, scale, log_m)
                    # eager: every sample seen -> the one-pass statistics, else the LSE pass's;
                    # compiled: the same choice, made on the device
                    log_zhat = one if log_zhat is None else torch.where(seen.all(), one, log_zhat)
                if bad is not None:  # compiled, out-of-range index: store nothing
                    log_zhat = torch.where(bad, float("nan"), log_zhat)
                for d, s in enumerate(states):
                    s.update(index, log_zhat[d], check=False)
        loss = neg - pos.mean()
        estimate = 0.5 * log_r.mean(dim=1).sum() - pos.mean()
        if bad is not None:  # compiled: an out-of-range index poisons the loss and every grad
            poison = torch.where(bad, float("nan"), 1.0).to(loss.dtype)
            loss, estimate = loss * poison, estimate * poison
        self.global_loss_estimate = estimate.detach()
        return {"contrastive_loss": loss} if output_dict else loss


class SogCLRLoss(GammaClipLoss):
    """SogCLR (Yuan et al., ICML 2022; docs/math.md §S) for the objective G of gammacl.gamma: the
    mean E-step of GammaClipLoss, u_i = 1/R_i, with the same per-sample moving-average state.

    SogCLR's own code multiplies the loss by the temperature tau = 1/logit_scale (a learning
    rate rescaling) and, in some versions, sums rather than averages the two directions; this
    class follows G exactly. update="before" (default) is SogCLR's order; update="after" runs the
    fused one-pass path (GammaClipLoss). Everything else (state_dict, update_state, index
    checks, the non-finite guard) is GammaClipLoss's.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        ema: float = 0.1,
        update: str = "before",
        backend: str = "auto",
        clamp: float = DEFAULT_CLAMP,
        distributed: bool | None = None,
        process_group=None,
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
        )
        self._mean_estep = True

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, ema={self.ema}, update={self.update!r}, "
            f"backend={self.backend!r}"
        )
