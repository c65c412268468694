"""`python -m gammacl.bench`: microbenchmarks of gammacl's losses, backends and installed peers.

Sweeps N x D x dtype x implementation x mode (fwd, bwd, fwd+bwd) and writes tidy rows to
OUT/NAME.csv and OUT/NAME.json (plus OUT/NAME.png when matplotlib is installed). Every
implementation's loss value is checked against the float64 reference at the first shape it runs
(column `check`); a MISMATCH is printed loudly and makes the exit code 1. OOM is a row
(status=OOM), not a crash. See bench/README.md for the columns.

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

from gammacl import _measure as M

COLUMNS = (
    "impl",
    "loss",
    "backend",
    "N",
    "D",
    "dtype",
    "mode",
    "status",
    "error",
    "time_ms_p20",
    "time_ms_p50",
    "time_ms_p80",
    "reps",
    "flops",
    "flop_formula",
    "tflops",
    "peak_allocated_mib",
    "peak_reserved_mib",
    "extra_over_inputs_mib",
    "inputs_mib",
    "rss_peak_delta_mib",
    "check",
    "check_abs_diff",
    "device",
)
# CUDA under TRITON_INTERPRET=1: refused (M.run_cli)
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
    p = argparse.ArgumentParser(
        prog="python -m gammacl.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    M.add_common_args(p, default_name="bench")
    p.add_argument("--mode", default="fwd,bwd,fwd+bwd", help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="CPU: seconds of timed calls per row (default 0.1 with --quick, else 0.5)",
    )
    p.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench rep budget (ms)")
    return p


def check_value(impl: M.Impl, feats: M.Features, step: M.Step) -> dict[str, Any]:
    """Our/peer loss value vs the float64 reference on the same inputs (first shape only)."""
    shape = f"N={feats.n} D={feats.d} {M.dtype_name(feats.dtype)}"
    out = {
        "label": impl.label,
        "shape": shape,
        "reference_impl": f"gammacl {M.check_reference_backend(feats.n)} backend, float64",
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
    ok = diff <= tol
    return {
        **out,
        "value": val,
        "reference": ref,
        "abs_diff": diff,
        "tolerance": tol,
        "check": "ok" if ok else "MISMATCH",
    }


def _row_base(
    impl: M.Impl, n: int, d: int, dtype: torch.dtype, mode: str, device: torch.device
) -> dict[str, Any]:
    flops, formula = impl.flops(n, d, mode)
    return {
        "impl": impl.impl,
        "loss": impl.loss,
        "backend": impl.backend,
        "N": n,
        "D": d,
        "dtype": M.dtype_name(dtype),
        "mode": mode,
        "status": None,
        "error": None,
        "time_ms_p20": None,
        "time_ms_p50": None,
        "time_ms_p80": None,
        "reps": None,
        "flops": flops,
        "flop_formula": formula,
        "tflops": None,
        "peak_allocated_mib": None,
        "peak_reserved_mib": None,
        "extra_over_inputs_mib": None,
        "inputs_mib": None,
        "rss_peak_delta_mib": None,
        "check": None,
        "check_abs_diff": None,
        "device": device.type,
    }


class Runner:
    def __init__(self, args: argparse.Namespace, device: torch.device, modes: list[str]):
        self.args, self.device, self.modes = args, device, modes
        quick_time = 0.1 if args.quick else 0.5
        self.cfg = M.TimingConfig(
            min_time_s=args.min_time if args.min_time is not None else quick_time,
            gpu_rep_ms=args.rep_ms,
        )
        self.inject = M.InjectOOM(args.inject_oom)
        self.checks: dict[str, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []
        self.done, self.total, self.t0 = 0, 0, time.perf_counter()

    def _progress(self, row: dict[str, Any]) -> None:
        self.done += 1
        what = f"p50 {row['time_ms_p50']:.3g} ms" if row["time_ms_p50"] is not None else ""
        if row["tflops"] is not None:
            what += f", {row['tflops']:.3g} TFLOP/s"
        if row["status"] != "ok":
            what = f"{row['status']}: {row['error']}"
        M.log(
            f"[{self.done:>4}/{self.total}] {row['impl']}/{row['loss']}/{row['backend']} "
            f"N={row['N']} D={row['D']} {row['dtype']} {row['mode']}: {what}  "
            f"({time.perf_counter() - self.t0:.1f} s)"
        )

    def _finish(self, row: dict[str, Any], label: str) -> None:
        chk = self.checks.get(label)
        if chk is not None:
            row["check"], row["check_abs_diff"] = chk["check"], chk["abs_diff"]
        self.rows.append(row)
        self._progress(row)

    def run_group(self, impl: M.Impl, n: int, d: int, dtype: torch.dtype) -> None:
        """All modes of one (impl, N, D, dtype) on one set of inputs."""
        dev, feats, step = self.device, None, None
        try:
            feats = M.Features(n, d, dtype, dev, self.args.seed, self.args.scale)
            step = impl.build(feats)
            self.inject.check(impl.label, n)
            if impl.label not in self.checks:
                chk = check_value(impl, feats, step)
                self.checks[impl.label] = chk
                if chk["check"] in ("MISMATCH", "error"):
                    M.log(
                        f"!!! CHECK {chk['check']}: {impl.label} at {chk['shape']}: value "
                        f"{chk['value']} vs float64 reference {chk['reference']} "
                        f"(|diff| {chk['abs_diff']}, tolerance {chk['tolerance']}) "
                        f"{chk.get('error', '')} -- its timings are NOT a like-for-like "
                        "comparison"
                    )
        except Exception as exc:
            status, err = M.classify_error(exc)
            del exc
            step = feats = None
            M.free_memory(dev)
            for mode in self.modes:
                row = _row_base(impl, n, d, dtype, mode, dev)
                row.update(status=status, error=err)
                self._finish(row, impl.label)
            return
        inputs_mib = feats.grads_bytes() / M.MIB
        for mode in self.modes:
            row = _row_base(impl, n, d, dtype, mode, dev)
            row["inputs_mib"] = inputs_mib
            fn = None
            try:
                fn = step.prepare(mode)
                row.update(M.time_call(fn, step, dev, self.cfg))
                mem = M.measure_memory(fn, step, dev)
                if dev.type == "cuda":
                    row["peak_allocated_mib"] = mem["peak_allocated"] / M.MIB
                    row["peak_reserved_mib"] = mem["peak_reserved"] / M.MIB
                    row["extra_over_inputs_mib"] = (
                        mem["peak_allocated"] - mem["base_allocated"]
                    ) / M.MIB
                elif mem["rss_peak"] is not None and mem["rss_reset"]:
                    row["rss_peak_delta_mib"] = (mem["rss_peak"] - mem["rss_before"]) / M.MIB
                if row["flops"] and row["time_ms_p50"]:
                    row["tflops"] = row["flops"] / (row["time_ms_p50"] * 1e-3) / 1e12
                row["status"] = "ok"
            except Exception as exc:
                row["status"], row["error"] = M.classify_error(exc)
                del exc
            finally:
                fn = None
                step.clear_grads()
                M.free_memory(dev)
            self._finish(row, impl.label)
        del step, feats, fn
        M.free_memory(dev)


def main(argv: list[str] | None = None) -> int:
    return M.run_cli(
        "gammacl.bench", _parser(), argv, _run, interpreter_refusal=_INTERPRETER_REFUSAL
    )


def _run(args: argparse.Namespace, device: torch.device) -> int:
    _defaults(args, device)
    modes = M.csv_list(args.mode)
    bad = [m for m in modes if m not in M.MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {','.join(M.MODES)}")
    impls, notes = M.select_impls(args, device, for_profile=False)
    if args.quick:
        # --quick: clip and infonce on every backend; other losses on the default backend only
        impls = [
            i
            for i in impls
            if i.impl != "gammacl"
            or i.loss in ("clip", "infonce")
            or i.backend in ("-", _first_backend(impls, i.loss))
        ]
        notes.append("--quick: losses other than clip/infonce run on their first backend only")
    if not impls:
        raise SystemExit("nothing to run (check --impl / --loss / --backend)")
    if device.type == "cpu":
        notes.append(
            "CPU: times are time.perf_counter wall clock; memory is the process peak "
            "RSS delta (VmHWM reset per row); GPU memory columns are null"
        )
    for note in notes:
        M.log(f"gammacl.bench: note: {note}")

    runner = Runner(args, device, modes)
    plan = [
        (i, dt, d, n)
        for i in impls
        for dt in args.dtype
        for d in args.d
        for n in args.n
        if i.dtypes is None or dt in i.dtypes
    ]
    skipped = [
        i.label
        for i in impls
        if i.dtypes is not None and not any(dt in i.dtypes for dt in args.dtype)
    ]
    for lab in skipped:
        notes.append(f"{lab} skipped: supports none of the requested dtypes")
    runner.total = len(plan) * len(modes)
    M.log(
        f"gammacl.bench: {len(impls)} implementations, {runner.total} rows on "
        f"{device} ({M.timer_name(device)})"
    )
    for impl, dt, d, n in plan:
        runner.run_group(impl, n, d, dt)
    wall = time.perf_counter() - runner.t0

    meta = M.collect_metadata(
        device,
        args,
        nvml=M.open_nvml(device) if device.type == "cuda" else None,
        extra={"wall_s": round(wall, 1)},
    )
    payload = {
        "tool": "gammacl.bench",
        "metadata": meta,
        "notes": notes,
        "checks": list(runner.checks.values()),
        "sweep": {
            "N": args.n,
            "D": args.d,
            "dtype": [M.dtype_name(t) for t in args.dtype],
            "modes": modes,
            "scale": args.scale,
        },
        "impls": [{"label": i.label, "note": i.note} for i in impls],
    }
    out = Path(args.out)
    csv_path, json_path = M.write_outputs(out, args.name, COLUMNS, runner.rows, payload)
    mem_cols = (
        [("peak_allocated_mib", "peak MiB"), ("extra_over_inputs_mib", "extra MiB")]
        if device.type == "cuda"
        else [("rss_peak_delta_mib", "RSS+ MiB")]
    )
    print(
        M.format_table(
            runner.rows,
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
                ("time_ms_p20", "p20 ms"),
                ("time_ms_p80", "p80 ms"),
                ("tflops", "TFLOP/s"),
                *mem_cols,
                ("check", "check"),
            ],
        )
    )
    print(
        f"\ndevice: {meta['device_name']}; timer: {meta['timer']}; "
        f"TFLOP/s at p50 with the formula in column flop_formula"
    )
    written = [csv_path, json_path]
    if not args.no_plot:
        png = M.plot_bench(
            runner.rows,
            out / f"{args.name}.png",
            f"gammacl.bench on {meta['device_name']} ({meta['date_utc']})",
        )
        if png is None:
            print("no PNG: matplotlib is not installed (pip install 'gammacl[plot]') or no ok rows")
        else:
            written.append(png)
    print("wrote " + ", ".join(str(p) for p in written) + f" in {wall:.1f} s")
    bad = [c for c in runner.checks.values() if c["check"] in ("MISMATCH", "error")]
    for c in bad:
        print(
            f"!!! CHECK {c['check']}: {c['label']} at {c['shape']}: {c['value']} vs reference "
            f"{c['reference']} -- not a like-for-like comparison",
            file=sys.stderr,
        )
    return 1 if bad else 0


def _first_backend(impls: list[M.Impl], loss: str) -> str | None:
    for i in impls:
        if i.impl == "gammacl" and i.loss == loss:
            return i.backend
    return None


if __name__ == "__main__":
    sys.exit(main())
