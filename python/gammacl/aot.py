"""Ahead-of-time compile check of every Triton kernel configuration the launchers choose.

    python -m gammacl.aot [--arch 90|80] [--autotune] [--json FILE] [--op NAME] [--dtype fp16]

No GPU or driver is needed: the real Triton compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin with
the ptxas bundled in the triton wheel) runs for a GPUTarget("cuda", arch, 32).

How the configurations are found: the public launchers are called on small CPU tensors with
JITFunction.run patched to RECORD each `kernel[grid](...)` (the bound arguments, constexprs,
num_warps, num_stages after triton.heuristics) instead of launching. So the check sees exactly
what the launchers pick: per dtype, per D (small-D single chunk and large-D chunked paths), per
flag combination (exclude, cols, grad, the deterministic two-launch path, the fp16 W scaling,
the fp32 tf32 opt-in). Ops: the table below (simlse, gamma_onepass) plus every module of
gammacl.kernels that defines `aot_launches(dtype, d)` (calls its launchers in every flag
combination). `--autotune` re-imports the kernel modules with GAMMACL_AUTOTUNE=1 and records
every config of each triton.autotune list that its early prune keeps (rows carry "autotune").

Each op is also recorded a second time with ROWS_MULTI rows and a tiny chunk budget
(GAMMACL_TRITON_CHUNK_MIB), so the chunked large-D launchers make several chunks and the
accumulating dB GEMM (_gemm_kernel ACCUM=1) is compiled too (rows carry "multi_chunk").

Identical compiles (same kernel, signature, int specialisation, constexprs, options) run once.
Each row reports ok or the compiler's error, registers and spill stores / loads (ptxas -v),
shared memory (the compiled metadata), the MMA instruction in the PTX (wgmma / mma.sync /
none), `wgmma_serialized` (ptxas warning C7515, "wgmma.mma_async instructions are serialized":
each wgmma waits for the previous one, far below tensor-core rate) and `ctas_per_sm` (resident
CTAs per SM from registers, shared memory and warps: `ctas_per_sm`). Exit status 1 when any
compile fails or when a default (not autotune) 16-bit config serialises its wgmma. Works with
triton 3.6 and 3.9 (the same private entry points the JIT uses: create_function_from_signature,
JITFunction._pack_args, compile).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
D_VALUES = (64, 256, 1024)  # small-D (one register chunk) and large-D (chunked) paths
ROWS = 64  # M = N of the recorded launches (a multiple of 16, as in training batches)
# the multi-chunk pass: M = N = ROWS_MULTI under a chunk budget that gives the smallest chunk (one
# row tile: 128 rows for 16-bit, 64 for fp32), i.e. 2 to 4 chunks
ROWS_MULTI = 256
MULTI_CHUNK_MIB = "1e-9"

# Per-SM limits: registers, shared memory (bytes), threads, CTAs, and the shared memory the
# driver reserves per CTA (CUDA occupancy calculator values for CC 8.0 / 9.0).
SM_LIMITS = {
    80: dict(regs=65536, smem=167936, threads=2048, ctas=32, smem_reserved=1024),
    90: dict(regs=65536, smem=233472, threads=2048, ctas=32, smem_reserved=1024),
}
_C7515 = re.compile(r"C7515|wgmma\.mma_async instructions are serialized")


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int, arch: int = 90) -> int:
    """Resident CTAs per SM: registers are allocated per warp in units of 256 (regs/thread
    rounded up to 8), so min(regs / (warps * ceil(32 regs / 256) * 256), smem / (smem + 1 KiB
    reserved), 2048 threads / (32 warps), 32). E.g. sm_90, 8 warps: 128 regs -> 65536 / (8 *
    4096) = 2; 129-255 regs -> 1."""
    lim = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = lim["regs"] // per_warp // num_warps
    by_smem = lim["smem"] // (shared_bytes + lim["smem_reserved"])
    by_threads = lim["threads"] // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, lim["ctas"]))


def wgmma_serialized(ptxas_log: str) -> bool:
    """Whether ptxas warned C7515 (wgmma.mma_async instructions are serialized)."""
    return bool(_C7515.search(ptxas_log))


# ----------------------------------------------------------------------------------------------
# the launch table: ops whose kernel files do not define aot_launches themselves
# ----------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _simlse_launches(dtype: torch.dtype, d: int) -> None:
    """simlse_fwd (exclude x cols) and simlse_bwd (exclude x cols: both halves of W), with a
    0-d scale and with vector scales ([M] row, [N] column: IS_VEC)."""
    from gammacl.kernels import simlse

    m = n = ROWS
    a, b = torch.zeros(m, d, dtype=dtype), torch.zeros(n, d, dtype=dtype)
    scale = torch.tensor(1.0, dtype=_acc(dtype))
    rs, cs = torch.ones(m, dtype=_acc(dtype)), torch.ones(n, dtype=_acc(dtype))
    for vec in (False, True):
        for exclude in (False, True):
            for cols in (False, True):
                sc, col_sc = (rs, cs if cols else None) if vec else (scale, None)
                simlse.simlse_fwd(a, b, sc, 0, exclude, cols, col_sc)
                vm, vn = (
                    torch.zeros(m, dtype=_acc(dtype)),
                    torch.zeros(n if cols else 0, dtype=_acc(dtype)),
                )
                simlse.simlse_bwd(a, b, sc, vm, vn, vm, vn, 0, exclude, cols, col_sc)


@contextlib.contextmanager
def _deterministic(on: bool):
    was = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def _gamma_onepass_launches(dtype: torch.dtype, d: int) -> None:
    """gamma_onepass_fwd: grad on/off x atomic (cols) / deterministic two-launch path."""
    from gammacl.kernels import gamma_onepass

    m = n = ROWS
    a, b = torch.zeros(m, d, dtype=dtype), torch.zeros(n, d, dtype=dtype)
    acc = _acc(dtype)
    scale, ar, ac = (
        torch.tensor(1.0, dtype=acc),
        torch.zeros(m, dtype=acc),
        torch.zeros(n, dtype=acc),
    )
    for grad in (False, True):
        for det in (False, True):
            with _deterministic(det):
                gamma_onepass.gamma_onepass_fwd(a, b, scale, ar, ac, 0.5, 0.5, 30.0, 0, grad)


TABLE: dict[str, Callable[[torch.dtype, int], None]] = {
    "gammacl.kernels.simlse": _simlse_launches,
    "gammacl.kernels.gamma_onepass": _gamma_onepass_launches,
}


def discover(extra: tuple[str, ...] = ()) -> dict[str, Callable[[torch.dtype, int], None]]:
    """{module name: aot_launches}: every gammacl.kernels module defining aot_launches, the
    table for the others, and the `extra` modules (which must define aot_launches)."""
    import gammacl.kernels as pkg

    ops: dict[str, Callable] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        name = f"{pkg.__name__}.{info.name}"
        fn = getattr(importlib.import_module(name), "aot_launches", None) or TABLE.get(name)
        if fn is not None:
            ops[name] = fn
    for name in extra:
        ops[name] = importlib.import_module(name).aot_launches
    return ops


# ----------------------------------------------------------------------------------------------
# recording
# ----------------------------------------------------------------------------------------------
@dataclass
class Launch:
    op: str
    fn: object  # triton JITFunction
    args: tuple
    kwargs: dict
    dtype: str
    d: int
    autotune: bool = False
    multi_chunk: bool = False
    key: str = ""
    config: str = ""
    packed: tuple = field(default=(), repr=False)


_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_R", "num_warps", "num_stages")


@contextlib.contextmanager
def _recording(sink: list, autotune: bool):
    """JITFunction.run appends (fn, args, kwargs) to sink instead of launching; with autotune,
    Autotuner.run runs every config its prune keeps (each reaching the recording run)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid=None, warmup=False, **kwargs):
        sink.append((self, args, dict(kwargs)))

    def tune(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for cfg in self.prune_configs(kwargs):
            self.fn.run(*args, **{**kwargs, **cfg.all_kwargs()})

    saved = (JITFunction.run, Autotuner.run)
    JITFunction.run = run
    if autotune:
        Autotuner.run = tune
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def _reload_kernels(ops: dict, autotune: bool) -> dict:
    """Re-imports the kernel modules with GAMMACL_AUTOTUNE set as asked (read at import)."""
    os.environ["GAMMACL_AUTOTUNE"] = "1" if autotune else "0"
    for name in ops:
        importlib.reload(importlib.import_module(name))
    return {
        name: getattr(importlib.import_module(name), "aot_launches", fn) for name, fn in ops.items()
    }


@contextlib.contextmanager
def _multi_chunk(on: bool):
    """ROWS = ROWS_MULTI and the smallest chunk budget while on (the table's launchers read
    ROWS; the chunked launchers read GAMMACL_TRITON_CHUNK_MIB at call time)."""
    global ROWS
    if not on:
        yield
        return
    saved = ROWS, os.environ.get("GAMMACL_TRITON_CHUNK_MIB")
    ROWS, os.environ["GAMMACL_TRITON_CHUNK_MIB"] = ROWS_MULTI, MULTI_CHUNK_MIB
    try:
        yield
    finally:
        ROWS = saved[0]
        if saved[1] is None:
            os.environ.pop("GAMMACL_TRITON_CHUNK_MIB", None)
        else:
            os.environ["GAMMACL_TRITON_CHUNK_MIB"] = saved[1]


def record(ops: dict, dtypes: list[str], ds: tuple[int, ...], autotune: bool) -> list[Launch]:
    """Every launch the launchers make, per op, dtype and D (fp32 also with tf32 opted in), at
    ROWS rows and again in several chunks (multi_chunk)."""
    out: list[Launch] = []
    prec = torch.get_float32_matmul_precision()
    for op, launches in ops.items():
        for dn in dtypes:
            for d in ds:
                for p in ("highest", "high") if dn == "fp32" else (prec,):
                    for multi in (False, True):
                        sink: list = []
                        torch.set_float32_matmul_precision(p)
                        try:
                            with _recording(sink, autotune), _multi_chunk(multi):
                                launches(DTYPES[dn], d)
                        finally:
                            torch.set_float32_matmul_precision(prec)
                        out += [Launch(op, f, a, k, dn, d, autotune, multi) for f, a, k in sink]
    return out


# ----------------------------------------------------------------------------------------------
# compiling
# ----------------------------------------------------------------------------------------------
def _pack(launch: Launch, backend) -> None:
    """Signature (pointer dtypes, int specialisation), constexprs and options, as the JIT does."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    kwargs = {"debug": False, **launch.kwargs}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    launch.packed = (signature, constexprs, attrs, options.__dict__)
    launch.key = repr(
        (
            fn.cache_key,
            sorted(signature.items()),
            sorted(constexprs.items(), key=str),
            sorted(attrs.items(), key=str),
            sorted(options.__dict__.items(), key=str),
        )
    )
    names = {p.name: v for p, v in zip(fn.params, bound.values())}
    shown = [f"{k}={launch.kwargs[k]}" for k in _CONFIG_KEYS if k in launch.kwargs]
    flags = [
        f"{k}={_short(v)}"
        for k, v in names.items()
        if k not in _CONFIG_KEYS
        and fn.params[fn.arg_names.index(k)].is_constexpr
        and k not in ("ACC", "UPCAST")
    ]
    launch.config = " ".join(shown) + " | " + " ".join(flags)


def _short(v) -> str:
    v = getattr(v, "value", v)
    return str(int(v)) if isinstance(v, bool) else str(v)


_JOBS: list[Launch] = []  # inherited by forked workers


def _compile_one(i: int, arch: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch = _JOBS[i]
    signature, constexprs, attrs, options = launch.packed
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v lines: registers, spill stores / loads
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(
                ASTSource(launch.fn, signature, constexprs, attrs),
                target=GPUTarget("cuda", arch, 32),
                options=dict(options),
            )
    except Exception as e:  # the compiler's error is the result
        return dict(ok=False, error=_error_text(e), seconds=time.perf_counter() - t0)
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    ptx = k.asm.get("ptx", "")
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    st, ld = (int(spill[-1][0]), int(spill[-1][1])) if spill else (None, None)
    reg = int(regs[-1]) if regs else None
    smem = getattr(k.metadata, "shared", None)
    warps = getattr(k.metadata, "num_warps", None) or options.get("num_warps")
    return dict(
        ok=True,
        error="",
        registers=reg,
        spill_stores=st,
        spill_loads=ld,
        spills=None if st is None else st + ld,
        shared_bytes=smem,
        num_warps=warps,
        mma=mma,
        wgmma_serialized=wgmma_serialized(text),
        ctas_per_sm=None if reg is None or smem is None else ctas_per_sm(reg, smem, warps, arch),
        seconds=time.perf_counter() - t0,
    )


def _error_text(e: Exception) -> str:
    lines = [ln for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
    cause = e.__cause__ or e.__context__
    if cause is not None:
        lines.append(f"{type(cause).__name__}: {cause}".splitlines()[0])
    return "\n".join(lines[:1] + lines[-3:] if len(lines) > 4 else lines)[:2000]


def compile_all(launches: list[Launch], arch: int, jobs: int) -> list[dict]:
    """One row per (op, kernel, dtype, D, config); each distinct compile runs once."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    for la in launches:
        _pack(la, backend)
    uniq: dict[str, int] = {}
    for i, la in enumerate(launches):
        uniq.setdefault(la.key, i)
    _JOBS[:] = launches
    order = list(uniq.values())
    if jobs > 1 and len(order) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:
            results = list(ex.map(_compile_one, order, [arch] * len(order)))
    else:
        results = [_compile_one(i, arch) for i in order]
    by_key = {launches[i].key: r for i, r in zip(order, results)}
    rows, seen = [], set()
    for la in sorted(launches, key=lambda la: la.multi_chunk):  # single-chunk rows first
        ident = (la.op, la.dtype, la.d, la.key)
        if ident in seen:
            continue
        seen.add(ident)
        row = dict(
            kernel=la.fn.__name__,
            op=la.op.rsplit(".", 1)[-1],
            arch=arch,
            dtype=la.dtype,
            D=la.d,
            config=la.config,
        )
        row.update(by_key[la.key])
        if la.autotune:
            row["autotune"] = True
        if la.multi_chunk:
            row["multi_chunk"] = True
        rows.append(row)
    return sorted(rows, key=lambda r: (r["op"], r["kernel"], r["dtype"], r["D"], r["config"]))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    return "-" if v is None else str(v)


def print_table(rows: list[dict], file=sys.stdout) -> None:
    head = (
        "kernel",
        "dtype",
        "D",
        "status",
        "regs",
        "spill st/ld",
        "smem",
        "mma",
        "serialized",
        "CTAs/SM",
        "config",
    )
    print(" | ".join(head), file=file)
    for r in rows:
        status = "ok" if r["ok"] else "ERROR " + r["error"].splitlines()[-1][:160]
        spill = f"{_fmt(r.get('spill_stores'))}/{_fmt(r.get('spill_loads'))}"
        kern = r["kernel"] + (" [autotune]" if r.get("autotune") else "")
        kern += " [multi-chunk]" if r.get("multi_chunk") else ""
        cells = (
            kern,
            r["dtype"],
            r["D"],
            status,
            _fmt(r.get("registers")),
            spill,
            _fmt(r.get("shared_bytes")),
            r.get("mma", "-"),
            "C7515" if r.get("wgmma_serialized") else "no" if r["ok"] else "-",
            _fmt(r.get("ctas_per_sm")),
            r["config"],
        )
        print(" | ".join(map(str, cells)), file=file)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gammacl.aot", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=(80, 90), help="sm_XX target")
    ap.add_argument("--autotune", action="store_true", help="also every autotune config")
    ap.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    ap.add_argument(
        "--op",
        action="append",
        default=[],
        help="only ops whose module name contains this (repeatable)",
    )
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES), default=[])
    ap.add_argument("--d", type=int, action="append", default=[], help=f"D values {D_VALUES}")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        help="also this module's aot_launches (e.g. a test kernel)",
    )
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--quiet", action="store_true", help="summary only, no table")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # must be unset before any kernel module import
    if any("gammacl.kernels." in m for m in sys.modules) and _interpreted():
        print(
            "gammacl.aot: kernels were imported under TRITON_INTERPRET; run it in a fresh "
            "process without TRITON_INTERPRET",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated
    cache = tempfile.mkdtemp(prefix="gammacl-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache  # fresh: ptxas runs (and logs) for every compile
    t0 = time.perf_counter()
    try:
        ops = discover(tuple(args.extra))
        if args.op:
            ops = {k: v for k, v in ops.items() if any(s in k for s in args.op)}
        dtypes, ds = args.dtype or list(DTYPES), tuple(args.d) or D_VALUES
        launches = record(ops, dtypes, ds, autotune=False)
        if args.autotune:
            tuned = _reload_kernels(ops, autotune=True)
            try:
                launches += record(tuned, dtypes, ds, autotune=True)
            finally:
                _reload_kernels(ops, autotune=False)
        rows = compile_all(launches, args.arch, args.jobs)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    import triton

    if not args.quiet:
        print_table(rows)
    bad = [r for r in rows if not r["ok"]]
    spilling = [r for r in rows if r.get("spills")]
    serial = [r for r in rows if r.get("wgmma_serialized")]
    serial_default = [r for r in serial if r["dtype"] in ("bf16", "fp16") and not r.get("autotune")]
    n_comp = len({(r["kernel"], r["config"], r["dtype"]) for r in rows})
    print(
        f"gammacl.aot: triton {triton.__version__} sm_{args.arch}: {len(rows)} rows "
        f"({n_comp} distinct kernel configs), {len(rows) - len(bad)} ok, {len(bad)} errors, "
        f"{len(spilling)} spill, {len(serial)} serialised wgmma (C7515; "
        f"{len(serial_default)} in default 16-bit configs); {time.perf_counter() - t0:.0f} s"
    )
    for r in serial_default:
        print(f"  SERIALISED wgmma (C7515) {r['kernel']} {r['dtype']} D={r['D']} {r['config']}")
    for r in bad:
        print(
            f"  ERROR {r['kernel']} {r['dtype']} D={r['D']} {r['config']}\n    "
            + r["error"].replace("\n", "\n    ")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r, triton=triton.__version__) for r in rows], f, indent=1)
    return 1 if bad or serial_default else 0


def _interpreted() -> bool:
    mod = sys.modules.get("gammacl.kernels.simlse")
    return mod is not None and type(mod._simlse_col_merge_kernel).__name__ != "JITFunction"


if __name__ == "__main__":
    sys.exit(main())
