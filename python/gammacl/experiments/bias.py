"""Gradient bias of minibatch contrastive training: the synthetic toy of docs/math.md §A.7.

    python -m gammacl.experiments.bias [--steps 20000] [--seeds 10] [--negatives 2 8 32]
                                       [--out bias_theta.png] [--no-plot]

THIS IS A TOY DERIVED FROM THE PAPER'S DESCRIPTION (Chen et al., NeurIPS 2022: "noise injected
into synthetic data, 10 runs, the proposed loss converges to the optimum 1.0"), NOT THE PAPER'S
OWN SETUP, which is not available (docs/math.md §A.1, §A.7).

Model: one scalar theta. n = 256 anchors, anchor i has a fixed noise scale sigma_i ~ U(0.5, 1.5)
and positive score c_i = sigma_i^2; its negatives have logit theta * z, z ~ N(0, sigma_i^2). The
global loss
    L(theta) = 1/n sum_i [-theta c_i + log E_z e^{theta z}]
             = 1/n sum_i sigma_i^2 (theta^2 / 2 - theta)
has its minimum at theta* = 1 exactly and Z_i(theta) = e^{theta^2 sigma_i^2 / 2} in closed form.
Each step draws 32 anchors (without replacement) and M negatives per anchor, and takes an SGD step
eta_t = lr / sqrt(t) (lr = 0.05) from theta_0 = 0 with the batch-mean gradient of
    naive       -c_i + sum_j z_j e^{theta z_j} / sum_j e^{theta z_j}   (minibatch InfoNCE, positive
                                                                        not in the denominator)
    SEM exact   -c_i + u_i 1/M sum_j z_j e^{theta z_j},  u_i ~ Exp(rate Z_i(theta))   (oracle rate)
    SEM ema     the same with u_i ~ Exp(rate R_i), R_i the per-anchor moving average of Zhat_i
    SogCLR ema  u_i = 1 / R_i (mean E-step)
where log R_i follows GammaClipLoss's rule, updated before use (first visit: log R_i = log Zhat_i;
then logaddexp(log(1 - ema) + log R_i, log(ema) + log Zhat_i)). All variants and replicates run
vectorised in numpy (common random numbers across variants); replicates are independent streams
of one seeded generator per M.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from gammacl.experiments._train import parser, train_loop

DISCLAIMER = (
    "NOTE: a toy derived from the paper's description (docs/math.md §A.7), not the paper's "
    "own setup (not available)."
)

# (label, kind, ema): kind in naive / exact / sem / sogclr
VARIANTS = (
    ("naive minibatch", "naive", None),
    ("SEM exact rate", "exact", None),
    ("SEM ema=0.02", "sem", 0.02),
    ("SogCLR ema=0.02", "sogclr", 0.02),
    ("SogCLR ema=0.9", "sogclr", 0.9),
)


@dataclass(frozen=True)
class Toy:
    """The toy's settings (module docstring): SGD steps, replicates, anchors n, anchors per
    batch, lr, the generator's seed, and how many steps of the trajectory are recorded."""

    steps: int = 20000
    seeds: int = 10
    anchors: int = 256
    batch: int = 32
    lr: float = 0.05
    seed: int = 0
    record: int = 200


CLI_SETTINGS = ("steps", "seeds", "lr", "seed")  # the Toy fields main() takes as --flags


def simulate(
    negatives: int, toy: Toy | None = None, *, variants=VARIANTS, **settings: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs every variant for `seeds` replicates with M = `negatives`; `settings` (steps=...,
    seeds=..., any Toy field) replace the fields of `toy` (default Toy()). Returns (final theta
    [V, S], recorded steps [T], theta trajectory [V, S, T])."""
    toy = replace(toy or Toy(), **settings)
    steps, anchors, batch, lr = toy.steps, toy.anchors, toy.batch, toy.lr
    rng = np.random.default_rng([toy.seed, negatives])
    v, s, m = len(variants), toy.seeds, negatives
    kinds = [k for _, k, _ in variants]
    ema = np.array([e if e is not None else 1.0 for _, _, e in variants])[:, None, None]
    is_naive = np.array([k == "naive" for k in kinds])[:, None]
    is_exact = np.array([k == "exact" for k in kinds])[:, None, None]
    is_sem = np.array([k == "sem" for k in kinds])[:, None, None]
    uses_state = np.array([k in ("sem", "sogclr") for k in kinds])

    with np.errstate(divide="ignore"):  # ema = 1 marks stateless variants: log(1 - 1) = -inf
        keep, log_ema = np.log1p(-ema), np.log(ema)
    sigma = rng.uniform(0.5, 1.5, size=(s, anchors))
    c = sigma**2
    theta = np.zeros((v, s))
    log_r = np.zeros((v, s, anchors))
    seen = np.zeros((v, s, anchors), dtype=bool)
    rows = np.arange(s)[:, None]
    rec_at = set(np.unique(np.geomspace(1, steps, min(toy.record, steps)).round().astype(int)))
    rec_steps, traj = [], []
    theta_box = [theta]

    def step(t: int) -> None:
        theta = theta_box[0]
        idx = np.argsort(rng.random((s, anchors)), axis=1)[:, :batch]  # [S, B], no repeats
        sig = sigma[rows, idx]  # [S, B]
        z = rng.standard_normal((s, batch, m)) * sig[..., None]  # [S, B, M]
        x = theta[:, :, None, None] * z[None]  # logits theta z, [V, S, B, M]
        mx = x.max(axis=-1, keepdims=True)
        e = np.exp(x - mx)  # shifted: e^{theta z - mx}
        se, sze = e.sum(-1), (z[None] * e).sum(-1)  # [V, S, B]
        log_zhat = mx[..., 0] + np.log(se / m)  # log mean_j e^{theta z_j}
        mean_ze = sze / se * np.exp(log_zhat)  # 1/M sum_j z_j e^{theta z_j}
        # rates: exact Z_i(theta), or the moving average updated before use
        old, vis = log_r[:, rows, idx], seen[:, rows, idx]
        upd = np.where(vis, np.logaddexp(keep + old, log_ema + log_zhat), log_zhat)
        for vi in np.flatnonzero(uses_state):
            log_r[vi][rows, idx] = upd[vi]
            seen[vi][rows, idx] = True
        exact = 0.5 * theta[:, :, None] ** 2 * sig[None] ** 2  # log Z_i(theta)
        log_rate = np.where(is_exact, exact, upd)
        draw = rng.standard_exponential((v, s, batch))
        u = np.where(is_exact | is_sem, draw, 1.0) * np.exp(-log_rate)
        g_naive = sze / se
        g_em = u * mean_ze
        grad = -c[rows, idx][None] + np.where(is_naive[..., None], g_naive, g_em)
        theta_box[0] = theta - lr / math.sqrt(t) * grad.mean(axis=-1)

    def record_step(t: int) -> None:
        rec_steps.append(t)
        traj.append(theta_box[0].copy())

    train_loop(step, steps, record_at=rec_at, record=record_step)
    theta = theta_box[0]
    return theta, np.array(rec_steps), np.stack(traj, axis=-1)


def run(*, negatives=(2, 8, 32), **settings: Any) -> dict:
    """simulate(M, **settings) for each M; {"negatives", "variants", "final" [len(M), V, S],
    "steps", "traj" [len(M), V, S, T]}."""
    out = [simulate(m, **settings) for m in negatives]
    return {
        "negatives": list(negatives),
        "variants": [label for label, _, _ in VARIANTS],
        "final": np.stack([o[0] for o in out]),
        "steps": out[0][1],
        "traj": np.stack([o[2] for o in out]),
    }


def format_table(res: dict) -> str:
    head = ["M"] + res["variants"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for mi, m in enumerate(res["negatives"]):
        cells = [f"{th.mean():.3f}±{th.std():.3f}" for th in res["final"][mi]]
        lines.append(" | ".join([str(m)] + cells))
    return "\n".join(lines)


def plot(res: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install gammacl[plot]); no plot written")
        return False
    ms = res["negatives"]
    fig, axes = plt.subplots(1, len(ms), figsize=(4.5 * len(ms), 3.6), squeeze=False)
    for mi, (m, ax) in enumerate(zip(ms, axes[0], strict=True)):
        for vi, label in enumerate(res["variants"]):
            th = res["traj"][mi, vi]
            mean, std = th.mean(axis=0), th.std(axis=0)
            ax.plot(res["steps"], mean, label=label)
            ax.fill_between(res["steps"], mean - std, mean + std, alpha=0.2)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_title(f"M = {m} negatives / anchor")
        ax.set_xlabel("step")
        ax.set_ylabel("theta (mean ± std over seeds)")
        ax.set_ylim(0.0, min(4.0, float(res["traj"][mi].max()) + 0.2))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        "Toy from docs/math.md §A.7 (derived from the paper's description, not its setup)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    p = parser("bias", __doc__)
    for name in CLI_SETTINGS:
        default = getattr(Toy, name)
        p.add_argument(f"--{name}", type=type(default), default=default)
    p.add_argument("--negatives", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--out", default="bias_theta.png", help="plot path (PNG)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    print(DISCLAIMER)
    t0 = time.perf_counter()
    res = run(negatives=args.negatives, **{name: getattr(args, name) for name in CLI_SETTINGS})
    print(
        f"final theta (optimum theta* = 1.0), mean ± std over {args.seeds} seeds, "
        f"{args.steps} steps, {time.perf_counter() - t0:.1f} s:"
    )
    print(format_table(res))
    if not args.no_plot and plot(res, args.out):
        print(f"plot of theta over steps: {args.out}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
