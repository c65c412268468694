"""Small-batch contrastive retrieval on real data: minibatch InfoNCE vs SogCLR vs the gamma loss
vs full-batch InfoNCE (issue 16), and Paper B's regularisers on top of InfoNCE.

    python -m gammacl.experiments.retrieval [--quick] [--out DIR] [--seeds 5] [--epochs 40]
    python -m gammacl.experiments.retrieval --sweep [--out DIR]     # ema x shape at batch 8
    python -m gammacl.experiments.retrieval --onepass [--out DIR]   # why update="after" lags
    python -m gammacl.experiments.retrieval --grid --validation 300 --seed-offset 100  # issue 24
    python -m gammacl.experiments.retrieval --temperature --rho R --rho-individual R --tau-lr E
(--grid: rho / tau_lr of the learnable temperatures on pairs carved from the training pairs;
--temperature: the learnable-temperature table with the chosen values; docs/experiments.md.)

Data: scikit-learn's digits (1797 8x8 images, shipped inside the package, no download). The two
"modalities" are the left and right halves of each image (4 columns = 32 pixels each, /16).
Fixed split (numpy seed 0): 1347 training pairs, 450 held-out test pairs (the same for every
seed and method). Each modality has its own encoder: MLP 32 -> 128 -> 128 -> 32 (ReLU), output
L2-normalised. Adam (lr 1e-3), a fixed number of epochs (passes over the training pairs; batches
drawn without replacement each epoch, the last incomplete batch dropped). logit_scale either
fixed at 1/tau = 10 or learnable (log-parametrised, initialised at 10, capped at 100 as CLIP).

Methods (all through gammacl's public API, backend --backend, default "torch"):
  clip          gammacl.ClipLoss (minibatch InfoNCE, positive in the denominator) at batch B;
                B = the whole training set is the "global" reference ("full").
  sogclr        gammacl.SogCLRLoss(num_samples, ema=..., update=...)
  gamma         gammacl.GammaClipLoss(num_samples, shape=..., ema=..., update="before"/"after")
  clip+fs/bb/gc ClipLoss + 0.25 x FeatureSeparationLoss / BrownianBridgeLoss /
                GeometricConsistencyLoss(form="cyclip", inmodal_weight = crossmodal_weight = 0.25)
                (Paper B; the augmented view adds N(0, 0.1^2) noise and drops 10% of pixels;
                feature separation uses an extra "independent" head per encoder).
Every `--eval-every` epochs (and at epoch 0) on the held-out pairs: recall@1 and recall@5 of
cross-modal retrieval (left->right and right->left, averaged; r1_l2r / r1_r2l separately),
recall@1 on the training pairs, the global objective G of gammacl.gamma (full-data symmetric
contrastive loss, positive excluded from the denominator, at the current logit_scale) on train
and on test, the full-data InfoNCE (ClipLoss's objective) on train, and Wang & Isola's alignment
(mean ||x_i - y_i||^2 over test pairs) and uniformity (log mean_{i != j} e^{-2||x_i - x_j||^2},
mean over the two modalities).

Output in --out: retrieval.csv (one row per method, batch size, scale, seed, epoch), retrieval.json
(config + rows + summary), retrieval.png (recall@1 vs batch size per method at the last epoch;
recall@1 vs epoch at the smallest batch), and the table printed (mean ± std over seeds).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gammacl
from gammacl.experiments._plans import (  # noqa: F401
    SCALE_CAP,
    Method,
    grid_plan,
    library_default,
    main_plan,
    onepass_plan,
    sweep_plan,
    temperature_plan,
)
from gammacl.experiments._report import METRICS, format_table, plot, summarise  # noqa: F401
from gammacl.experiments._train import (
    log,
    parser,
    tau_stats,
    train_loop,
    write_csv,
    write_json,
)

TAU = 0.1
HIDDEN, DIM = 128, 32
AUG_NOISE, AUG_DROP = 0.1, 0.1
PAPER_B_WEIGHT = 0.25


# ---------------------------------------------------------------------------------------------
# data and model
# ---------------------------------------------------------------------------------------------


def load_pairs(test_size: int = 450, split_seed: int = 0, validation: int = 0):
    """(train_left, train_right, test_left, test_right) float32 tensors [n, 32]: left and right
    halves of scikit-learn's digits, pixel values / 16; one fixed split. validation > 0: the
    held-out pairs are `validation` pairs carved from the TRAINING pairs (numpy seed 1), which
    lose them; the test pairs are not touched (hyper-parameter selection)."""
    from sklearn.datasets import load_digits

    img = load_digits().images.astype(np.float32) / 16.0  # [1797, 8, 8]
    left = img[:, :, :4].reshape(len(img), -1)
    right = img[:, :, 4:].reshape(len(img), -1)
    perm = np.random.default_rng(split_seed).permutation(len(img))
    te, tr = perm[:test_size], perm[test_size:]
    if validation:
        sub = np.random.default_rng(1).permutation(len(tr))
        te, tr = tr[sub[:validation]], tr[sub[validation:]]
    t = torch.from_numpy
    return t(left[tr]), t(right[tr]), t(left[te]), t(right[te])


class Tower(nn.Module):
    """MLP encoder of one modality; L2-normalised output (and an optional independent head)."""

    def __init__(self, d_in: int, independent: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
        )
        self.head = nn.Linear(HIDDEN, DIM)
        self.ihead = nn.Linear(HIDDEN, DIM) if independent else None

    def forward(self, x: torch.Tensor):
        h = self.trunk(x)
        z = F.normalize(self.head(h), dim=1)
        zi = F.normalize(self.ihead(h), dim=1) if self.ihead is not None else None
        return z, zi


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=gen) * AUG_NOISE
    keep = (torch.rand(x.shape, generator=gen) >= AUG_DROP).float()
    return (x + noise) * keep


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def _recall(sim: torch.Tensor, k: int) -> float:
    """Fraction of rows whose own column (the diagonal) is among the top k."""
    diag = sim.diagonal().unsqueeze(1)
    rank = (sim > diag).sum(dim=1)  # strictly better candidates
    return float((rank < k).float().mean())


def global_objective(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """G of gammacl.gamma over ALL pairs: 1/2 mean_i[-l_ii + log mean_{j!=i} e^{l_ij}] + 1/2 (same
    over columns), l = scale * a b^T (fp32: |l| <= 100, the LSE is exact to ~1e-6 here)."""
    n = a.shape[0]
    lg = scale * a @ b.T
    pos = lg.diagonal()
    off = lg.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    lse_r = torch.logsumexp(off, dim=1) - math.log(n - 1)
    lse_c = torch.logsumexp(off, dim=0) - math.log(n - 1)
    return float(0.5 * (lse_r - pos).mean() + 0.5 * (lse_c - pos).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    d2 = (2.0 - 2.0 * x @ x.T).clamp(min=0.0)  # unit vectors: ||x_i - x_j||^2
    n = x.shape[0]
    off = (-t * d2).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    return float(torch.logsumexp(off.flatten(), 0) - math.log(n * (n - 1)))


@torch.no_grad()
def evaluate(towers, scale: float, data) -> dict:
    tl, tr, el, er = data
    a_tr, b_tr = towers[0](tl)[0], towers[1](tr)[0]
    a_te, b_te = towers[0](el)[0], towers[1](er)[0]
    s_te, s_tr = a_te @ b_te.T, a_tr @ b_tr.T
    r1_l2r, r1_r2l = _recall(s_te, 1), _recall(s_te.T, 1)
    return {
        "recall_at_1": 0.5 * (r1_l2r + r1_r2l),
        "recall_at_5": 0.5 * (_recall(s_te, 5) + _recall(s_te.T, 5)),
        "r1_l2r": r1_l2r,
        "r1_r2l": r1_r2l,
        "train_recall_at_1": 0.5 * (_recall(s_tr, 1) + _recall(s_tr.T, 1)),
        "global_train_loss": global_objective(a_tr, b_tr, scale),
        "global_test_loss": global_objective(a_te, b_te, scale),
        "global_train_loss_s10": global_objective(a_tr, b_tr, 1.0 / TAU),  # one common scale
        "global_test_loss_s10": global_objective(a_te, b_te, 1.0 / TAU),
        "train_clip_loss": float(gammacl.clip_loss(a_tr, b_tr, scale, backend="torch")),
        "alignment": float((a_te - b_te).square().sum(1).mean()),
        "uniformity": 0.5 * (uniformity(a_te) + uniformity(b_te)),
        "logit_scale": scale,
    }


# ---------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------


def _make_loss(m: Method, n: int, seed: int, backend: str):
    if m.loss == "sogclr":
        kw = {"update": m.update or "before", "backend": backend}
        if m.ema is not None:
            kw["ema"] = m.ema
        if m.clamp is not None:
            kw["clamp"] = m.clamp
        return gammacl.SogCLRLoss(n, **kw, **m.kwargs)
    if m.loss in ("gamma", "oracle"):
        kw = {
            "update": m.update or "before",
            "backend": backend,
            "generator": torch.Generator().manual_seed(10_000 + seed),
        }
        if m.loss == "oracle":
            kw["rate"] = "fixed"
            kw["update"] = "after"
        elif m.ema is not None:
            kw["ema"] = m.ema
        if m.shape is not None:
            kw["shape"] = m.shape
        if m.clamp is not None:
            kw["clamp"] = m.clamp
        return gammacl.GammaClipLoss(n, **kw, **m.kwargs)
    return gammacl.ClipLoss(backend=backend)


@torch.no_grad()
def _exact_log_z(towers, scale: float, tl, tr) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact full-data log Z_i (rows) and log Z^T_j (columns), positive excluded."""
    a, b = towers[0](tl)[0], towers[1](tr)[0]
    n = a.shape[0]
    lg = (scale * a @ b.T).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    return (
        torch.logsumexp(lg, 1) - math.log(n - 1),
        torch.logsumexp(lg, 0) - math.log(n - 1),
    )


def run_one(
    m: Method,
    seed: int,
    data,
    *,
    epochs: int,
    eval_every: int,
    lr: float = 1e-3,
    backend: str = "torch",
    diag: list | None = None,
) -> list[dict]:
    """Trains one method with one seed; one row per evaluated epoch."""
    tl, tr, _, _ = data
    n = tl.shape[0]
    torch.manual_seed(seed)
    fs = m.loss == "clip+fs"
    towers = nn.ModuleList([Tower(tl.shape[1], fs), Tower(tr.shape[1], fs)])
    log_s = nn.Parameter(torch.tensor(math.log(1.0 / TAU)), requires_grad=m.scale == "learnable")
    params = list(towers.parameters()) + ([log_s] if m.scale == "learnable" else [])
    opt = torch.optim.Adam(params, lr=lr, fused=True)  # fused: 1 kernel, ~4x less overhead
    loss_fn = _make_loss(m, n, seed, backend)
    clip = gammacl.ClipLoss(backend=backend)
    reg = {
        "clip+fs": gammacl.FeatureSeparationLoss(PAPER_B_WEIGHT, backend=backend),
        "clip+bb": gammacl.BrownianBridgeLoss(PAPER_B_WEIGHT),
        "clip+gc": gammacl.GeometricConsistencyLoss(
            1.0, form="cyclip", inmodal_weight=PAPER_B_WEIGHT, crossmodal_weight=PAPER_B_WEIGHT
        ),
    }.get(m.loss)
    gen = torch.Generator().manual_seed(seed)
    b = n if m.batch == 0 else m.batch
    per_epoch = n // b
    steps = epochs * per_epoch
    order: list[torch.Tensor] = []
    rows: list[dict] = []
    drift = torch.zeros(2)

    def scale_now() -> torch.Tensor:
        return log_s.exp().clamp(max=m.cap) if m.cap else log_s.exp()

    def record(epoch: int) -> None:
        r = {
            "method": m.name,
            "loss": m.loss,
            "batch_size": "full" if m.batch == 0 else m.batch,
            "scale": m.scale,
            "seed": seed,
            "epoch": epoch,
        }
        r.update(evaluate(towers, float(scale_now().detach()), data))
        if m.scale == "individual":  # where the per-sample temperatures went
            r.update(tau_stats(loss_fn.image_tau, loss_fn.text_tau))
        rows.append(r)

    def step(t: int) -> None:
        k = (t - 1) % per_epoch
        if k == 0:
            order[:] = [torch.randperm(n, generator=gen)]
            if hasattr(loss_fn, "set_epoch"):
                loss_fn.set_epoch((t - 1) // per_epoch)
        idx = order[0][k * b : (k + 1) * b]
        xl, xr = tl[idx], tr[idx]
        s = scale_now()
        sd = float(s.detach())
        if m.loss == "oracle" and (t - 1) % m.refresh == 0:
            loss_fn.set_log_rates(*_exact_log_z(towers, sd, tl, tr))
        if diag is not None and t % 20 == 0 and m.loss in ("sogclr", "gamma", "oracle"):
            diag.append(_weight_diag(m, loss_fn, towers, sd, tl, tr, idx, t, per_epoch))
        zl, zil = towers[0](xl)
        zr, zir = towers[1](xr)
        if m.drift:  # emulated through the public state: stale log R_k += drift c (see doc)
            loss = _drift_step(loss_fn, zl, zr, s, idx, drift)
        elif m.loss in ("sogclr", "gamma", "oracle"):
            loss = loss_fn(zl, zr, None if m.scale == "individual" else s, idx)
        else:
            loss = clip(zl, zr, s)
        if m.loss == "clip+fs":
            al, ar = augment(xl, gen), augment(xr, gen)
            zil_a, zir_a = towers[0](al)[1], towers[1](ar)[1]
            loss = loss + reg(zl, zr, zil, zir, zil_a, zir_a, s)
        elif m.loss == "clip+bb":
            zl_a = towers[0](augment(xl, gen))[0]
            loss = loss + reg(zl, zr, zl_a)
        elif m.loss == "clip+gc":
            loss = loss + reg(zl, zr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    record(0)
    rec_at = [e * per_epoch for e in range(eval_every, epochs + 1, eval_every)]
    if epochs % eval_every:
        rec_at.append(steps)
    train_loop(step, steps, record_at=rec_at, record=lambda t: record(t // per_epoch))
    return rows


def _drift_step(loss_fn, zl, zr, s, idx, drift: torch.Tensor) -> torch.Tensor:
    """One update="after" step whose stale rates are corrected by the data-set-wide drift of
    log Z since the samples' last visit: c <- 0.9 c + 0.1 mean_i(log Zhat_i - log R_i) over the
    seen rows of the previous batches (per direction), and this step uses log R_i + c. Only
    statistics of earlier steps enter, so a fused kernel could do it in its one pass (the batch
    log Zhat is the one-pass row / column LSE); here it is emulated by shifting the module's
    public state buffers before the forward."""
    states = (loss_fn.image_rate, loss_fn.text_rate)
    with torch.no_grad():
        b = zl.shape[0]
        lg = (s.detach() * zl.detach() @ zr.detach().T).masked_fill(
            torch.eye(b, dtype=torch.bool), float("-inf")
        )
        log_zhat = torch.stack([lg.logsumexp(1), lg.logsumexp(0)]) - math.log(b - 1)
        err = []
        for d, st in enumerate(states):
            seen = st.visited[idx]
            old = st.log_rate[idx]
            err.append(((log_zhat[d] - old) * seen).sum() / seen.sum().clamp(min=1))
            st.log_rate[idx] = old + drift[d] * seen  # the corrected stale rate
    loss = loss_fn(zl, zr, s, idx)
    drift.mul_(0.9).add_(0.1 * torch.stack(err))
    return loss


@torch.no_grad()
def _weight_diag(m, loss_fn, towers, scale, tl, tr, idx, t, per_epoch) -> dict:
    """What the rate used at this step does, image-anchor direction: log(Zhat_i / R_i) (the
    SogCLR weight u_i Zhat_i in log) and log R_i - log Z_i (the rate's error against the exact
    full-data Z_i at the current parameters), for the rate this step will use."""
    a, b = towers[0](tl[idx])[0], towers[1](tr[idx])[0]
    bsz = a.shape[0]
    lg = (scale * a @ b.T).masked_fill(torch.eye(bsz, dtype=torch.bool), float("-inf"))
    log_zhat = torch.logsumexp(lg, 1) - math.log(bsz - 1)
    stored = loss_fn.image_rate.log_rate[idx]
    seen = loss_fn.image_rate.visited[idx]
    if (m.update or "before") == "before" and m.loss != "oracle":
        ema = loss_fn.ema
        log_r = torch.where(
            seen,
            torch.logaddexp(
                stored + math.log1p(-ema) if ema < 1 else stored - 1e30, log_zhat + math.log(ema)
            ),
            log_zhat,
        )
    else:
        log_r = torch.where(seen, stored, log_zhat)
    log_z = _exact_log_z(towers, scale, tl, tr)[0][idx]
    w = log_zhat - log_r
    return {
        "method": m.name,
        "step": t,
        "epoch": t / per_epoch,
        "log_w_mean": float(w.mean()),
        "log_w_max": float(w.max()),
        "rate_err_mean": float((log_r - log_z).mean()),
        "rate_err_abs": float((log_r - log_z).abs().mean()),
        "zhat_err_abs": float((log_zhat - log_z).abs().mean()),
    }


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------


def _run_task(task) -> tuple[list[dict], list | None, float]:
    """One (method, seed) run in a worker process: (rows, diagnostics, wall seconds)."""
    m, seed, epochs, eval_every, backend, want_diag, threads, validation = task
    torch.set_num_threads(threads)
    diag: list | None = [] if want_diag else None
    t1 = time.perf_counter()
    rows = run_one(
        m,
        seed,
        _DATA or load_pairs(validation=validation),
        epochs=epochs,
        eval_every=eval_every,
        backend=backend,
        diag=diag,
    )
    return rows, diag, time.perf_counter() - t1


_DATA = None  # the data set of a worker process (loaded once per worker)


def _init_worker(validation: int = 0) -> None:
    global _DATA
    _DATA = load_pairs(validation=validation)


def run_plan(
    plan,
    seeds,
    data,
    *,
    epochs,
    eval_every,
    backend,
    diag=None,
    jobs: int = 1,
    threads: int = 1,
    validation: int = 0,
) -> list[dict]:
    """Every (method, seed) of the plan; `jobs` > 1 runs them in that many worker processes
    (`threads` torch threads each); rows in plan order whatever the finishing order."""
    tasks = [
        (m, s, epochs, eval_every, backend, diag is not None, threads, validation)
        for m in plan
        for s in seeds
    ]
    results: list = [None] * len(tasks)
    t0 = time.perf_counter()

    def done_line(i: int, k: int) -> None:
        m, seed = tasks[i][0], tasks[i][1]
        last = results[i][0][-1]
        log(
            f"[{k}/{len(tasks)} {time.perf_counter() - t0:.0f}s] {m.name} B={m.batch or 'full'} "
            f"{m.scale} seed {seed}: R@1 {last['recall_at_1']:.3f} G train "
            f"{last['global_train_loss']:.3f} test {last['global_test_loss']:.3f} "
            f"({results[i][2]:.1f} s)"
        )

    if jobs <= 1:
        global _DATA
        _DATA = data
        for i, t in enumerate(tasks):
            results[i] = _run_task(t)
            done_line(i, i + 1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")  # no fork of a process that holds torch's thread pools
        pool = {"mp_context": ctx, "initializer": _init_worker, "initargs": (validation,)}
        with ProcessPoolExecutor(jobs, **pool) as ex:
            futs = {ex.submit(_run_task, t): i for i, t in enumerate(tasks)}
            for k, f in enumerate(as_completed(futs), 1):
                i = futs[f]
                results[i] = f.result()
                done_line(i, k)
    rows: list[dict] = []
    for r, d, _ in results:
        rows += r
        if diag is not None and d:
            diag += d
    return rows


def report(paths: list[str], out: str, name: str = "retrieval") -> dict:
    """Merges the rows (and configs) of earlier runs' JSON files and writes the outputs."""
    import json

    rows, configs, wall = [], [], 0.0
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        rows += res["rows"]
        configs.append(res["config"])
        wall += res.get("wall_s", 0.0)
    seen, unique = set(), []
    for r in rows:  # a method run by two processes (e.g. the full batch) counts once
        key = (r["method"], str(r["batch_size"]), r["scale"], r["seed"], r["epoch"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    rows = unique
    os.makedirs(out, exist_ok=True)
    print(format_table(rows))
    base = os.path.join(out, name)
    write_csv(rows, base + ".csv")
    result = {"config": configs, "wall_s": wall, "summary": summarise(rows), "rows": rows}
    write_json(result, base + ".json")
    smallest = min(int(r["batch_size"]) for r in rows if r["batch_size"] != "full")
    if plot(rows, base + ".png", smallest):
        print(f"plot: {base}.png")
    print(f"wrote {base}.csv, {base}.json")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = parser("retrieval", __doc__)
    p.add_argument("--out", default="retrieval_out")
    p.add_argument("--quick", action="store_true", help="CI size: 2 seeds, 4 epochs, few methods")
    p.add_argument("--sweep", action="store_true", help="ema x shape sweep at the smallest batch")
    p.add_argument("--onepass", action="store_true", help="update='after' diagnosis")
    p.add_argument(
        "--temperature", action="store_true", help="learnable temperature table (issue 24)"
    )
    p.add_argument(
        "--grid", action="store_true", help="learnable-temperature grid (use with --validation)"
    )
    p.add_argument(
        "--validation",
        type=int,
        default=0,
        help="evaluate on this many pairs carved from the training pairs (not the test pairs)",
    )
    p.add_argument("--seed-offset", type=int, default=0, help="seeds start here")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    p.add_argument("--tau-lrs", type=float, nargs="+", default=[0.003, 0.03])
    p.add_argument("--rho", type=float, default=1.0, help="rgcl rho (--temperature)")
    p.add_argument("--rho-individual", type=float, default=1.0)
    p.add_argument("--tau-lr", type=float, default=0.01)
    p.add_argument(
        "--no-individual", action="store_true", help="leave temperature='individual' out"
    )
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument(
        "--scales", nargs="+", default=["learnable", "fixed"], choices=["learnable", "fixed"]
    )
    p.add_argument(
        "--fixed-batches", type=int, nargs="+", default=None, help="fixed scale: only these B"
    )
    p.add_argument("--ema-sogclr", type=float, default=None, help="default: the library's")
    p.add_argument("--ema-gamma", type=float, default=None, help="default: the library's")
    p.add_argument("--emas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.9])
    p.add_argument("--shapes", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    p.add_argument("--paper-b-batch", type=int, default=32)
    p.add_argument("--backend", default="torch")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="worker processes, one (method, seed) run each at a time (default: CPU count)",
    )
    p.add_argument(
        "--only", nargs="+", default=None, help="run only the plan's methods of these names"
    )
    p.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        default=None,
        help="no training: merge the rows of earlier runs' JSON files into one "
        "table / CSV / JSON / plot in --out (e.g. runs split across processes)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.jobs <= 0:
        args.jobs = max(1, (os.cpu_count() or 1) // max(1, args.threads))
    if args.report:
        return report(args.report, args.out)
    if args.quick:
        args.seeds, args.epochs, args.eval_every = 2, 2, 1
        args.batches = [32, 64]
        args.scales = ["fixed"]
        args.paper_b_batch = 64
        args.emas, args.shapes = [0.1, 0.9], [1.0]
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    smallest = min(args.batches)
    diag: list | None = None
    if args.sweep:
        plan, name = sweep_plan(smallest, args.emas, args.shapes, args.scales[0]), "sweep"
    elif args.onepass:
        plan, name, diag = onepass_plan(smallest, 0.9, args.scales[0]), "onepass", []
    elif args.grid:
        plan = grid_plan(smallest, args.rhos, args.tau_lrs, not args.no_individual)
        name = "grid"
    elif args.temperature:
        ind = not args.no_individual
        plan = temperature_plan(
            args.batches, args.rho, args.rho_individual, args.tau_lr, args.epochs, ind
        )
        name = "temperature"
    else:
        plan = main_plan(
            args.batches,
            args.scales,
            args.ema_sogclr,
            args.ema_gamma,
            args.paper_b_batch,
            args.fixed_batches,
        )
        name = "retrieval"
    if args.only:
        names = sorted({m.name for m in plan})
        unknown = [x for x in args.only if x not in names]
        if unknown:
            p.error(f"--only {unknown}: not in this plan; its methods are {names}")
        plan = [m for m in plan if m.name in args.only]
    os.makedirs(args.out, exist_ok=True)
    data = load_pairs(validation=args.validation)
    log(
        f"{name}: {len(plan)} methods x {len(seeds)} seeds, {args.epochs} epochs, train "
        f"{data[0].shape[0]} / test {data[2].shape[0]} pairs, torch threads "
        f"{torch.get_num_threads()} x {args.jobs} processes, backend {args.backend}"
    )
    t0 = time.perf_counter()
    rows = run_plan(
        plan,
        seeds,
        data,
        epochs=args.epochs,
        eval_every=args.eval_every,
        backend=args.backend,
        diag=diag,
        jobs=args.jobs,
        threads=args.threads,
        validation=args.validation,
    )
    wall = time.perf_counter() - t0
    table = format_table(rows)
    print(table)
    base = os.path.join(args.out, name)
    write_csv(rows, base + ".csv")
    result = {
        "config": {k: v for k, v in vars(args).items()},
        "methods": [asdict(m) | {"name": m.name} for m in plan],
        "wall_s": wall,
        "summary": summarise(rows),
        "rows": rows,
    }
    if diag is not None:
        write_csv(diag, base + "_diag.csv")
        result["diag"] = diag
    write_json(result, base + ".json")
    if plot(rows, base + ".png", smallest):
        print(f"plot: {base}.png")
    print(f"wrote {base}.csv, {base}.json ({wall:.0f} s)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
