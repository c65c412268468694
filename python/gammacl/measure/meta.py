"""Run metadata (device, versions, commit, date, host), the tidy CSV / JSON files and the
plain-text tables both CLIs print."""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gammacl.measure.memory import MIB, meminfo_mib
from gammacl.measure.nvml import NvmlView
from gammacl.measure.timing import timer_name


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def collect_metadata(
    device: torch.device,
    args: argparse.Namespace,
    *,
    nvml: NvmlView | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    import gammacl
    from gammacl.dispatch import interpreter_on

    meta: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": None,
        "device_uuid": None,
        "device_capacity_mib": None,
        "driver": nvml.driver if nvml is not None else None,
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": version("triton"),
        "gammacl": getattr(gammacl, "__version__", None),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "host_mem_total_mib": meminfo_mib("MemTotal"),
        "timer": timer_name(device),
        "triton_interpret": interpreter_on(),
        "env": {
            k: os.environ[k]
            for k in (
                "GAMMACL_BACKEND",
                "GAMMACL_CHUNK_MIB",
                "OMP_NUM_THREADS",
                "CUDA_VISIBLE_DEVICES",
                "TRITON_INTERPRET",
            )
            if k in os.environ
        },
        "argv": sys.argv[1:] if getattr(args, "_argv", None) is None else args._argv,
        "quick": bool(getattr(args, "quick", False)),
        "note": getattr(args, "note", ""),
        "matplotlib": version("matplotlib"),
        "nvidia_ml_py": version("nvidia-ml-py"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(
            device_name=props.name,
            device_uuid=str(props.uuid),
            device_capacity_mib=props.total_memory / MIB,
        )
    else:
        meta["device_name"] = f"{cpu_model()} ({os.cpu_count()} logical CPUs)"
    meta.update(extra or {})
    return meta


def _fmt_csv(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return v


class RowSink:
    """OUT/NAME.csv written row by row as each is measured (header first, flushed per row), so a
    run killed by a timeout keeps every row it measured; write_outputs rewrites the file whole
    at the end (with the flags set after the sweep) beside NAME.json."""

    def __init__(self, out_dir: Path, name: str, columns: Sequence[str]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.columns = list(columns)
        self.path = out_dir / f"{name}.csv"
        with open(self.path, "w", newline="") as fh:
            csv.writer(fh).writerow(self.columns)

    def add(self, row: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([_fmt_csv(row.get(c)) for c in self.columns])


def write_outputs(
    out_dir: Path, name: str, columns: Sequence[str], rows: list[dict], payload: dict[str, Any]
) -> tuple[Path, Path]:
    """NAME.csv (tidy rows, empty cell = null) and NAME.json ({metadata..., rows}) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{name}.csv", out_dir / f"{name}.json"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r in rows:
            w.writerow([_fmt_csv(r.get(c)) for c in columns])
    body = dict(payload)
    body["columns"] = list(columns)
    body["rows"] = [{c: _json_value(r.get(c)) for c in columns} for r in rows]
    with open(json_path, "w") as fh:
        json.dump(body, fh, indent=1, default=str)
        fh.write("\n")
    return csv_path, json_path


def format_table(rows: list[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Plain-text table; None shows as '-'. columns: (key, header)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (_, h), w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)
