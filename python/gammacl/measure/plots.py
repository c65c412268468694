"""The PNGs (matplotlib, optional extra 'plot'; imported only when a plot is drawn).

bench: NAME.png is the summary a user wants first: per loss, fwd+bwd time (median, p20-p80
band) and peak memory vs N, gammacl's backends beside every installed peer, the GEMM floor only
under losses whose work is N^2*D. NAME-cases.png holds one panel pair (time, TFLOP/s) per
(loss, D, dtype, mode). profile: NAME.png, peak memory vs N per implementation.
Axes are log where every value is positive and symlog (linear around 0) where a value is 0, so
no point drops off a log axis.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from gammacl.measure.cli import MODES
from gammacl.measure.flops import N2D

FLOOR_STYLE = dict(ls="--", color="k", lw=1)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib (extra 'plot') is absent."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series_label(r: dict) -> str:
    return f"gammacl[{r['backend']}]" if r["impl"] == "gammacl" else r["impl"]


def set_yscale(ax, values: Sequence[float]) -> None:
    """log when all values are > 0; symlog (linear below the smallest positive value) else."""
    pos = [v for v in values if v is not None and v > 0]
    if values and len(pos) == len([v for v in values if v is not None]):
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=min(pos) if pos else 1.0)
        if all(v >= 0 for v in values if v is not None):
            ax.set_ylim(bottom=0)


def _style_x(ax, xlabel: str = "N") -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.grid(True, which="both", alpha=0.3)


def _panel_loss(rows: list[dict]) -> dict[str, str]:
    """loss -> the panel it is drawn in: siglip-kernel's sigmoid loss goes beside clip until
    gammacl has a siglip loss of its own (then it has its own panel)."""
    ours = any(r["impl"] == "gammacl" and r["loss"] == "siglip" for r in rows)
    return {"siglip": "siglip" if ours else "clip"}


def _in_panel(r: dict, loss: str, panel: dict[str, str]) -> bool:
    return panel.get(r["loss"], r["loss"]) == loss


def _timed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok" and r.get("time_ms_p50") is not None]


def _draw_time(ax, sel: list[dict], lab: str, **style) -> list[float]:
    pts = sorted((r["N"], r["time_ms_p20"], r["time_ms_p50"], r["time_ms_p80"]) for r in sel)
    ns = [p[0] for p in pts]
    (line,) = ax.plot(ns, [p[2] for p in pts], marker="o", ms=3, label=lab, **style)
    ax.fill_between(ns, [p[1] for p in pts], [p[3] for p in pts], alpha=0.2,
                    color=line.get_color(), lw=0)  # fmt: skip
    return [p[1] for p in pts] + [p[3] for p in pts]


def _floor_rows(rows: list[dict], d, dt, mode) -> list[dict]:
    return [
        r for r in rows if r["loss"] == "floor" and (r["D"], r["dtype"], r["mode"]) == (d, dt, mode)
    ]


def summary_losses(rows: list[dict], scaling: dict[str, str], limit: int = 6) -> list[str]:
    """Losses for the summary: the N^2*D ones in run order (clip first), then the rest."""
    panel = _panel_loss(rows)
    seen = list(
        dict.fromkeys(panel.get(r["loss"], r["loss"]) for r in rows if r["loss"] != "floor")
    )
    seen.sort(key=lambda lo: (scaling.get(lo, N2D) != N2D, lo not in ("clip", "infonce")))
    return seen[:limit]


def plot_bench_summary(
    rows: list[dict], path: Path, title: str, *, scaling: dict[str, str], mem_col: str,
    mem_label: str,
) -> Path | None:  # fmt: skip
    """Per loss (columns): time (top) and peak memory (bottom) vs N, every implementation, at
    fwd+bwd (or the first mode run) and the first D / dtype."""
    plt = pyplot()
    ok = _timed(rows)
    if plt is None or not ok:
        return None
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    mode = "fwd+bwd" if "fwd+bwd" in modes else modes[0]
    d, dt = ok[0]["D"], ok[0]["dtype"]
    ok = [r for r in ok if (r["D"], r["dtype"], r["mode"]) == (d, dt, mode)]
    losses, panel = summary_losses(ok, scaling), _panel_loss(ok)
    if not losses:
        return None
    fig, axes = plt.subplots(2, len(losses), figsize=(3.6 * len(losses) + 0.8, 6.4),
                             squeeze=False, layout="constrained")  # fmt: skip
    for j, loss in enumerate(losses):
        ax_t, ax_m = axes[0][j], axes[1][j]
        sel = [r for r in ok if _in_panel(r, loss, panel)]
        tvals, mvals = [], []
        for lab in sorted({series_label(r) for r in sel}):
            ser = [r for r in sel if series_label(r) == lab]
            tvals += _draw_time(ax_t, ser, lab)
            pts = sorted((r["N"], r.get(mem_col)) for r in ser if r.get(mem_col) is not None)
            color = ax_t.get_lines()[-1].get_color()
            if pts:
                ax_m.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                          color=color, label=lab)  # fmt: skip
                mvals += [p[1] for p in pts]
            exp = sorted((r["N"], r["expected_extra_mib"]) for r in ser
                         if r.get("expected_extra_mib") is not None)  # fmt: skip
            if exp:
                ax_m.plot([p[0] for p in exp], [p[1] for p in exp], ls=":", color=color)
                mvals += [p[1] for p in exp]
        if scaling.get(loss, N2D) == N2D and _floor_rows(ok, d, dt, mode):
            tvals += _draw_time(ax_t, _floor_rows(ok, d, dt, mode), "4-GEMM floor", **FLOOR_STYLE)
        for ax, vals, what in ((ax_t, tvals, "time, median (ms)"), (ax_m, mvals, mem_label)):
            _style_x(ax)
            set_yscale(ax, vals)
            ax.set_ylabel(what, fontsize=8)
        ax_t.set_title(f"{loss} ({scaling.get(loss, N2D)})", fontsize=9)
        ax_t.legend(fontsize=6)
    fig.suptitle(f"{title}\n{mode}, D={d}, {dt}; band: p20-p80 of the calls; dotted: analytic "
                 "memory model; dashed: the 4 GEMMs (N^2*D losses only)", fontsize=8)  # fmt: skip
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_bench_cases(
    rows: list[dict], path: Path, title: str, *, scaling: dict[str, str]
) -> Path | None:
    """Time and TFLOP/s vs N, one panel pair per (loss, D, dtype, mode); the GEMM floor only in
    the panels of N^2*D losses; more than 8 cases: fwd+bwd only, clip / infonce first."""
    plt = pyplot()
    ok = _timed(rows)
    if plt is None:
        return None
    panel = _panel_loss(ok)
    groups = sorted(
        {
            (panel.get(r["loss"], r["loss"]), r["D"], r["dtype"], r["mode"])
            for r in ok
            if r["loss"] != "floor"
        },  # fmt: skip
        key=lambda g: (g[0], g[1], g[2], MODES.index(g[3])),
    )
    if len(groups) > 8:
        groups = [g for g in groups if g[3] == "fwd+bwd"] or groups
        groups.sort(key=lambda g: (g[0] not in ("clip", "infonce"), g))
    groups = groups[:16]
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 2.6 * len(groups) + 0.6),
                             squeeze=False, layout="constrained")  # fmt: skip
    for (loss, d, dt, mode), (ax_t, ax_f) in zip(groups, axes, strict=False):
        key = (d, dt, mode)
        sel = [r for r in ok if (r["D"], r["dtype"], r["mode"]) == key
               and _in_panel(r, loss, panel)]  # fmt: skip
        n2d = scaling.get(loss, N2D) == N2D
        series = [(series_label(r), {}) for r in sel]
        if n2d:
            sel += _floor_rows(ok, d, dt, mode)
            series.append(("gemm_floor", FLOOR_STYLE))
        tvals, fvals = [], []
        for lab, style in dict(series).items():
            ser = [r for r in sel if series_label(r) == lab]
            tvals += _draw_time(ax_t, ser, lab, **style)
            fl = sorted((r["N"], r["tflops"]) for r in ser if r.get("tflops"))
            if fl:
                ax_f.plot([p[0] for p in fl], [p[1] for p in fl], marker="o", ms=3, label=lab,
                          **style)  # fmt: skip
                fvals += [p[1] for p in fl]
        for ax, vals, what in ((ax_t, tvals, "time (ms), p20-p80"), (ax_f, fvals, "TFLOP/s")):
            _style_x(ax)
            set_yscale(ax, vals)
            ax.set_ylabel(what, fontsize=8)
            ax.set_title(f"{loss}  D={d} {dt} {mode}", fontsize=9)
        if not fvals:
            ax_f.axis("off")
            ax_f.text(0.5, 0.5, f"{loss}: no FLOP count ({scaling.get(loss, N2D)} work)",
                      transform=ax_f.transAxes, ha="center", fontsize=8)  # fmt: skip
        ax_t.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def plot_profile(
    rows: list[dict],
    path: Path,
    *,
    ycol: str,
    capacity_mib: float | None,
    capacity_label: str,
    title: str,
    absolute: bool = False,
) -> Path | None:
    """Peak memory vs N per implementation (measured solid, analytic dotted), points that did
    not fit marked x (over budget at their measured value, OOM / skipped at the limit), the
    device capacity (or CPU budget) as a horizontal line."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")

    def add(r: dict) -> float:
        return (r["inputs_mib"] or 0.0) + (r["grads_mib"] or 0.0)

    vals: list[float] = [capacity_mib] if capacity_mib else []
    for lab in sorted({r["label"] for r in rows}):
        sel = sorted((r for r in rows if r["label"] == lab), key=lambda r: r["N"])
        pts = [(r["N"], r[ycol]) for r in sel if r[ycol] is not None]
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=lab)
        color = line.get_color()
        vals += [p[1] for p in pts]
        exp = [
            (r["N"], r["expected_extra_mib"] + (add(r) if absolute else 0.0))
            for r in sel
            if r["expected_extra_mib"]
        ]
        if exp:
            ax.plot([p[0] for p in exp], [p[1] for p in exp], ls=":", color=color,
                    label=f"{lab} (analytic)")  # fmt: skip
            vals += [p[1] for p in exp]
        top = capacity_mib or max(vals or [1.0])
        bad = [(r["N"], r[ycol] if r[ycol] is not None else top) for r in sel if not r["fits"]]
        if bad:
            ax.plot([b[0] for b in bad], [b[1] for b in bad], ls="", marker="x", ms=9,
                    mew=2, color=color)  # fmt: skip
    if capacity_mib:
        ax.axhline(capacity_mib, color="k", ls="--", lw=1, label=capacity_label)
    _style_x(ax, "N (batch size)")
    set_yscale(ax, vals)
    ax.set_ylabel(f"{ycol} (MiB)")
    ax.legend(fontsize=7)
    ax.set_title(f"{title}\nx: does not fit (over budget / OOM / skipped)", fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
