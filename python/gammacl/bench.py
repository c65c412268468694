"""`python -m gammacl.bench`: microbenchmarks of gammacl's losses, backends and installed peers.

Sweeps N x D x dtype x implementation x mode (fwd, bwd, fwd+bwd) and writes tidy rows to
OUT/NAME.csv and OUT/NAME.json, plus, when matplotlib is installed, OUT/NAME.png (the summary:
time and peak memory vs N per loss, gammacl beside every installed peer) and OUT/NAME-cases.png
(time and TFLOP/s per loss x D x dtype x mode). Every row keeps the spread of its calls
(min / p20 / p50 / p80 / max); rows that cannot be read at face value are flagged. Every
implementation's loss value is checked against the float64 reference at the first shape it runs
(column `check`); a MISMATCH is printed loudly and makes the exit code 1, and so does any
gammacl row with status=error. OOM is a row (status=OOM), not a crash; a requested backend that
cannot run here gives rows with status=unavailable while the others run; a loss whose gradient
comes out of its forward (one-pass gamma, SigLIP) has bwd rows with status=in_fwd and no time.
Rows go to NAME.csv as they are measured (a killed run keeps them). A few summary lines (time
and memory against the naive loss at the largest N) are printed first. See bench/README.md.

    python -m gammacl.bench --quick --out results
    python -m gammacl.bench --n 4096,16384 --d 512 --dtype bf16 --loss clip --backend triton,torch
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gammacl.measure import (
    cli,
    inputs,
    memory,
    meta,
    nvml,
    plots,
    registry,
    select,
    summary,
    timing,
)
from gammacl.measure.registry import Impl

COLUMNS = (
    *cli.CASE_COLUMNS,
    "status",
    "error",
    "time_ms_min",
    "time_ms_p20",
    "time_ms_p50",
    "time_ms_p80",
    "time_ms_max",
    "time_spread",
    "timing_flag",
    "reps",
    "flops",
    "flop_formula",
    "tflops",
    "peak_allocated_mib",
    "peak_reserved_mib",
    "extra_over_inputs_mib",
    "inputs_mib",
    "rss_peak_delta_mib",
    "expected_extra_mib",
    "check",
    "check_abs_diff",
    "device",
)
GRAD_IN_FWD = (
    "gradient computed in the forward (one-pass kernel): no backward time of its own; the fwd "
    "row with grad-requiring inputs and fwd+bwd hold its cost"
)
# CUDA under TRITON_INTERPRET=1: refused (cli.run_cli)
_INTERPRETER_REFUSAL = (
    "refusing to time: TRITON_INTERPRET=1 is set, so every Triton kernel (ours and the "
    "peers') would run in the interpreter. Unset TRITON_INTERPRET."
)

# loss-value check against the float64 reference at the first shape: |x - ref| <= atol + rtol|ref|
# (a sanity gate against comparing different losses, not a parity test; tests/tolerances.py holds
# the test suite's tolerances)
CHECK_TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (5e-2, 2e-2),
}


def _defaults(args: argparse.Namespace, device: torch.device) -> None:
    gpu = device.type == "cuda"
    if args.n is None:
        args.n = (
            ([4096, 16384, 32768] if args.quick else [4096, 16384, 32768, 65536, 131072])
            if gpu
            else ([256, 512, 1024] if args.quick else [256, 1024, 4096])
        )
    if args.d is None:
        args.d = (
            ([1024] if args.quick else [512, 1024]) if gpu else ([64] if args.quick else [64, 256])
        )
    if args.dtype is None:
        args.dtype = [torch.bfloat16] if gpu else [torch.float32]


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("bench", __doc__)
    p.add_argument("--mode", default="fwd,bwd,fwd+bwd", help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="CPU: seconds of timed calls per row (default 0.1 with --quick, else 0.5)",
    )
    p.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench rep budget (ms)")
    return p


def check_value(impl: Impl, feats: inputs.Features, step: inputs.Step) -> dict[str, Any]:
    """Our/peer loss value vs the float64 reference on the same inputs (first shape only)."""
    shape = f"N={feats.n} D={feats.d} {cli.dtype_name(feats.dtype)}"
    out = {
        "label": impl.label,
        "shape": shape,
        "reference_impl": f"gammacl {registry.check_reference_backend(feats.n)} backend, float64",
        "value": None,
        "reference": None,
        "abs_diff": None,
        "tolerance": None,
    }
    if impl.reference is None:
        return {**out, "check": impl.check_na}
    val = float(step.forward().detach())
    try:
        with torch.no_grad():
            ref = float(impl.reference(feats.upcast()))
    except Exception as exc:
        return {
            **out,
            "value": val,
            "check": "error",
            "error": f"reference failed: {type(exc).__name__}: {exc}"[:300],
        }
    atol, rtol = CHECK_TOL[feats.dtype]
    tol = atol + rtol * abs(ref)
    diff = abs(val - ref)
    return {
        **out,
        "value": val,
        "reference": ref,
        "abs_diff": diff,
        "tolerance": tol,
        "check": "ok" if diff <= tol else "MISMATCH",
    }


def _row_base(
    impl: Impl, n: int, d: int, dtype: torch.dtype, mode: str, device: torch.device
) -> dict[str, Any]:
    fl, formula = impl.flops(n, d, mode)
    exp, _ = impl.expected(n, d, dtype, mode)
    row = cli.case_row(COLUMNS, impl, n, d, dtype, mode)
    row.update(
        flops=fl,
        flop_formula=formula,
        expected_extra_mib=None if exp is None else exp / cli.MIB,
        device=device.type,
    )
    return row


def flag_timings(rows: list[dict[str, Any]]) -> int:
    """Marks rows whose timing cannot be read at face value (column timing_flag): a spread
    (p80 - p20) / p50 over timing.NOISY, or a part slower than the whole (fwd or bwd median
    above the fwd+bwd median of the same impl and shape: load on the host, not the code).
    Returns the number of flagged rows."""
    by: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        r["time_spread"] = timing.spread(r)
        if r["time_spread"] is not None and r["time_spread"] > timing.NOISY:
            r["timing_flag"] = "noisy"
        key = (r["impl"], r["loss"], r["backend"], r["N"], r["D"], r["dtype"])
        by.setdefault(key, {})[r["mode"]] = r
    for modes in by.values():
        whole = modes.get("fwd+bwd")
        if whole is None or whole["time_ms_p50"] is None:
            continue
        for part in ("fwd", "bwd"):
            r = modes.get(part)
            if r is not None and r["time_ms_p50"] is not None:
                if r["time_ms_p50"] > whole["time_ms_p50"]:
                    msg = f"{part}>fwd+bwd"
                    r["timing_flag"] = msg if not r["timing_flag"] else f"{r['timing_flag']}; {msg}"
    return sum(1 for r in rows if r["timing_flag"])


class Runner:
    def __init__(self, args: argparse.Namespace, device: torch.device, modes: list[str]):
        self.args, self.device, self.modes = args, device, modes
        quick_time = 0.1 if args.quick else 0.5
        self.cfg = timing.TimingConfig(
            min_time_s=args.min_time if args.min_time is not None else quick_time,
            gpu_rep_ms=args.rep_ms,
        )
        self.inject = cli.InjectOOM(args.inject_oom)
        self.checks: dict[str, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []
        self.sink = meta.RowSink(Path(args.out), args.name, COLUMNS)
        self.done, self.total, self.t0 = 0, 0, time.perf_counter()

    def _progress(self, row: dict[str, Any]) -> None:
        self.done += 1
        what = ""
        if row["time_ms_p50"] is not None:
            what = (
                f"p50 {row['time_ms_p50']:.3g} ms [min {row['time_ms_min']:.3g}, "
                f"max {row['time_ms_max']:.3g}]"
            )
        if row["tflops"] is not None:
            what += f", {row['tflops']:.3g} TFLOP/s"
        if row["status"] != "ok":
            what = f"{row['status']}: {row['error']}"
        cli.log(
            f"[{self.done:>4}/{self.total}] {row['impl']}/{row['loss']}/{row['backend']} "
            f"N={row['N']} D={row['D']} {row['dtype']} {row['mode']}: {what}  "
            f"({time.perf_counter() - self.t0:.1f} s)"
        )

    def _finish(self, row: dict[str, Any], label: str) -> None:
        chk = self.checks.get(label)
        if chk is not None:
            row["check"], row["check_abs_diff"] = chk["check"], chk["abs_diff"]
        self.rows.append(row)
        self.sink.add(row)
        self._progress(row)

    def _check(self, impl: Impl, feats: inputs.Features, step: inputs.Step) -> None:
        if impl.label in self.checks:
            return
        chk = check_value(impl, feats, step)
        self.checks[impl.label] = chk
        if chk["check"] in ("MISMATCH", "error"):
            cli.log(
                f"!!! CHECK {chk['check']}: {impl.label} at {chk['shape']}: value "
                f"{chk['value']} vs float64 reference {chk['reference']} "
                f"(|diff| {chk['abs_diff']}, tolerance {chk['tolerance']}) "
                f"{chk.get('error', '')} -- its timings are NOT a like-for-like comparison"
            )

    def run_group(self, impl: Impl, n: int, d: int, dtype: torch.dtype) -> None:
        """All modes of one (impl, N, D, dtype) on one set of inputs: timed together (the modes
        interleaved on CPU), then the peak memory of one call per mode."""
        dev, feats, step, fns = self.device, None, None, {}
        rows = {m: _row_base(impl, n, d, dtype, m, dev) for m in self.modes}
        if impl.unavailable:
            for mode in self.modes:
                rows[mode].update(status="unavailable", error=impl.unavailable)
                self._finish(rows[mode], impl.label)
            return
        timed = [m for m in self.modes if not (impl.grad_in_fwd and m == "bwd")]
        for mode in set(self.modes) - set(timed):
            rows[mode].update(status="in_fwd", error=GRAD_IN_FWD)
        try:
            feats = inputs.Features(n, d, dtype, dev, self.args.seed, self.args.scale)
            step = impl.build(feats)
            self.inject.check(impl.label, n)
            self._check(impl, feats, step)
            for mode in timed:
                try:
                    fns[mode] = step.prepare(mode)
                except Exception as exc:
                    rows[mode]["status"], rows[mode]["error"] = timing.classify_error(exc)
            times = timing.time_modes(fns, step, dev, self.cfg)
        except Exception as exc:
            status, err = timing.classify_error(exc)
            del exc
            step = feats = None
            fns = {}
            timing.free_memory(dev)
            for mode in self.modes:
                if mode in timed:
                    rows[mode].update(status=status, error=err)
                self._finish(rows[mode], impl.label)
            return
        inputs_mib = feats.grads_bytes() / cli.MIB
        for mode in self.modes:
            row = rows[mode]
            row["inputs_mib"] = inputs_mib
            res = times.get(mode)
            try:
                if isinstance(res, BaseException):
                    raise res
                if res is not None:
                    row.update(res)
                    self._memory(row, fns[mode], step)
                    if row["flops"] and row["time_ms_p50"]:
                        row["tflops"] = row["flops"] / (row["time_ms_p50"] * 1e-3) / 1e12
                    row["status"] = "ok"
            except Exception as exc:
                row["status"], row["error"] = timing.classify_error(exc)
                del exc
            finally:
                step.clear_grads()
                timing.free_memory(dev)
            self._finish(row, impl.label)
        del step, feats, fns, times
        timing.free_memory(self.device)

    def _memory(self, row: dict[str, Any], fn, step: inputs.Step) -> None:
        with memory.exact_rss():
            mem = memory.measure_memory(fn, step, self.device)
        if self.device.type == "cuda":
            row["peak_allocated_mib"] = mem["peak_allocated"] / cli.MIB
            row["peak_reserved_mib"] = mem["peak_reserved"] / cli.MIB
            row["extra_over_inputs_mib"] = memory.delta_mib(
                mem["peak_allocated"], mem["base_allocated"]
            )
        elif mem["rss_reset"]:
            row["rss_peak_delta_mib"] = memory.delta_mib(mem["rss_peak"], mem["rss_before"])


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(
        "gammacl.bench", _parser(), argv, _run, interpreter_refusal=_INTERPRETER_REFUSAL
    )


def _quick_filter(impls: list[Impl], notes: list[str]) -> list[Impl]:
    """--quick: a loss marked quick_all_backends (clip, infonce, gamma, sogclr) on every backend
    (clip and infonce also on `reference`); the regularisers on their first backend only."""

    def first(loss: str) -> str | None:
        return next((i.backend for i in impls if i.impl == "gammacl" and i.loss == loss), None)

    def keep(i: Impl) -> bool:
        if i.impl != "gammacl" or i.backend == "-":
            return True
        if i.quick_all_backends:
            return i.backend != "reference" or i.loss in ("clip", "infonce")
        return i.backend == first(i.loss)

    notes.append(
        "--quick: clip and infonce on every backend, the gamma losses and sogclr on every "
        "backend but reference, the regularisers on their first backend only"
    )
    return [i for i in impls if keep(i)]


def _run(args: argparse.Namespace, device: torch.device) -> int:
    _defaults(args, device)
    modes = cli.csv_list(args.mode)
    bad = [m for m in modes if m not in cli.MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {','.join(cli.MODES)}")
    impls, notes = select.select_impls(args, device, for_profile=False)
    if args.quick:
        impls = _quick_filter(impls, notes)
    if not impls:
        raise SystemExit("nothing to run (check --impl / --loss / --backend)")
    if device.type == "cpu":
        notes.append(
            "CPU: times are time.perf_counter wall clock, the modes of a shape interleaved call "
            "by call; memory is the process peak RSS delta (VmHWM reset per row, clamped at 0); "
            "GPU memory columns are null"
        )
    for note in notes:
        cli.log(f"gammacl.bench: note: {note}")

    runner = Runner(args, device, modes)
    plan = [
        (i, dt, d, n)
        for i in impls
        for dt in args.dtype
        for d in args.d
        for n in args.n
        if i.dtypes is None or dt in i.dtypes
    ]
    for i in impls:
        if i.dtypes is not None and not any(dt in i.dtypes for dt in args.dtype):
            notes.append(f"{i.label} skipped: supports none of the requested dtypes")
    runner.total = len(plan) * len(modes)
    cli.log(
        f"gammacl.bench: {len(impls)} implementations, {runner.total} rows on "
        f"{device} ({timing.timer_name(device)})"
    )
    for impl, dt, d, n in plan:
        runner.run_group(impl, n, d, dt)
    wall = time.perf_counter() - runner.t0
    flagged = flag_timings(runner.rows)

    info = meta.collect_metadata(
        device,
        args,
        nvml=nvml.open_nvml(device) if device.type == "cuda" else None,
        extra={"wall_s": round(wall, 1)},
    )
    payload = {
        "tool": "gammacl.bench",
        "metadata": info,
        "notes": notes,
        "checks": list(runner.checks.values()),
        "sweep": {
            "N": args.n,
            "D": args.d,
            "dtype": [cli.dtype_name(t) for t in args.dtype],
            "modes": modes,
            "scale": args.scale,
        },
        "impls": [{"label": i.label, "note": i.note, "scaling": i.scaling} for i in impls],
    }
    out = Path(args.out)
    csv_path, json_path = meta.write_outputs(out, args.name, COLUMNS, runner.rows, payload)
    mem_cols = (
        [("peak_allocated_mib", "peak MiB"), ("extra_over_inputs_mib", "extra MiB")]
        if device.type == "cuda"
        else [("rss_peak_delta_mib", "RSS+ MiB")]
    )
    table = [
        {**r, "spread": None if r["time_spread"] is None else f"{100 * r['time_spread']:.0f}%"}
        for r in runner.rows
    ]
    print("\n".join(summary.bench_summary(runner.rows, mem_cols[-1][0])) + "\n")
    print(
        meta.format_table(
            table,
            [
                ("impl", "impl"),
                ("loss", "loss"),
                ("backend", "backend"),
                ("N", "N"),
                ("D", "D"),
                ("dtype", "dtype"),
                ("mode", "mode"),
                ("status", "status"),
                ("time_ms_p50", "p50 ms"),
                ("time_ms_min", "min ms"),
                ("time_ms_max", "max ms"),
                ("spread", "p20-p80"),
                ("tflops", "TFLOP/s"),
                *mem_cols,
                ("check", "check"),
                ("timing_flag", "timing"),
            ],
        )
    )
    print(
        f"\ndevice: {info['device_name']}; timer: {info['timer']}; TFLOP/s at p50 with the "
        "formula in column flop_formula; p20-p80: spread of the calls as % of p50"
    )
    if flagged:
        print(
            f"{flagged} rows flagged in column 'timing' (noise: host load, not the code; "
            f"load average {info['load_average']})"
        )
    written = [csv_path, json_path]
    if not args.no_plot:
        written += _plots(runner.rows, impls, out, args.name, info, device)
    print("wrote " + ", ".join(str(p) for p in written) + f" in {wall:.1f} s")
    bad = [c for c in runner.checks.values() if c["check"] in ("MISMATCH", "error")]
    for c in bad:
        print(
            f"!!! CHECK {c['check']}: {c['label']} at {c['shape']}: {c['value']} vs reference "
            f"{c['reference']} -- not a like-for-like comparison",
            file=sys.stderr,
        )
    errors = [r for r in runner.rows if r["impl"] == "gammacl" and r["status"] == "error"]
    if errors:
        print(
            f"!!! {len(errors)} gammacl rows failed with an error, e.g. "
            f"{errors[0]['loss']}/{errors[0]['backend']} N={errors[0]['N']}: {errors[0]['error']}",
            file=sys.stderr,
        )
    return 1 if bad or errors else 0


def _plots(rows, impls, out: Path, name: str, info: dict, device: torch.device) -> list[Path]:
    """NAME.png (the summary) and NAME-cases.png (a panel pair per case)."""
    scaling = {i.loss: i.scaling for i in impls}
    title = f"gammacl.bench on {info['device_name']} ({info['date_utc']})"
    gpu = device.type == "cuda"
    summary = plots.plot_bench_summary(
        rows,
        out / f"{name}.png",
        title,
        scaling=scaling,
        mem_col="extra_over_inputs_mib" if gpu else "rss_peak_delta_mib",
        mem_label="peak allocated over inputs (MiB)" if gpu else "peak RSS over the call (MiB)",
    )
    if summary is None:
        print("no PNG: matplotlib is not installed (pip install 'gammacl[plot]') or no ok rows")
        return []
    cases = plots.plot_bench_cases(rows, out / f"{name}-cases.png", title, scaling=scaling)
    return [summary] + ([cases] if cases is not None else [])


if __name__ == "__main__":
    memory.MALLOC_TOGGLE = True  # the CLI process only (process-wide glibc settings)
    sys.exit(main())
