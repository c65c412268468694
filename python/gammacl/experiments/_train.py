"""The training loop, the command-line parser and the result helpers shared by gammacl's
experiments (bias.py, retrieval.py).

`train_loop` runs `steps` optimisation steps of a caller-supplied `step(t)` (t = 1, 2, ...),
calls `record(t)` after the steps in `record_at`, and prints a progress line every `progress_s`
seconds. What a step does (a numpy SGD step of the scalar toy, an Adam step of two MLP encoders
under a gammacl loss) is the caller's; the loop owns the order of steps, records and progress.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Iterable


def train_loop(
    step: Callable[[int], None],
    steps: int,
    *,
    record_at: Iterable[int] = (),
    record: Callable[[int], None] | None = None,
    progress_s: float | None = None,
    label: str = "",
) -> float:
    """Runs step(1) .. step(steps); record(t) right after each t in `record_at`. Returns the
    wall time in seconds. `progress_s`: print "label: step t/steps, elapsed" at most that often
    (stderr-free, flushed stdout)."""
    rec = set(int(t) for t in record_at)
    t0 = last = time.perf_counter()
    for t in range(1, steps + 1):
        step(t)
        if record is not None and t in rec:
            record(t)
        if progress_s is not None:
            now = time.perf_counter()
            if now - last >= progress_s:
                last = now
                print(f"  {label}: step {t}/{steps}, {now - t0:.0f} s", flush=True)
    return time.perf_counter() - t0


def parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """`python -m gammacl.experiments.<module>`'s parser, its module docstring as the help."""
    return argparse.ArgumentParser(
        prog=f"python -m gammacl.experiments.{module}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """(mean, population std) of finite values; (nan, nan) when there are none."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / len(v))


def fmt_mean_std(values: Iterable[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f}±{s:.{digits}f}"


def write_csv(rows: list[dict], path: str) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def write_json(obj: object, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)
        f.write("\n")


def log(msg: str) -> None:
    print(msg, flush=True)
    sys.stdout.flush()


def tau_stats(image_tau, text_tau) -> dict:
    """Where per-sample temperatures went: mean, 10th and 90th percentile over both directions,
    and logit_scale = 1 / mean tau (the comparable single scale)."""
    import torch

    t = torch.cat([image_tau, text_tau]).double()
    q = torch.quantile(t, torch.tensor([0.1, 0.9], dtype=torch.float64))
    return {
        "tau_mean": float(t.mean()),
        "tau_p10": float(q[0]),
        "tau_p90": float(q[1]),
        "logit_scale": float(1.0 / t.mean()),
    }
