"""Training configurations (Method) and the run plans of the retrieval experiment
(gammacl.experiments.retrieval): the issue-16 main run, the ema x shape sweep, the one-pass
diagnosis, and the learnable-temperature plans of issue 24 (validation grid and main table)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gammacl

SCALE_CAP = 100.0


@dataclass
class Method:
    """One training configuration. loss: clip, sogclr, gamma, clip+fs, clip+bb, clip+gc, or
    oracle (rate="fixed" gamma/SogCLR one-pass with exact full-data rates refreshed every
    `refresh` steps; the --onepass diagnosis). batch 0 = the whole training set. scale:
    "learnable" (log-parametrised, capped at `cap`; None: no cap), "fixed" (1/tau = 10) or
    "individual" (temperature="individual": the loss learns per-sample temperatures). kwargs:
    further loss keywords (temperature, rho, tau_lr, ema_schedule, ...)."""

    loss: str
    batch: int
    scale: str = "learnable"  # or "fixed"
    ema: float | None = None
    shape: float | None = None
    update: str | None = None
    clamp: float | None = None
    refresh: int | None = None
    drift: bool = False  # update="after" + a global drift correction of the stale rates
    cap: float | None = SCALE_CAP
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.loss == "clip":
            return "clip (full batch)" if self.batch == 0 else "clip"
        parts = [self.loss]
        if self.shape is not None and self.loss in ("gamma", "oracle"):
            parts.append(f"a={self.shape:g}")
        if self.ema is not None:
            parts.append(f"ema={self.ema:g}")
        if self.update is not None:
            parts.append(self.update)
        if self.clamp is not None:
            parts.append(f"clamp={self.clamp:.3g}")
        if self.refresh is not None:
            parts.append(f"refresh={self.refresh}")
        if self.drift:
            parts.append("drift-corrected")
        kw = self.kwargs
        if "temperature" in kw:
            parts.append(kw["temperature"])
        parts += [f"{k}={kw[k]:g}" for k in ("rho", "tau_lr") if k in kw]
        if kw.get("ema_schedule") == "cosine":
            parts.append(f"cosine/{kw['ema_decay_epochs']}")
        if self.cap is None and self.scale == "learnable":
            parts.append("no cap")
        return " ".join(parts)


def library_default(cls, name: str):
    """The default of keyword `name` of gammacl loss class `cls` (the library's, not ours)."""
    import inspect

    return inspect.signature(cls).parameters[name].default


def main_plan(
    batches, scales, ema_sog, ema_gamma, paper_b_batch, fixed_batches=None, shape=None
) -> list[Method]:
    """clip at every batch and the full set; SogCLR and the gamma loss (before / after; shape
    `shape`, default the library's) at every small batch; for scale "fixed" only at
    `fixed_batches` (default: all); Paper B rows (scale scales[0]) at `paper_b_batch` (0: none)."""
    if shape is None:
        shape = float(library_default(gammacl.GammaClipLoss, "shape"))
    if ema_sog is None:
        ema_sog = float(library_default(gammacl.SogCLRLoss, "ema"))
    if ema_gamma is None:
        ema_gamma = float(library_default(gammacl.GammaClipLoss, "ema"))
    ms: list[Method] = []
    for sc in scales:
        bs = batches if sc != "fixed" or fixed_batches is None else fixed_batches
        ms += [Method("clip", b, sc) for b in bs]
        ms.append(Method("clip", 0, sc))
        ms += [Method("sogclr", b, sc, ema=ema_sog, update="before") for b in bs]
        for upd in ("before", "after"):
            ms += [Method("gamma", b, sc, ema=ema_gamma, shape=shape, update=upd) for b in bs]
    if paper_b_batch:
        ms += [Method(x, paper_b_batch, scales[0]) for x in ("clip+fs", "clip+bb", "clip+gc")]
    return ms


def sweep_plan(batch: int, emas, shapes, scale: str) -> list[Method]:
    ms = [Method("clip", batch, scale)]
    for e in emas:
        ms.append(Method("sogclr", batch, scale, ema=e, update="before"))
        ms += [Method("gamma", batch, scale, ema=e, shape=a, update="before") for a in shapes]
    return ms


def onepass_plan(batch: int, ema: float, scale: str) -> list[Method]:
    return [
        Method("sogclr", batch, scale, ema=ema, update="before"),
        Method("sogclr", batch, scale, ema=ema, update="after"),
        Method("sogclr", batch, scale, ema=0.1, update="after"),
        Method("sogclr", batch, scale, ema=ema, update="after", clamp=-math.log(ema) + 1e-3),
        Method("oracle", batch, scale, shape=1e6, refresh=1),
        Method("oracle", batch, scale, shape=1e6, refresh=batch and 1347 // batch),
        Method("sogclr", batch, scale, ema=ema, update="after", drift=True),
    ]


TAU_INIT, TAU_MIN, TAU_MAX = 0.1, 0.01, 1.0  # per-sample temperatures start at 1/tau = 10


def _rgcl(rho: float, **extra) -> dict:
    return {"temperature": "rgcl", "rho": rho, **extra}


def _individual(rho: float, tau_lr: float) -> dict:
    return {
        "temperature": "individual",
        "rho": rho,
        "tau_lr": tau_lr,
        "tau_init": TAU_INIT,
        "tau_min": TAU_MIN,
        "tau_max": TAU_MAX,
    }


def grid_plan(batch: int, rhos, tau_lrs, individual: bool = True) -> list[Method]:
    """The validation grid (issue 24): SogCLR "rgcl" (no cap) at every rho, "individual" at every
    (rho, tau_lr); run on the validation split (--validation), never on the test pairs."""
    ema = float(library_default(gammacl.SogCLRLoss, "ema"))
    ms = [Method("sogclr", batch, "learnable", ema=ema, cap=None, kwargs=_rgcl(r)) for r in rhos]
    if individual:
        ms += [
            Method("sogclr", batch, "individual", ema=ema, kwargs=_individual(r, lr))
            for r in rhos
            for lr in tau_lrs
        ]
    return ms


def temperature_plan(
    batches, rho: float, rho_ind: float, tau_lr: float, epochs: int, individual: bool = True
) -> list[Method]:
    """Learnable temperature at every batch (issue 24): InfoNCE with open_clip's learnable scale
    (capped at 100), SogCLR "input" (today's handling, capped), SogCLR "rgcl", gamma "rgcl" and
    SogCLR "rgcl" with the cosine schedule over epochs // 2 (all uncapped), SogCLR "individual";
    rho / rho_ind / tau_lr as chosen on the validation grid."""
    ema = float(library_default(gammacl.SogCLRLoss, "ema"))
    shape = float(library_default(gammacl.GammaClipLoss, "shape"))
    cos = {"ema_schedule": "cosine", "ema_decay_epochs": max(1, epochs // 2)}
    ms: list[Method] = []
    for b in batches:
        ms += [
            Method("clip", b, "learnable"),
            Method("sogclr", b, "learnable", ema=ema, update="before"),
            Method("sogclr", b, "learnable", ema=ema, cap=None, kwargs=_rgcl(rho)),
            Method("gamma", b, "learnable", ema=ema, shape=shape, cap=None, kwargs=_rgcl(rho)),
            Method("sogclr", b, "learnable", ema=ema, cap=None, kwargs=_rgcl(rho, **cos)),
        ]
        if individual:
            ms.append(
                Method("sogclr", b, "individual", ema=ema, kwargs=_individual(rho_ind, tau_lr))
            )
    return ms
