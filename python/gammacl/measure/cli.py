"""Command-line pieces shared by `python -m gammacl.bench` and `python -m gammacl.profile`:
constants, argument types, the common options, device resolution, the CPU thread count, the
entry point wrapper (`run_cli`) and the injected-OOM test hook."""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gammacl.dispatch import BACKENDS

MIB = float(2**20)
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
}
# the leading columns of a bench / profile row: which case it measures
CASE_COLUMNS = ("impl", "loss", "backend", "N", "D", "dtype", "mode")
OUR_BACKENDS = BACKENDS[1:]


def case_row(
    columns: Sequence[str], impl: Any, n: int, d: int, dtype: torch.dtype, mode: str
) -> dict[str, Any]:
    """A row of `columns`, all None but the CASE_COLUMNS of impl (registry.Impl) at this case."""
    row: dict[str, Any] = dict.fromkeys(columns)
    row.update(impl=impl.impl, loss=impl.loss, backend=impl.backend, N=n, D=d,
               dtype=dtype_name(dtype), mode=mode)  # fmt: skip
    return row  # every backend record (gammacl.dispatch.RECORDS) but "auto"


PEERS = (
    "naive",
    "naive_compiled",
    "open_clip",
    "open_clip_siglip",
    "memeff",
    "inf_cl",
    "siglip_kernel",
    "gemm_floor",
    "gemm_gram",
)
IMPL_NAMES = ("gammacl",) + PEERS
DEFAULT_SCALE = 1.0 / 0.07  # CLIP's initial exponentiated logit scale


def dtype_name(dtype: torch.dtype) -> str:
    return {
        torch.float32: "fp32",
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float64: "fp64",
    }[dtype]


def acc_bytes(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> list[int]:
    out = []
    for t in csv_list(text):
        v = int(float(t))
        if v < 1:
            raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {t!r}")
        out.append(v)
    return out


def dtype_list(text: str) -> list[torch.dtype]:
    out = []
    for t in csv_list(text):
        if t not in DTYPES:
            raise argparse.ArgumentTypeError(
                f"unknown dtype {t!r}; choose from fp32,bf16,fp16,fp64"
            )
        out.append(DTYPES[t])
    return out


def parser(tool: str, doc: str | None) -> argparse.ArgumentParser:
    """`python -m gammacl.<tool>`'s parser: its module docstring as the help, the common options
    (add_common_args) with output name `tool`."""
    p = argparse.ArgumentParser(
        prog=f"python -m gammacl.{tool}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p, default_name=tool)
    return p


def add_common_args(p: argparse.ArgumentParser, *, default_name: str) -> None:
    p.add_argument("--out", default=".", help="output directory (created); default: current dir")
    p.add_argument(
        "--name",
        default=default_name,
        help=f"file stem: NAME.csv, NAME.json, NAME.png (default {default_name})",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:K, cpu")
    p.add_argument("--n", type=int_list, default=None, help="batch sizes N, comma separated")
    p.add_argument("--d", type=int_list, default=None, help="feature dims D, comma separated")
    p.add_argument("--dtype", type=dtype_list, default=None, help="fp32,bf16,fp16,fp64")
    p.add_argument("--loss", default="all", help="comma list of loss names, or all")
    p.add_argument(
        "--backend",
        default="all",
        help="gammacl backends: comma list of torch,cpp,triton,cuda,reference or all "
        "(all = every backend available on the device)",
    )
    p.add_argument(
        "--impl",
        default="all",
        help="implementations: gammacl and the peers "
        + ",".join(PEERS)
        + "; comma list, or all (peers only when installed)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=DEFAULT_SCALE,
        help="exponentiated logit scale (default 1/0.07)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="small sweep (under a minute on 2 idle CPU cores)"
    )
    p.add_argument(
        "--no-plot", action="store_true", help="skip the PNG even if matplotlib is there"
    )
    p.add_argument("--note", default="", help="free text stored in the metadata (e.g. the host)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=quick_default("CPU: torch.set_num_threads for the run", 1, "torch's default")
        + ". One thread keeps small shapes stable on a shared host, where idle OpenMP threads "
        "wait on descheduled ones",
    )
    # test hook: rows whose label contains SUBSTR and whose N >= NMIN raise torch.OutOfMemoryError
    p.add_argument("--inject-oom", default=None, metavar="[SUBSTR:]NMIN", help=argparse.SUPPRESS)


def quick_default(what: str, quick: object, full: object) -> str:
    """The help of an option that defaults to None and is resolved at run time: to `quick` with
    --quick, else to `full`."""
    return f"{what} (default {quick} with --quick, else {full})"


def resolve_device(arg: str) -> torch.device:
    if arg == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    dev = torch.device(arg)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {arg}: no CUDA device (torch.cuda.is_available() is False)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise SystemExit(f"--device must be cpu or cuda[:K], got {arg!r}")
    return dev


@contextlib.contextmanager
def cpu_threads(args: argparse.Namespace):
    """torch.set_num_threads(--threads) for a CPU run (1 by default with --quick), restored on
    exit so an in-process caller keeps its setting. The count used is in the metadata."""
    before = torch.get_num_threads()
    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    n = args.threads
    if n is None and on_cpu and args.quick:
        n = 1
    if n is not None and on_cpu:
        torch.set_num_threads(max(1, n))
        log(f"gammacl: CPU threads: torch.set_num_threads({max(1, n)}) (default {before})")
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def frozen_gc():
    """gc.freeze() the heap built by the imports (torch, triton: ~0.5 s per full collection on
    a busy 2-core host) so the per-row collections only scan new objects; unfrozen on exit so
    interpreter shutdown collects everything."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_cli(
    tool: str,
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    run: Callable[[argparse.Namespace, torch.device], int],
    *,
    interpreter_refusal: str,
) -> int:
    """The entry point of both CLIs: parse argv, freeze the import heap for gc, set the CPU
    thread count (`cpu_threads`), resolve --device, then run(args, device). On CUDA under
    TRITON_INTERPRET=1 (every Triton kernel would run in the CPU interpreter) the run is refused
    with `interpreter_refusal`. A SystemExit carrying a message (that refusal, unknown --device /
    --impl / --loss / --backend / --mode, nothing to run) is logged as 'TOOL: message' and gives
    exit code 2."""
    from gammacl.dispatch import interpreter_on

    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    with frozen_gc(), cpu_threads(args):
        try:
            device = resolve_device(args.device)
            if device.type == "cuda" and interpreter_on():
                raise SystemExit(interpreter_refusal)
            return run(args, device)
        except SystemExit as exc:
            if not isinstance(exc.code, str):
                raise
            log(f"{tool}: {exc.code}")
            return 2


class InjectOOM:
    """Test hook: `[SUBSTR:]NMIN` raises torch.OutOfMemoryError for rows whose label contains
    SUBSTR (any row when omitted) and whose N >= NMIN, after their inputs are allocated."""

    def __init__(self, spec: str | None) -> None:
        self.substr, self.nmin = "", None
        if spec:
            sub, _, n = spec.rpartition(":")
            self.substr, self.nmin = sub, int(n)

    def check(self, label: str, n: int) -> None:
        if self.nmin is not None and n >= self.nmin and self.substr in label:
            raise torch.OutOfMemoryError(
                f"injected OOM (--inject-oom {self.substr + ':' if self.substr else ''}"
                f"{self.nmin}) for {label} N={n}"
            )
