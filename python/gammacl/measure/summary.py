"""The few lines bench and profile print first: what gammacl gains in time and memory against the
naive materialised loss at the largest N measured, and how far N goes."""

from __future__ import annotations

from typing import Any

# the materialised loss each gammacl loss is held against (the naive CLIP loss unless named)
BASELINE = {"siglip": "open_clip_siglip"}
MAX_LOSS_LINES = 4  # + the heading: at most 5 lines


def _ratio(ours: float | None, theirs: float | None, better: str, worse: str) -> str:
    if ours is None or theirs is None or ours <= 0 or theirs <= 0:
        return ""
    r = theirs / ours
    return f" ({r:.3g}x {better})" if r >= 1 else f" ({1 / r:.3g}x {worse})"


def _num(v: float | None, unit: str) -> str:
    return "-" if v is None else f"{v:.3g} {unit}"


def bench_summary(rows: list[dict[str, Any]], mem_col: str) -> list[str]:
    """Heading + one line per gammacl loss (at most MAX_LOSS_LINES): at the largest N with an ok
    gammacl row (mode fwd+bwd when measured), its fastest backend against the naive materialised
    loss at the same N, D, dtype and mode (time p50, and memory from `mem_col`)."""
    modes = {r["mode"] for r in rows}
    mode = "fwd+bwd" if "fwd+bwd" in modes else next((r["mode"] for r in rows), None)
    ours = [r for r in rows if r["impl"] == "gammacl" and r["mode"] == mode and r["status"] == "ok"]
    losses = list(dict.fromkeys(r["loss"] for r in rows if r["impl"] == "gammacl"))
    lines = [
        f"summary ({mode}; largest N measured; against the naive materialised loss; memory: "
        f"{mem_col}):"
    ]
    for loss in losses[:MAX_LOSS_LINES]:
        mine = [r for r in ours if r["loss"] == loss]
        if not mine:
            bad = next(r for r in rows if r["impl"] == "gammacl" and r["loss"] == loss)
            lines.append(f"  {loss}: no ok row ({bad['status']}: {bad['error']})"[:160])
            continue
        top = max(mine, key=lambda r: (r["N"], r["D"]))
        at = [r for r in mine if (r["N"], r["D"], r["dtype"]) == (top["N"], top["D"], top["dtype"])]
        best = min(at, key=lambda r: r["time_ms_p50"])
        where = f"N={best['N']} D={best['D']} {best['dtype']}"
        base = BASELINE.get(loss, "naive")
        naive = next(
            (
                r
                for r in rows
                if r["impl"] == base
                and (r["N"], r["D"], r["dtype"], r["mode"])
                == (best["N"], best["D"], best["dtype"], mode)
            ),
            None,
        )
        head = f"  {loss} {where}: gammacl/{best['backend']} {_num(best['time_ms_p50'], 'ms')}"
        mem = _num(best.get(mem_col), "MiB")
        if naive is None:
            lines.append(f"{head}, {mem}; no {base} row at this N")
        elif naive["status"] != "ok":
            lines.append(f"{head}, {mem}; {base}: {naive['status']} at this N")
        else:
            t = _ratio(best["time_ms_p50"], naive["time_ms_p50"], "faster", "slower")
            m = _ratio(best.get(mem_col), naive.get(mem_col), "less", "more")
            lines.append(
                f"{head} vs {base} {_num(naive['time_ms_p50'], 'ms')}{t}; memory {mem} vs "
                f"{_num(naive.get(mem_col), 'MiB')}{m}"
            )
    if len(losses) > MAX_LOSS_LINES:
        lines[-1] += f"  (+{len(losses) - MAX_LOSS_LINES} more losses in the table)"
    return lines


def largest_n_text(s: dict[str, Any], cap: int) -> str:
    """The profile's 'largest N' in words: a limit measured (a failure seen) or only the
    search cap reached (no failure up to it: the real limit lies above)."""
    lo, hi = s["max_n_fits"], s["first_fail_n"]
    if s.get("unavailable"):
        return f"unavailable ({s['unavailable']})"
    if lo is None:
        return f"none fits (fails at N={hi})" if hi else "none measured"
    if s["search_capped"]:
        return f"fits up to the search cap ({cap}); limit not reached"
    if hi is None:
        return f"{lo} (largest swept; no search)"
    return f"{lo} (measured limit: fails at {hi})"


def profile_summary(summaries: list[dict[str, Any]], cap: int) -> list[str]:
    """Heading + one line per gammacl implementation (at most MAX_LOSS_LINES): its largest N in
    words against the naive materialised loss's, per D and dtype."""
    lines = ["summary (largest N that fits; against the naive materialised loss):"]
    ours = [s for s in summaries if s["impl"] == "gammacl"]
    for s in ours[:MAX_LOSS_LINES]:
        base = BASELINE.get(s["loss"], "naive")
        naive = next(
            (
                n
                for n in summaries
                if n["impl"] == base and (n["D"], n["dtype"]) == (s["D"], s["dtype"])
            ),
            None,
        )
        theirs = "no naive run" if naive is None else f"{base} {largest_n_text(naive, cap)}"
        gain = ""
        if naive and s["max_n_fits"] and naive["max_n_fits"] and not naive["search_capped"]:
            ge = ">= " if s["search_capped"] else ""
            gain = f"; {ge}{s['max_n_fits'] / naive['max_n_fits']:.3g}x the naive N"
        lines.append(
            f"  {s['label']} D={s['D']} {s['dtype']}: {largest_n_text(s, cap)}; {theirs}{gain}"
        )
    if len(ours) > MAX_LOSS_LINES:
        lines[-1] += f"  (+{len(ours) - MAX_LOSS_LINES} more in the table)"
    return lines
