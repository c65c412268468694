"""`python -m gammacl.profile`: peak memory per batch size and the largest N that fits.

For each implementation (a gammacl loss x backend, the naive materialised loss, installed peers)
one step (default fwd+bwd) is measured per N in two views that are never mixed:
  * torch allocator (CUDA): peak allocated / reserved, and the delta over inputs + grads;
  * device (NVML, nvidia-ml-py): device used memory sampled on a thread during the step (the
    torch device is matched to the NVML handle by UUID); includes the CUDA context and other
    processes.
On a CPU-only machine both are null (never 0) and the process peak RSS (VmHWM, reset before each
step) is reported instead. The analytic expectation sits beside each measured figure. The
largest N that fits is found by doubling then bisection (OOM caught; on CPU "fits" means the RSS
delta stays under --budget-mib, and a point whose analytic expectation exceeds the budget is not
run). Writes OUT/NAME.csv, OUT/NAME.json and OUT/NAME.png (log-log peak memory vs N, with the
device capacity or CPU budget as a line). Rows go to NAME.csv as they are measured (a killed run
keeps them); the summary printed first says, per implementation, whether "largest N" is a
measured limit or only the search cap. A requested backend that cannot run here gives a row
with status=unavailable while the others run; any gammacl row with status=error makes the exit
code 1.

    python -m gammacl.profile --quick --out results
    python -m gammacl.profile --loss clip --backend triton --d 512 --dtype bf16 --snapshot
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gammacl.measure import cli, inputs, memory, meta, plots, select, summary, timing
from gammacl.measure.nvml import NvmlView, open_nvml
from gammacl.measure.registry import Impl

COLUMNS = (
    *cli.CASE_COLUMNS,
    "phase",
    "status",
    "error",
    "fits",
    "memory_view",
    "inputs_mib",
    "grads_mib",
    "torch_peak_allocated_mib",
    "torch_peak_reserved_mib",
    "torch_delta_mib",
    "nvml_used_before_mib",
    "nvml_used_peak_mib",
    "nvml_delta_mib",
    "nvml_sample_ms",
    "nvml_samples",
    "rss_peak_mib",
    "rss_delta_mib",
    "expected_extra_mib",
    "expected_formula",
    "limit_mib",
    "device",
)
# CUDA under TRITON_INTERPRET=1: refused (cli.run_cli)
_INTERPRETER_REFUSAL = (
    "refusing to run on CUDA with TRITON_INTERPRET=1 set (Triton kernels would run in the "
    "interpreter). Unset TRITON_INTERPRET."
)

_CLI_PROCESS = False  # True when run as `python -m gammacl.profile`
PRECHECK = 2.0  # CPU: points whose analytic memory exceeds PRECHECK x --budget-mib are not run


def search_max_n(
    fits: Callable[[int], bool],
    *,
    known_ok: int | None,
    known_fail: int | None,
    start: int,
    cap: int,
    align: int = 8,
    rel_tol: float = 1 / 32,
) -> tuple[int | None, int | None, bool]:
    """Largest N with fits(N): double from the largest known fit until a failure or `cap`, then
    bisect (midpoints rounded down to multiples of `align`) until the gap is <= max(align,
    rel_tol * lo). Returns (largest fit, smallest failure, capped); capped means no failure
    was seen up to `cap`."""
    lo, hi = known_ok, known_fail
    if lo is None:
        n = min(start, cap) if hi is None else hi // 2
        while n >= 1:
            if fits(n):
                lo = n
                break
            hi, n = n, n // 2
        if lo is None:
            return None, hi, False
    while hi is None:
        if lo >= cap:
            return lo, None, True
        n = min(2 * lo, cap)
        if fits(n):
            lo = n
        else:
            hi = n
    while hi - lo > max(align, int(rel_tol * lo)):
        mid = (lo + hi) // 2 // align * align
        if mid <= lo:
            mid = (lo + hi) // 2
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi, False


# defaults of the options left None (_defaults): --n-max per device type (with --quick, without);
# the CPU --budget-mib, with --quick or else a share of MemAvailable under a cap
N_MAX = {"cpu": (4096, 32768), "cuda": (262144, 2097152)}
BUDGET_MIB_QUICK, BUDGET_MIB_CAP, BUDGET_SHARE = 256.0, 2048.0, 0.25


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("profile", __doc__)
    p.set_defaults(loss="clip")
    p.add_argument("--mode", default="fwd+bwd", choices=cli.MODES)
    p.add_argument("--no-search", action="store_true", help="only the --n sweep")
    cpu, gpu = N_MAX["cpu"], N_MAX["cuda"]
    for flag, kind, what, quick, full in (  # resolved by _defaults
        ("--n-max", int, "cap of the largest-N search", f"CPU {cpu[0]} / GPU {gpu[0]}",
         f"CPU {cpu[1]} / GPU {gpu[1]}"),
        ("--budget-mib", float, "CPU only: memory budget defining 'fits'", f"{BUDGET_MIB_QUICK:g}",
         f"min({BUDGET_MIB_CAP:g}, {100 * BUDGET_SHARE:g}%% of MemAvailable)"),
    ):  # fmt: skip
        p.add_argument(flag, type=kind, default=None, help=cli.quick_default(what, quick, full))
    p.add_argument("--sample-ms", type=float, default=2.0, help="NVML sampling period")
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="CUDA: dump a torch.cuda.memory snapshot (_record_memory_history) of "
        "the largest N that fits, per implementation",
    )
    return p


def _defaults(args: argparse.Namespace, device: torch.device) -> None:
    gpu = device.type == "cuda"
    if args.n is None:
        lo, hi = (
            ((4096, 65536) if args.quick else (4096, 262144))
            if gpu
            else ((256, 4096) if args.quick else (256, 8192))
        )
        args.n, n = [], lo
        while n <= hi:
            args.n.append(n)
            n *= 4 if args.quick else 2
    if args.d is None:
        args.d = [512] if gpu else [64]
    if args.dtype is None:
        args.dtype = [torch.bfloat16] if gpu else [torch.float32]
    if args.n_max is None:
        args.n_max = N_MAX[device.type][0 if args.quick else 1]
    if not gpu and args.budget_mib is None:
        avail = memory.meminfo_mib("MemAvailable") or 8192.0
        args.budget_mib = (
            BUDGET_MIB_QUICK if args.quick else min(BUDGET_MIB_CAP, BUDGET_SHARE * avail)
        )


class Profiler:
    def __init__(self, args: argparse.Namespace, device: torch.device, nvml: NvmlView):
        self.args, self.device, self.nvml = args, device, nvml
        self.inject = cli.InjectOOM(args.inject_oom)
        self.rows: list[dict[str, Any]] = []
        self.sink = meta.RowSink(Path(args.out), args.name, COLUMNS)
        self.capacity = memory.device_capacity(device)
        self.limit_mib = self.capacity / cli.MIB if self.capacity else args.budget_mib
        self.t0 = time.perf_counter()

    def _view(self) -> str:
        if self.device.type == "cuda":
            return "torch+nvml" if self.nvml.ok else "torch"
        return "rss"

    def probe(
        self,
        impl: Impl,
        n: int,
        d: int,
        dtype: torch.dtype,
        phase: str,
        snapshot: Path | None = None,
    ) -> dict[str, Any]:
        a = self.args
        exp_b, exp_f = impl.expected(n, d, dtype, a.mode)
        row = cli.case_row(COLUMNS, impl, n, d, dtype, a.mode)
        row.update(
            phase=phase,
            memory_view=self._view(),
            device=self.device.type,
            expected_extra_mib=None if exp_b is None else exp_b / cli.MIB,
            expected_formula=exp_f,
            limit_mib=self.limit_mib,
            label=impl.label,
        )
        if self.nvml.ok:
            row["nvml_sample_ms"] = a.sample_ms
        if impl.unavailable:
            row.update(status="unavailable", fits=False, error=impl.unavailable)
            return self._done(row)
        # on a (shared) CPU host never allocate far past the budget: skip a point whose
        # analytic expectation exceeds PRECHECK x budget; in between, measure and decide
        if (
            self.device.type == "cpu"
            and exp_b is not None
            and exp_b / cli.MIB > PRECHECK * a.budget_mib
        ):
            row.update(
                status="skipped",
                fits=False,
                error=f"analytic {exp_b / cli.MIB:.0f} MiB > {PRECHECK:g} x --budget-mib "
                f"{a.budget_mib:g} (not run on CPU)",
            )
            return self._done(row)
        feats = step = fn = None
        try:
            feats = inputs.Features(n, d, dtype, self.device, a.seed, a.scale)
            step = impl.build(feats)
            self.inject.check(impl.label, n)
            fn = step.prepare(a.mode)
            grads = feats.grads_bytes() if a.mode != "fwd" else 0
            row["inputs_mib"] = feats.grads_bytes() / cli.MIB
            row["grads_mib"] = grads / cli.MIB
            if snapshot is not None:
                torch.cuda.memory._record_memory_history(max_entries=200_000)
            try:
                mem = memory.measure_memory(
                    fn, step, self.device, nvml=self.nvml, sample_ms=a.sample_ms
                )
            finally:
                if snapshot is not None:
                    torch.cuda.memory._dump_snapshot(str(snapshot))
                    torch.cuda.memory._record_memory_history(enabled=None)
            if self.device.type == "cuda":
                base = mem["base_allocated"]
                row.update(
                    torch_peak_allocated_mib=mem["peak_allocated"] / cli.MIB,
                    torch_peak_reserved_mib=mem["peak_reserved"] / cli.MIB,
                    torch_delta_mib=memory.delta_mib(mem["peak_allocated"], base, grads),
                )
                if mem["nvml_peak"] is not None:
                    row.update(
                        nvml_used_before_mib=mem["nvml_before"] / cli.MIB,
                        nvml_used_peak_mib=mem["nvml_peak"] / cli.MIB,
                        nvml_delta_mib=(mem["nvml_peak"] - mem["nvml_before"]) / cli.MIB,
                        nvml_samples=mem["nvml_samples"],
                    )
                row["status"], row["fits"] = "ok", True
            else:
                if mem["rss_peak"] is not None:
                    row["rss_peak_mib"] = mem["rss_peak"] / cli.MIB
                    if mem["rss_reset"]:
                        row["rss_delta_mib"] = memory.delta_mib(
                            mem["rss_peak"], mem["rss_before"], grads
                        )
                over = row["rss_delta_mib"] is not None and row["rss_delta_mib"] > a.budget_mib
                row["status"], row["fits"] = ("over budget", False) if over else ("ok", True)
                if over:
                    row["error"] = (
                        f"RSS delta {row['rss_delta_mib']:.0f} MiB > --budget-mib {a.budget_mib:g}"
                    )
        except Exception as exc:
            row["status"], row["error"] = timing.classify_error(exc)
            row["fits"] = False
            del exc
        finally:
            fn = step = feats = None
            timing.free_memory(self.device)
        return self._done(row)

    def _done(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        self.sink.add(row)
        mem = row["torch_delta_mib"] if self.device.type == "cuda" else row["rss_delta_mib"]
        what = f"{mem:.1f} MiB" if mem is not None else "-"
        if row["expected_extra_mib"] is not None:
            what += f" (analytic {row['expected_extra_mib']:.1f})"
        if row["status"] != "ok":
            what += f" {row['status']}: {row['error']}"
        cli.log(
            f"[{row['phase']}] {row['label']} N={row['N']}: {what}  "
            f"({time.perf_counter() - self.t0:.1f} s)"
        )
        return row

    def warm(self, impl: Impl, d: int, dtype: torch.dtype) -> None:
        """One small untimed step so library loading and one-time workspaces are not counted."""
        try:
            f = inputs.Features(64, d, dtype, self.device, self.args.seed, self.args.scale)
            s = impl.build(f)
            s.prepare(self.args.mode)()
        except Exception:
            pass  # the measured points report the error
        timing.free_memory(self.device)


def _summary(impl: Impl, rows: list[dict], res: tuple, capped: bool, limit: str) -> dict:
    lo, hi, _ = res
    at = next((r for r in rows if r["N"] == lo and r["status"] == "ok"), None) if lo else None
    fail = next((r for r in rows if r["N"] == hi), None) if hi else None
    return {
        "label": impl.label,
        "impl": impl.impl,
        "loss": impl.loss,
        "backend": impl.backend,
        "max_n_fits": lo,
        "first_fail_n": hi,
        "search_capped": capped,
        "unavailable": impl.unavailable,
        "limit": limit,
        "fail_reason": None if fail is None else f"{fail['status']}: {fail['error']}",
        "measured_mib_at_max": None
        if at is None
        else (at["torch_delta_mib"] if at["memory_view"] != "rss" else at["rss_delta_mib"]),
        "expected_mib_at_max": None if at is None else at["expected_extra_mib"],
    }


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(
        "gammacl.profile", _parser(), argv, _run, interpreter_refusal=_INTERPRETER_REFUSAL
    )


def _run(args: argparse.Namespace, device: torch.device) -> int:
    _defaults(args, device)
    if device.type == "cpu" and _CLI_PROCESS:
        # process-wide and permanent: only in the CLI process, never for an in-process main()
        memory.pin_malloc_mmap_threshold()
    nvml = open_nvml(device)
    views: dict[str, Any] = {
        "torch_allocator": {
            "available": device.type == "cuda",
            "reason": None if device.type == "cuda" else "no CUDA device",
        },
        "nvml": {
            "available": nvml.ok,
            "error": nvml.error,
            "handle": nvml.where or None,
            "sample_ms": args.sample_ms if nvml.ok else None,
        },
        "rss": {
            "available": device.type == "cpu",
            "resettable": memory.reset_peak_rss() if device.type == "cpu" else None,
            "malloc_mmap_threshold_pinned": memory.MALLOC_PINNED if device.type == "cpu" else None,
        },
    }
    if device.type == "cpu":
        cli.log(
            "gammacl.profile: no CUDA device (torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}): the torch allocator view is unavailable; reporting "
            "the process peak RSS (VmHWM) instead. GPU memory columns are null, not 0."
        )
        if not memory.MALLOC_PINNED:
            cli.log(
                "gammacl.profile: glibc's mmap threshold is not pinned (in-process call): "
                "buffers reused from the malloc heap are not counted in RSS deltas."
            )
        cli.log(
            f"gammacl.profile: on CPU 'fits' means the RSS delta stays under --budget-mib "
            f"{args.budget_mib:g} MiB (no device capacity); search capped at N={args.n_max}."
        )
    if not nvml.ok:
        cli.log(f"gammacl.profile: no NVML device view: {nvml.error}. NVML columns are null.")
    else:
        cli.log(
            f"gammacl.profile: NVML matched by UUID to {nvml.where}; used memory sampled "
            f"every {args.sample_ms:g} ms (includes the CUDA context and other processes)"
        )
    if args.snapshot and device.type != "cuda":
        cli.log(
            "gammacl.profile: --snapshot needs a CUDA device (torch.cuda.memory "
            "_record_memory_history); no snapshot written."
        )
    impls, notes = select.select_impls(args, device, for_profile=True)
    if not impls:
        raise SystemExit("nothing to run (check --impl / --loss / --backend)")
    for note in notes:
        cli.log(f"gammacl.profile: note: {note}")

    prof = Profiler(args, device, nvml)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limit = (
        f"device capacity {prof.limit_mib:.0f} MiB"
        if device.type == "cuda"
        else f"CPU budget {args.budget_mib:g} MiB (--budget-mib)"
    )
    summaries, snapshots = [], []
    ns = sorted(set(args.n))
    for impl in impls:
        for dt in args.dtype:
            if impl.dtypes is not None and dt not in impl.dtypes:
                notes.append(f"{impl.label} skipped for {cli.dtype_name(dt)}: unsupported dtype")
                continue
            for d in args.d:
                if not impl.unavailable:
                    prof.warm(impl, d, dt)
                points = ns[:1] if impl.unavailable else ns  # one row saying why
                sweep = [prof.probe(impl, n, d, dt, "sweep") for n in points]
                fits = [r["N"] for r in sweep if r["fits"]]
                fails = [r["N"] for r in sweep if not r["fits"]]
                known_ok = max((n for n in fits if not fails or n < min(fails)), default=None)
                known_fail = min(fails, default=None)
                if args.no_search or impl.unavailable:
                    res, capped = (known_ok, known_fail, False), False
                else:

                    def fits_fn(n: int, impl=impl, d=d, dt=dt) -> bool:
                        return bool(prof.probe(impl, n, d, dt, "search")["fits"])

                    res = search_max_n(
                        fits_fn,
                        known_ok=known_ok,
                        known_fail=known_fail,
                        start=ns[0],
                        cap=max(args.n_max, ns[-1]),
                        rel_tol=1 / 16 if args.quick else 1 / 32,
                    )
                    capped = res[2]
                rows = [
                    r
                    for r in prof.rows
                    if r["label"] == impl.label and r["D"] == d and r["dtype"] == cli.dtype_name(dt)
                ]
                s = _summary(impl, rows, res, capped, limit)
                s.update(D=d, dtype=cli.dtype_name(dt))
                s["largest_n"] = summary.largest_n_text(s, cap=max(args.n_max, ns[-1]))
                summaries.append(s)
                if args.snapshot and device.type == "cuda" and res[0]:
                    path = (
                        out / f"{args.name}-snapshot-{impl.impl}-{impl.loss}-{impl.backend}"
                        f"-N{res[0]}.pickle"
                    )
                    prof.probe(impl, res[0], d, dt, "snapshot", snapshot=path)
                    snapshots.append(str(path))
    wall = time.perf_counter() - prof.t0

    info = meta.collect_metadata(device, args, nvml=nvml, extra={"wall_s": round(wall, 1)})
    payload = {
        "tool": "gammacl.profile",
        "metadata": info,
        "views": views,
        "notes": notes,
        "limit": limit,
        "limit_mib": prof.limit_mib,
        "summary": summaries,
        "snapshots": snapshots,
        "sweep": {
            "N": ns,
            "D": args.d,
            "dtype": [cli.dtype_name(t) for t in args.dtype],
            "mode": args.mode,
            "n_max": args.n_max,
            "budget_mib": args.budget_mib,
        },
    }
    csv_path, json_path = meta.write_outputs(out, args.name, COLUMNS, prof.rows, payload)
    gpu = device.type == "cuda"
    cols = [
        ("impl", "impl"),
        ("loss", "loss"),
        ("backend", "backend"),
        ("N", "N"),
        ("phase", "phase"),
        ("status", "status"),
        ("fits", "fits"),
    ]
    cols += (
        [
            ("torch_peak_allocated_mib", "alloc MiB"),
            ("torch_peak_reserved_mib", "reserved"),
            ("torch_delta_mib", "delta MiB"),
            ("nvml_delta_mib", "NVML delta"),
        ]
        if gpu
        else [("rss_peak_mib", "RSS MiB"), ("rss_delta_mib", "RSS delta MiB")]
    )
    cols += [("expected_extra_mib", "analytic MiB")]
    print("\n".join(summary.profile_summary(summaries, cap=max(args.n_max, ns[-1]))) + "\n")
    print(meta.format_table(prof.rows, cols))
    print()
    print(
        meta.format_table(
            summaries,
            [
                ("label", "implementation"),
                ("D", "D"),
                ("dtype", "dtype"),
                ("largest_n", "largest N fits"),
                ("measured_mib_at_max", "MiB at max"),
                ("expected_mib_at_max", "analytic"),
                ("fail_reason", "why it stopped"),
            ],
        )
    )
    view = (
        "torch allocator" + (" + NVML" if nvml.ok else "")
        if gpu
        else "process peak RSS (no CUDA device)"
    )
    print(f"\ndevice: {info['device_name']}; memory view: {view}; limit: {limit}")
    if not nvml.ok:
        print(f"NVML: unavailable ({nvml.error})")
    written = [csv_path, json_path]
    if not args.no_plot:
        png = plots.plot_profile(
            prof.rows,
            out / f"{args.name}.png",
            ycol="torch_peak_allocated_mib" if gpu else "rss_delta_mib",
            capacity_mib=prof.limit_mib,
            capacity_label="device capacity" if gpu else "CPU budget (--budget-mib)",
            absolute=gpu,
            title=f"gammacl.profile {args.mode} on {info['device_name']} ({info['date_utc']})",
        )
        if png is None:
            print("no PNG: matplotlib is not installed (pip install 'gammacl[plot]')")
        else:
            written.append(png)
    written += snapshots
    print("wrote " + ", ".join(str(p) for p in written) + f" in {wall:.1f} s")
    errors = [r for r in prof.rows if r["impl"] == "gammacl" and r["status"] == "error"]
    if errors:
        e = errors[0]
        print(
            f"!!! {len(errors)} gammacl rows failed with an error, e.g. {e['label']} "
            f"N={e['N']}: {e['error']}",
            file=sys.stderr,
        )
    return 1 if errors else 0


if __name__ == "__main__":
    _CLI_PROCESS = True
    sys.exit(main())
