"""Learnable temperature and the inner-rate schedule of GammaClipLoss / SogCLRLoss (issue 24).

Notation of gammacl.gamma: s_ij = <image_i, text_j>, l_ij = s_ij / tau, R_i the anchor's rate
(moving average of Zhat_i = mean_{j != i} e^{l_ij}, positive outside), G the global objective.
FastCLIP's / LibAUC's rate u_i = mean_{j != i} e^{(s_ij - s_ii)/tau} is ours times e^{-l_ii}:
    log u_i = log R_i - l_ii.

temperature="rgcl" (FastCLIP-v3 / LibAUC "global_learnable"; robust global contrastive loss)
    F(w, tau) = tau Ghat + tau rho,   tau = 1/logit_scale,
    Ghat = 1/2 mean_i log u_i + 1/2 mean_j log u'_j   (the step's rates: global_loss_estimate).
  The features get tau x the surrogate's gradient (gamma.py), logit_scale s gets
    dF/ds = -tau^2 (Ghat + rho) + tau 1/2 sum_dir mean_i sum_{j != i} w_ij (c_ij - c_ii)
  with c = s_ij (cosine), w_ij = e^{l_ij + alpha_i} the surrogate's weights (SogCLR: e^{l_ij} /
  ((B - 1) R_i)). Per anchor, in tau: dF_i/dtau = log u_i + rho - sum_j w_ij (l_ij - l_ii), which
  is FastCLIP-v3's estimator (its positive enters through h_ij = s_ij - s_ii, so with a stale rate
  its coefficient is q_i = sum_j w_ij, not 1). At ema = 1 (R = Zhat, q = 1) it is the exact
  gradient of tau (G_batch + rho). rho >= 0: tau falls while the weights' KL divergence from
  uniform is below rho (the DRO radius), and rises above it.

temperature="individual" (iSogCLR; FastCLIP-v2 / LibAUC "individual_learnable")
  a temperature per sample and direction, buffers image_tau / text_tau [num_samples] fp32:
    image anchor i: l_ij = s_ij / tau_i;   text anchor j: l'_ji = s_ij / tau'_j.
  Features: the gradient of 1/2 mean_i tau_i log u_i + 1/2 mean_j tau'_j log u'_j with tau at its
  value before this step's update, i.e. of the surrogate 1/2 mean_i [-s_ii + tau_i Zhat_i / R_i]
  + (text), rates R updated with this step's Zhat (update "before"). After the rates:
    g_i = log u_i + rho - sum_j w_ij (l_ij - l_ii)          (LibAUC's grad_tau, w as above)
        = log R_i - l_ii + rho - q_i (E_p[l_i.] - l_ii),    q_i = Zhat_i / R_i,
    E_p[l_i.] = softmax-over-negatives mean of l_i. (simlse's vector-scale gradient / tau_i);
    m_i <- (1 - beta) m_i + beta g_i;   tau_i <- clip(tau_i - eta m_i, tau_min, tau_max).
  At ema = 1, q = 1 and g_i = log u_i - E_p[h_i] / tau_i + rho, h_ij = s_ij - s_ii.

ema_schedule (LibAUC's adjust_gamma; `set_epoch(epoch)`): "constant": ema = 1 in epoch 0, then
ema; "cosine": ema_e = ema + (1 - ema) (1 + cos(pi e / E)) / 2 for e < E, then ema.
"""

from __future__ import annotations

import math

import torch

from gammacl import _validate as V
from gammacl._local_grad import local_pair_lse, mean_dots
from gammacl.dispatch import resolve_traced
from gammacl.ops.simlse import simlse

TEMPERATURES = ("input", "rgcl", "individual")
EMA_SCHEDULES = ("constant", "cosine")
_TEMPERATURE_CODES = {name: k for k, name in enumerate(TEMPERATURES)}


def scheduled_ema(schedule: str, ema: float, decay_epochs: int | None, epoch: int) -> float:
    """The inner-rate weight in force in `epoch` (LibAUC 2.0.1 GCLoss_v2.adjust_gamma)."""
    if schedule == "constant":
        return 1.0 if epoch == 0 else ema
    if epoch < decay_epochs:
        return (1.0 - ema) * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs)) + ema
    return ema


def check_schedule(schedule: object, decay_epochs: object) -> None:
    if schedule not in EMA_SCHEDULES:
        raise ValueError(f"ema_schedule must be one of {EMA_SCHEDULES}, got {schedule!r}")
    if schedule == "cosine" and (
        isinstance(decay_epochs, bool) or not isinstance(decay_epochs, int) or decay_epochs < 1
    ):
        raise ValueError(
            f"ema_schedule='cosine' needs ema_decay_epochs, an int >= 1, got {decay_epochs!r}"
        )


def check_temperature_args(
    temperature: object,
    rho: object,
    tau_init: object,
    tau_min: object,
    tau_max: object,
    tau_lr: object,
    tau_momentum: object,
) -> None:
    if temperature not in TEMPERATURES:
        raise ValueError(f"temperature must be one of {TEMPERATURES}, got {temperature!r}")
    for name, v in (
        ("rho", rho),
        ("tau_init", tau_init),
        ("tau_min", tau_min),
        ("tau_max", tau_max),
        ("tau_lr", tau_lr),
        ("tau_momentum", tau_momentum),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if rho < 0:
        raise ValueError(f"rho (the DRO radius) must be >= 0, got {rho!r}")
    if not 0 < tau_min <= tau_init <= tau_max:
        raise ValueError(
            "need 0 < tau_min <= tau_init <= tau_max, got "
            f"tau_min={tau_min!r}, tau_init={tau_init!r}, tau_max={tau_max!r}"
        )
    if tau_lr < 0:
        raise ValueError(f"tau_lr must be >= 0, got {tau_lr!r}")
    if not 0 < tau_momentum <= 1:
        raise ValueError(
            f"tau_momentum (weight of the new gradient) must be in (0, 1], got {tau_momentum!r}"
        )


def rgcl_output(
    out: torch.Tensor,
    estimate: torch.Tensor,
    scale: torch.Tensor,
    pos: torch.Tensor,
    q: torch.Tensor,
    rho: float,
) -> torch.Tensor:
    """F = tau (Ghat + rho) as the value; d/dfeatures = tau d(out)/dfeatures; d/ds = dF/ds of the
    module docstring. out: the surrogate (its s-gradient is 1/2 sum_dir mean_i [q_i E_p[c_i.]]
    - mean_i c_ii); estimate: Ghat; pos: l_ii [n]; q: [2, n] sum_j w_ij per anchor (detached).
    The correction added to tau d(out)/ds is tau mean_i c_ii (1 - qbar_i) - tau^2 (Ghat + rho),
    qbar = mean over the two directions, carried by a zero-valued term linear in s."""
    s = scale.detach()
    tau = 1.0 / s
    est = estimate.detach()
    cos_pos = pos.detach() / s
    coef = tau * (cos_pos * (1.0 - q.detach().mean(dim=0))).mean() - tau * tau * (est + rho)
    scaled = tau * out
    value = tau * (est + rho)
    return scaled + coef * (scale - s) + (value - scaled).detach()


def momentum_step(
    tau: torch.Tensor,
    momentum: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    beta: float,
    lo: float,
    hi: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """m <- (1 - beta) m + beta g;  tau <- clip(tau - lr m, lo, hi)  (LibAUC's iSogCLR step)."""
    m = (1.0 - beta) * momentum + beta * grad
    return (tau - lr * m).clamp(lo, hi), m


class TemperatureMixin:
    """temperature= and ema_schedule= of GammaClipLoss / SogCLRLoss (module docstring): the
    options, the per-sample temperature buffers ("individual") and set_epoch. The host class
    has `ema` and the rate states `image_rate` / `text_rate` (each with its own `ema`)."""

    def init_temperature(
        self,
        *,
        temperature: str = "input",
        rho: float = 1.0,
        tau_init: float = 0.07,
        tau_min: float = 0.01,
        tau_max: float = 1.0,
        tau_lr: float = 0.003,
        tau_momentum: float = 0.9,
        ema_schedule: str = "constant",
        ema_decay_epochs: int | None = None,
    ) -> None:
        """temperature: "input" (logit_scale as given), "rgcl" (F = tau Ghat + tau rho, tau =
        1/logit_scale learnt by the caller's optimiser through dF/ds), "individual" (per-sample
        image_tau / text_tau, learnt inside forward; forward takes logit_scale=None). rho >= 0:
        the DRO radius of both. tau_init, tau_min, tau_max, tau_lr (eta), tau_momentum (beta,
        weight of the new gradient): "individual" only. ema_schedule "constant" | "cosine" and
        ema_decay_epochs (cosine: epochs from 1 down to ema): set_epoch (module docstring)."""
        check_temperature_args(temperature, rho, tau_init, tau_min, tau_max, tau_lr, tau_momentum)
        self.temperature = temperature
        self.rho = float(rho)
        self.tau_init, self.tau_min, self.tau_max = float(tau_init), float(tau_min), float(tau_max)
        self.tau_lr, self.tau_momentum = float(tau_lr), float(tau_momentum)
        if temperature == "individual":
            if self.rate != "ema" or self.update != "before":
                raise ValueError(
                    "temperature='individual' needs rate='ema' and update='before', got "
                    f"rate={self.rate!r}, update={self.update!r}"
                )
            n = self.num_samples
            for d in ("image", "text"):
                self.register_buffer(
                    f"{d}_tau", torch.full((n,), self.tau_init, dtype=torch.float32)
                )
                self.register_buffer(f"{d}_tau_momentum", torch.zeros(n, dtype=torch.float32))
        self.init_schedule(ema_schedule, ema_decay_epochs)

    def init_schedule(self, ema_schedule: str, ema_decay_epochs: int | None) -> None:
        check_schedule(ema_schedule, ema_decay_epochs)
        self.ema_schedule, self.ema_decay_epochs = ema_schedule, ema_decay_epochs
        self.ema_final = self.ema  # the constructor's ema: in force until set_epoch is called
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Sets `ema` (and the rate states' ema) to the schedule's value in `epoch` (0-based;
        LibAUC's adjust_gamma). Call it at the start of every epoch, on every rank."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch
        ema = scheduled_ema(self.ema_schedule, self.ema_final, self.ema_decay_epochs, epoch)
        self.ema = ema
        for st in (self.image_rate, self.text_rate):
            if st is not None:
                st.ema = ema

    def _individual_step(self, image_features, text_features, logit_scale, index, world):
        return individual_step(self, image_features, text_features, logit_scale, index, world)

    def temperature_flags(self) -> list[tuple[str, int]]:
        """What every rank must agree on (distributed check)."""
        return [
            ("temperature", _TEMPERATURE_CODES[self.temperature]),
            ("ema_1e9", round(self.ema * 1e9)),
        ]


def _tau_rows(loss, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[2, n] (image_tau[index], text_tau[index]) in the accumulation dtype on like's device."""
    for name in ("image_tau", "text_tau", "image_tau_momentum", "text_tau_momentum"):
        buf = getattr(loss, name)
        if buf.device != like.device:
            setattr(loss, name, buf.to(like.device))
    acc = V.acc_dtype(like.dtype)
    return torch.stack([loss.image_tau[index], loss.text_tau[index]]).to(acc)


@torch.no_grad()
def _tau_update(loss, index, tau, log_r, l_pos, mean_l, q, world) -> None:
    """g = log R - l_ii + rho - q (E_p[l] - l_ii) per anchor [2, n] (module docstring), the
    momentum step, and the write of every rank's rows (so the buffers agree on every rank)."""
    g = log_r - l_pos + loss.rho - q * (mean_l - l_pos)
    mom = torch.stack([loss.image_tau_momentum[index], loss.text_tau_momentum[index]]).to(g)
    new_tau, new_m = momentum_step(
        tau, mom, g, loss.tau_lr, loss.tau_momentum, loss.tau_min, loss.tau_max
    )
    packed = torch.cat([index.to(torch.float64)[:, None], new_tau.t(), new_m.t()], dim=1)
    if world.size > 1:
        packed = world.gather(packed.double(), with_grad=False)
    idx = packed[:, 0].long()
    ok = torch.isfinite(packed[:, 1:]).all(dim=1)  # a non-finite step leaves its rows alone
    for k, name in enumerate(("image_tau", "text_tau", "image_tau_momentum", "text_tau_momentum")):
        buf = getattr(loss, name)
        buf[idx] = torch.where(ok, packed[:, 1 + k].to(buf.dtype), buf[idx])


def individual_step(loss, image_features, text_features, logit_scale, index, world) -> torch.Tensor:
    """One step of temperature="individual" (module docstring): rates updated with this batch
    (update "before"), the features' surrogate 1/2 mean_i [-s_ii + tau_i u_i Zhat_i] + (text) at
    the old temperatures, then the temperature step. Two LSE sweeps with vector scales (simlse),
    plus one backward sweep for E_p[s] (d row_i / d rs_i), and the gradient sweep of backward.
    Returns F = 1/2 mean_i tau_i (log u_i + rho) + (text) as the value."""

    def check():
        V.check_pair(
            "image_features", image_features, "text_features", text_features, same_batch=True
        )
        n = image_features.shape[0]
        if world.size * n < 2:
            raise ValueError(
                f"{type(loss).__name__} needs at least 2 pairs per batch, got B = {world.size * n}"
            )
        if logit_scale is not None:
            raise ValueError(
                "temperature='individual' learns per-sample temperatures (image_tau, text_tau): "
                f"pass logit_scale=None, got {type(logit_scale).__name__}"
            )
        name = resolve_traced(loss.backend, image_features.device)
        return name, loss._rates.check(index, n, image_features.device, want_seen=False)

    name, idx = world.agree(
        f"gammacl {type(loss).__name__} (distributed)",
        check,
        lambda out: [
            ("image_features", image_features),
            ("text_features", text_features),
            ("index", index if out is None else out[1].index),
        ],
        flags=[("num_samples", loss.num_samples), *loss.temperature_flags()],
    )
    index = idx.index
    n = image_features.shape[0]
    total, off = world.size * n, world.rank * n
    log_m = math.log(total - 1)
    log_w = loss._log_weights(total, image_features, world)[:, off : off + n]
    tau = _tau_rows(loss, index, image_features)
    local = loss.grad_comm == "local" and world.size > 1  # no feature-gradient collective
    all_image = world.gather(image_features, with_grad=not local)
    all_text = world.gather(text_features, with_grad=not local)
    if local:  # _local_grad: every anchor's LSE and scale gathered, each rank's exact gradient
        feats = (image_features, text_features, all_image, all_text)
        rs = tau.reciprocal()  # [2, n]: this rank's image and text anchors' scales
        row, col, _ = local_pair_lse(*feats, rs, world, offset=off, exclude_pos=True, backend=name)
        lse = torch.stack([row, col])
        pairs = ((image_features, all_text, rs[0], row), (text_features, all_image, rs[1], col))
        mean_s = torch.stack([mean_dots(x, y, s, r, off, name) for x, y, s, r in pairs])
    else:
        with torch.enable_grad():  # E_p[s] below needs the graph of the LSEs to the scales
            rs, cs = (t.reciprocal().requires_grad_() for t in tau)
            if world.size == 1:
                row, col = simlse(
                    image_features, text_features, rs, exclude_pos=True, backend=name, col_scale=cs
                )
            else:
                kw = {"offset": off, "exclude_pos": True, "cols": False, "backend": name}
                row = simlse(image_features, all_text, rs, **kw)[0]
                col = simlse(text_features, all_image, cs, **kw)[0]
            lse = torch.stack([row, col])
            mean_s = torch.stack(
                torch.autograd.grad(lse, (rs, cs), torch.ones_like(lse), retain_graph=True)
            )
    log_zhat = lse.detach() - log_m
    log_r = loss._rates.update(idx, log_zhat, world).to(lse.dtype)
    acc = lse.dtype
    cos_pos = (image_features.to(acc) * text_features.to(acc)).sum(dim=1)
    alpha = (log_w - log_r).detach() - log_m
    out = 0.5 * (tau * torch.exp(alpha + lse)).mean(dim=1).sum() - cos_pos.mean()
    l_pos = cos_pos.detach() / tau
    q = torch.exp(alpha + lse.detach())
    _tau_update(loss, index, tau, log_r, l_pos, mean_s / tau, q, world)
    log_u = log_r - l_pos
    value = 0.5 * (tau * (log_u + loss.rho)).mean(dim=1).sum()
    loss.global_loss_estimate = value  # F: the value returned
    loss.last_path = "individual"
    return out + (value - out).detach()
