"""Shared machinery of `python -m gammacl.bench` and `python -m gammacl.profile`.

One copy of: the implementation registry (our losses x backends, peers, the GEMM floor), FLOP
formulas and analytic memory models, timing, memory probes (torch allocator, NVML, process RSS),
OOM handling, run metadata, tidy CSV / JSON output, tables and plots.

FLOP conventions (every row names its formula in `flop_formula`):
  two-pass losses (clip, infonce with M = N, gamma update="before", sogclr, every peer of clip):
      fwd 2*N^2*D (one N x N x D GEMM), bwd 6*N^2*D (recompute + dA + dB), fwd+bwd 8*N^2*D.
      A materialising implementation (naive, open_clip) does less arithmetic (no recompute) or
      more (open_clip forms both I T^T and T I^T); the same useful-work count is used for all so
      TFLOP/s compares time directly (peers.md section 10).
  one-pass (gamma update="after"): fwd+bwd 6*N^2*D (loss and gradient GEMMs in one sweep);
      the fwd / bwd split depends on the implementation, so those rows carry no FLOP count.
  GEMM floor: fwd 1 GEMM 2*N^2*D, bwd 3 GEMMs 6*N^2*D, fwd+bwd the 4 GEMMs 8*N^2*D.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as _dt
import gc
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

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
OUR_BACKENDS = ("torch", "cpp", "triton", "cuda", "reference")
PEERS = ("naive", "naive_compiled", "open_clip", "memeff", "inf_cl", "siglip_kernel", "gemm_floor")
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


# ------------------------------------------------------------------------------------------
# command line pieces shared by both CLIs
# ------------------------------------------------------------------------------------------


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
        "--quick", action="store_true", help="small sweep (about a minute on 2 CPU cores)"
    )
    p.add_argument(
        "--no-plot", action="store_true", help="skip the PNG even if matplotlib is there"
    )
    p.add_argument("--note", default="", help="free text stored in the metadata (e.g. the host)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU: torch.set_num_threads for the run (default: 1 with --quick, else torch's "
        "default). One thread keeps small shapes stable on a shared host, where idle OpenMP "
        "threads wait on descheduled ones",
    )
    # test hook: rows whose label contains SUBSTR and whose N >= NMIN raise torch.OutOfMemoryError
    p.add_argument("--inject-oom", default=None, metavar="[SUBSTR:]NMIN", help=argparse.SUPPRESS)


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


# ------------------------------------------------------------------------------------------
# inputs and steps
# ------------------------------------------------------------------------------------------


class Features:
    """Seeded L2-normalised [N, D] leaf tensors (requires_grad) made on demand, plus the learnable
    0-d fp32 logit scale. The same (seed, N, D, dtype) gives identical tensors for every impl."""

    def __init__(
        self, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int, scale: float
    ) -> None:
        self.n, self.d, self.dtype, self.device, self.seed = n, d, dtype, device, seed
        self.scale_value = float(scale)
        self.scale = torch.tensor(
            float(scale), dtype=torch.float32, device=device, requires_grad=True
        )
        self._feats: dict[int, torch.Tensor] = {}

    def feat(self, k: int) -> torch.Tensor:
        if k not in self._feats:
            g = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + k)
            x = torch.randn(self.n, self.d, device=self.device, dtype=self.dtype, generator=g)
            step = max(1, 2**25 // self.d)  # normalise in fp32 row blocks: <= 128 MiB temporary
            with torch.no_grad():
                for i in range(0, self.n, step):
                    x[i : i + step] = F.normalize(x[i : i + step].float(), dim=1).to(self.dtype)
            self._feats[k] = x.requires_grad_()
        return self._feats[k]

    def index(self) -> torch.Tensor:
        return torch.arange(self.n, device=self.device)

    def grads_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._feats.values())

    def upcast(self) -> Features:
        """The same values in float64, no grad: the inputs of the reference check."""
        return _Upcast(self)


class _Upcast(Features):
    def __init__(self, src: Features) -> None:
        super().__init__(src.n, src.d, torch.float64, src.device, src.seed, src.scale_value)
        self.scale = src.scale.detach().double()
        self._src = src

    def feat(self, k: int) -> torch.Tensor:
        if k not in self._feats:
            self._feats[k] = self._src.feat(k).detach().double()
        return self._feats[k]


class Step:
    """One measured computation on fixed inputs. `forward()` returns the loss tensor; modes:
    fwd = forward with autograd recording (as in training); fwd+bwd = forward().backward();
    bwd = backward(retain_graph=True) of one recorded forward (Liger's convention)."""

    def __init__(self, forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor]):
        self.forward = forward
        self.leaves = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def prepare(self, mode: str) -> Callable[[], Any]:
        if mode == "fwd":
            return self.forward
        if mode == "fwd+bwd":
            return lambda: self.forward().backward()
        if mode == "bwd":
            loss = self.forward()
            return lambda: loss.backward(retain_graph=True)
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


class FloorStep(Step):
    """The 4 N x N x D GEMMs a recomputing fused fwd+bwd must do, in the input dtype, no epilogue:
    S = A B^T (fwd); S again, dA = S B, dB = S^T A (bwd)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__(lambda: a @ b.t(), [])
        self.a, self.b = a.detach(), b.detach()

    def prepare(self, mode: str) -> Callable[[], Any]:
        a, b = self.a, self.b

        def fwd():
            return a @ b.t()

        def bwd():
            s = a @ b.t()
            return s @ b, s.t() @ a

        def both():
            fwd()
            return bwd()

        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}[mode]


# ------------------------------------------------------------------------------------------
# FLOP and memory models
# ------------------------------------------------------------------------------------------


def flops_two_pass(n: int, d: int, mode: str) -> tuple[int, str]:
    k = {"fwd": 2, "bwd": 6, "fwd+bwd": 8}[mode]
    how = {"fwd": "1 GEMM", "bwd": "recompute + dA + dB", "fwd+bwd": "two-pass, recompute counted"}
    return k * n * n * d, f"{k}*N^2*D ({how[mode]})"


def flops_one_pass(n: int, d: int, mode: str) -> tuple[int | None, str]:
    if mode == "fwd+bwd":
        return 6 * n * n * d, "6*N^2*D (one-pass: fwd + gradient GEMMs in one sweep)"
    return None, "n/a (one-pass: the fwd/bwd split depends on the implementation)"


def flops_floor(n: int, d: int, mode: str) -> tuple[int, str]:
    k = {"fwd": 2, "bwd": 6, "fwd+bwd": 8}[mode]
    g = {"fwd": "1 GEMM", "bwd": "3 GEMMs", "fwd+bwd": "4 GEMMs"}[mode]
    return k * n * n * d, f"{k}*N^2*D ({g})"


def _flops_none(why: str) -> Callable[[int, int, str], tuple[None, str]]:
    return lambda n, d, mode: (None, why)


def _split(fwd_k: float, bwd_k: float, term: str, n2d: Callable[[int, int], float]):
    """FLOPs fwd_k * X (fwd), bwd_k * X (bwd), their sum (fwd+bwd) with X = n2d(N, D)."""

    def f(n: int, d: int, mode: str) -> tuple[int, str]:
        k = {"fwd": fwd_k, "bwd": bwd_k, "fwd+bwd": fwd_k + bwd_k}[mode]
        return int(k * n2d(n, d)), f"{k:g}*{term}"

    return f


# Regularisers of gammacl.modality (FLOPs from the module's docstrings; D' = D + 2, one
# N x N x D' simlse per modality, rows only: fwd 2 N^2 D', bwd 6 N^2 D').
_MODALITY_FLOPS = {
    "uniformity_loss": _split(
        4, 12, "N^2*(D+2) (2 modalities, simlse rows)", lambda n, d: n * n * (d + 2)
    ),
    "inmodal_infonce_loss": _split(2, 6, "N^2*D", lambda n, d: n * n * d),
    "modality_contrastive_loss": _split(
        6, 18, "N^2*D (clip + 2 in-modal infonce)", lambda n, d: n * n * d
    ),
    "feature_separation_loss": _split(
        8, 24, "N^2*D approx (2 in-modal infonce + uniformity at D+2 ~ D)", lambda n, d: n * n * d
    ),
    "geometric_consistency_loss": _split(
        6, 8, "N*D^2 (d x d Grams, no N x N)", lambda n, d: n * d * d
    ),
}


def _chunk_rows(n: int, dtype: torch.dtype) -> int:
    budget = int(float(os.environ.get("GAMMACL_CHUNK_MIB", "32")) * 2**20)
    return max(1, min(n, budget // max(1, n * acc_bytes(dtype))))


def expected_chunked(n: int, d: int, dtype: torch.dtype, mode: str, cols: bool = True):
    """gammacl torch backend: C = rows per chunk (GAMMACL_CHUNK_MIB, 32 MiB of N acc values).
    fwd ~2 chunk buffers (S and a temporary); fwd+bwd ~3 (S, W, a temporary; measured 3.0-3.2
    on CPU RSS at N=4096-8192, D=64) + fp32 raw grads dA, dB and one scaled copy (3 N D),
    + fp32 upcasts of the inputs (2 N D) for half inputs."""
    ab, c = acc_bytes(dtype), _chunk_rows(n, dtype)
    up = 2 * n * d * ab if dtype in (torch.float16, torch.bfloat16) else 0
    up_s = " + 2*N*D*4 (upcast)" if up else ""
    if mode == "fwd":
        return 2 * c * n * ab + up, f"2*C*N*{ab} (C={c} chunk rows){up_s}"
    if mode == "fwd+bwd":
        return 3 * c * n * ab + 3 * n * d * ab + up, f"3*C*N*{ab} + 3*N*D*{ab} (C={c}){up_s}"
    return None, "n/a for bwd"


def expected_fused(n: int, d: int, dtype: torch.dtype, mode: str, cols: bool = True):
    """triton / cuda: O(N) statistics; backward adds fp32 raw grads and a scaled copy."""
    ab = acc_bytes(dtype)
    if mode == "fwd":
        return 2 * n * ab, f"2*N*{ab} (row/col LSE)"
    if mode == "fwd+bwd":
        return 3 * n * d * ab + 2 * n * ab, f"3*N*D*{ab} + 2*N*{ab}"
    return None, "n/a for bwd"


def expected_materialised(n: int, d: int, dtype: torch.dtype, mode: str, cols: bool = True):
    """Naive symmetric CE on fp32 logits: fwd holds S, scaled logits, two log-softmax outputs
    (4 N^2); fwd+bwd ~5 N^2 fp32 (calibrated on CPU RSS, N=4096: 322 MiB vs 5*64 MiB)."""
    k = (4 if mode == "fwd" else 5) if cols else (2 if mode == "fwd" else 3)
    if mode == "bwd":
        return None, "n/a for bwd"
    return k * n * n * 4, f"{k}*N^2*4 (fp32 N x N buffers)"


def expected_cpp(n: int, d: int, dtype: torch.dtype, mode: str, cols: bool = True):
    """gammacl cpp backend (csrc/simlse.cpp): one R x N acc buffer (R rows per chunk,
    GAMMACL_CPU_CHUNK_MIB, 32 MiB) turned into the weights in place, column partials
    2 * threads * N; backward adds fp32 raw grads and a scaled copy (3 N D)."""
    ab = acc_bytes(dtype)
    budget = int(float(os.environ.get("GAMMACL_CPU_CHUNK_MIB", "32")) * 2**20)
    c = max(1, min(n, budget // max(1, n * ab)))
    up = 2 * n * d * ab if dtype in (torch.float16, torch.bfloat16) else 0
    up_s = f" + 2*N*D*{ab} (upcast)" if up else ""
    if mode == "fwd":
        return c * n * ab + up, f"C*N*{ab} (C={c} chunk rows){up_s}"
    if mode == "fwd+bwd":
        return c * n * ab + 3 * n * d * ab + up, f"C*N*{ab} + 3*N*D*{ab} (C={c}){up_s}"
    return None, "n/a for bwd"


def _expected_none(n, d, dtype, mode, cols=True):
    return None, "not modelled"


# ------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Impl:
    """One row family: impl x loss x backend. `build(features)` returns a Step (it may raise:
    the runner turns that into status=error rows). `reference(features64)` returns the fp64
    reference loss value used for the first-shape check, or None with `check_na` saying why."""

    impl: str
    loss: str
    backend: str
    build: Callable[[Features], Step]
    flops: Callable[[int, int, str], tuple[int | None, str]]
    expected: Callable[..., tuple[int | None, str]] = _expected_none
    reference: Callable[[Features], torch.Tensor] | None = None
    check_na: str = "n/a"
    dtypes: tuple[torch.dtype, ...] | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.impl}/{self.loss}/{self.backend}"


def naive_clip(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """open_clip's ClipLoss formula, materialised: fp32 logits, CE in both directions."""
    logits = scale * (a @ b.t()).float()
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


# The check's float64 reference: the materialised gammacl.reference up to this N; above it the
# chunked torch backend in float64 (O(N*D) memory, itself tested against the reference), so a
# large first shape does not OOM on an N x N float64 matrix.
CHECK_MATERIALISED_MAX_N = 8192


def check_reference_backend(n: int) -> str:
    return "reference" if n <= CHECK_MATERIALISED_MAX_N else "torch"


def _ref_clip(f: Features) -> torch.Tensor:
    import gammacl

    be = check_reference_backend(f.n)
    if be == "reference":
        return gammacl.reference.clip_loss(f.feat(0), f.feat(1), f.scale)
    return gammacl.clip_loss(f.feat(0), f.feat(1), f.scale, backend=be)


def _ref_infonce(f: Features) -> torch.Tensor:
    import gammacl

    be = check_reference_backend(f.n)
    if be == "reference":
        return gammacl.reference.infonce_loss(f.feat(0), f.feat(1), f.scale)
    return gammacl.infonce_loss(f.feat(0), f.feat(1), f.scale, backend=be)


def _leaves(f: Features, k: int) -> list[torch.Tensor]:
    return [f.feat(i) for i in range(k)] + [f.scale]


def _gammacl_clip(backend: str) -> Callable[[Features], Step]:
    def build(f: Features) -> Step:
        import gammacl

        a, b = f.feat(0), f.feat(1)
        return Step(lambda: gammacl.clip_loss(a, b, f.scale, backend=backend), _leaves(f, 2))

    return build


def _gammacl_infonce(backend: str) -> Callable[[Features], Step]:
    def build(f: Features) -> Step:
        import gammacl

        a, b = f.feat(0), f.feat(1)
        return Step(lambda: gammacl.infonce_loss(a, b, f.scale, backend=backend), _leaves(f, 2))

    return build


def state_loss_class(name: str) -> type | None:
    """gammacl.<name>, or gammacl.gamma.<name> before the top-level export exists."""
    import gammacl

    cls = getattr(gammacl, name, None)
    if cls is None and importlib.util.find_spec("gammacl.gamma") is not None:
        cls = getattr(importlib.import_module("gammacl.gamma"), name, None)
    return cls


def _module_loss(cls_name: str, backend: str, **kw) -> Callable[[Features], Step]:
    """GammaClipLoss(num_samples, ..., backend) / SogCLRLoss(num_samples, ..., backend) with
    forward(image, text, logit_scale, index); the per-sample state has N entries, index 0..N-1."""

    def build(f: Features) -> Step:
        cls = state_loss_class(cls_name)
        extra = dict(kw)
        if "generator" in inspect.signature(cls).parameters:
            # seeded per instance: the checked instance and its reference draw the same weights
            extra["generator"] = torch.Generator().manual_seed(f.seed)
        mod = cls(f.n, backend=backend, **extra)
        if isinstance(mod, torch.nn.Module):
            mod = mod.to(f.device)
        a, b, idx = f.feat(0), f.feat(1), f.index()
        return Step(lambda: mod(a, b, f.scale, idx), _leaves(f, 2))

    return build


def _module_reference(cls_name: str, **kw) -> Callable[[Features], torch.Tensor]:
    def ref(f: Features) -> torch.Tensor:
        return _module_loss(cls_name, check_reference_backend(f.n), **kw)(f).forward()

    return ref


def _modality_call(fn: Callable, backend: str | None, f: Features) -> Step:
    """Calls a gammacl.modality function with its required positional arguments filled by name:
    logit_scale -> the scale, every other one -> a fresh [N, D] feature tensor."""
    args, k = [], 0
    for p in inspect.signature(fn).parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is not p.empty:
            continue
        if p.name == "logit_scale":
            args.append(f.scale)
        else:
            args.append(f.feat(k))
            k += 1
    kw = {} if backend is None else {"backend": backend}
    return Step(lambda: fn(*args, **kw), _leaves(f, k))


def _modality_impls(backends: Sequence[str], notes: list[str]) -> list[Impl]:
    try:
        modality = importlib.import_module("gammacl.modality")
    except ModuleNotFoundError:
        return []
    except Exception as exc:  # a broken module gives error rows, not a crash
        err = f"import gammacl.modality failed: {type(exc).__name__}: {exc}"
        notes.append(err)

        def broken(f: Features, err=err) -> Step:
            raise RuntimeError(err)

        return [Impl("gammacl", "modality", "-", broken, _flops_none("n/a"))]
    out = []
    for fname in sorted(n for n in dir(modality) if n.endswith("_loss") and not n.startswith("_")):
        fn = getattr(modality, fname)
        if not callable(fn):
            continue
        loss = fname[: -len("_loss")]
        flops = _MODALITY_FLOPS.get(fname, _flops_none("n/a (row-wise O(N*D) or not modelled)"))
        takes_backend = "backend" in inspect.signature(fn).parameters
        for be in backends if takes_backend else ["-"]:
            bk = be if takes_backend else None

            def build(f: Features, fn=fn, bk=bk) -> Step:
                return _modality_call(fn, bk, f)

            def ref(f: Features, fn=fn, takes=takes_backend) -> torch.Tensor:
                be = check_reference_backend(f.n) if takes else None
                return _modality_call(fn, be, f).forward()

            out.append(Impl("gammacl", loss, be, build, flops, reference=ref))
    return out


def our_loss_names() -> list[str]:
    """Loss names the registry offers right now (modality regularisers appear when present)."""

    names = ["clip", "infonce"]
    if state_loss_class("GammaClipLoss") is not None:
        names += ["gamma_twopass", "gamma_onepass"]
    if state_loss_class("SogCLRLoss") is not None:
        names.append("sogclr")
    if importlib.util.find_spec("gammacl.modality") is not None:
        try:
            mod = importlib.import_module("gammacl.modality")
            names += sorted(
                n[:-5]
                for n in dir(mod)
                if n.endswith("_loss") and not n.startswith("_") and callable(getattr(mod, n))
            )
        except Exception:
            names.append("modality")
    return names


def our_impls(backends: Sequence[str], notes: list[str]) -> list[Impl]:

    expected = {
        "torch": expected_chunked,
        "cpp": expected_cpp,
        "triton": expected_fused,
        "cuda": expected_fused,
        "reference": expected_materialised,
    }
    out: list[Impl] = []
    for be in backends:
        out.append(
            Impl("gammacl", "clip", be, _gammacl_clip(be), flops_two_pass, expected[be], _ref_clip)
        )
        out.append(
            Impl(
                "gammacl",
                "infonce",
                be,
                _gammacl_infonce(be),
                flops_two_pass,
                lambda n, d, dt, m, _e=expected[be]: _e(n, d, dt, m, cols=False),
                _ref_infonce,
            )
        )
    for be in backends:
        if state_loss_class("GammaClipLoss") is not None:
            for loss, update, flops in (
                ("gamma_twopass", "before", flops_two_pass),
                ("gamma_onepass", "after", flops_one_pass),
            ):
                out.append(
                    Impl(
                        "gammacl",
                        loss,
                        be,
                        _module_loss("GammaClipLoss", be, update=update),
                        flops,
                        reference=_module_reference("GammaClipLoss", update=update),
                    )
                )
        if state_loss_class("SogCLRLoss") is not None:
            out.append(
                Impl(
                    "gammacl",
                    "sogclr",
                    be,
                    _module_loss("SogCLRLoss", be),
                    flops_two_pass,
                    reference=_module_reference("SogCLRLoss"),
                )
            )
    out += _modality_impls(backends, notes)
    return out


def _peer_available(module: str) -> tuple[bool, str]:
    try:
        ok = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as exc:
        return False, f"{module}: {exc}"
    return ok, "" if ok else f"{module} not installed"


def peer_impls(
    device: torch.device, requested: set[str], notes: list[str], *, for_profile: bool
) -> list[Impl]:
    """Peers that are installed (never required). The naive loss (open_clip's formula) always
    is; torch.compile of it is on by default only on CUDA (compiling per shape on a 2-core CPU
    costs tens of seconds; name naive_compiled in --impl to force it)."""
    out: list[Impl] = []
    on_gpu = device.type == "cuda"

    def want(name: str) -> bool:
        return "all" in requested or name in requested

    if want("naive"):

        def build_naive(f: Features) -> Step:
            a, b = f.feat(0), f.feat(1)
            return Step(lambda: naive_clip(a, b, f.scale), _leaves(f, 2))

        out.append(
            Impl(
                "naive",
                "clip",
                "torch",
                build_naive,
                flops_two_pass,
                expected_materialised,
                _ref_clip,
                note="open_clip's formula, fp32 logits, materialised",
            )
        )
    if "naive_compiled" in requested or ("all" in requested and on_gpu):

        def build_compiled(f: Features) -> Step:
            torch._dynamo.reset()  # a fresh graph per shape: no recompile-limit fallback to eager
            fn = torch.compile(naive_clip, dynamic=False)
            a, b = f.feat(0), f.feat(1)
            return Step(lambda: fn(a, b, f.scale), _leaves(f, 2))

        out.append(
            Impl(
                "naive_compiled",
                "clip",
                "inductor",
                build_compiled,
                flops_two_pass,
                expected_materialised,
                _ref_clip,
                note="torch.compile(naive), compile time excluded (warmup)",
            )
        )
    elif "all" in requested:
        notes.append(
            "naive_compiled (torch.compile) left out on CPU: compiling per shape takes "
            "tens of seconds here; pass --impl naive_compiled to include it"
        )
    peer_specs = [
        ("open_clip", "open_clip", "clip", "torch", None, ("cpu", "cuda")),
        ("memeff", "memeff", "clip", "triton", None, ("cuda",)),
        ("inf_cl", "inf_cl", "clip", "triton", (torch.float32,), ("cuda",)),
        ("siglip_kernel", "siglip_kernel", "siglip", "triton", None, ("cuda",)),
    ]
    for name, module, loss, be, dtypes, devices in peer_specs:
        if not want(name):
            continue
        ok, why = _peer_available(module)
        if not ok:
            notes.append(f"peer {name} skipped: {why}")
            continue
        if device.type not in devices:
            notes.append(f"peer {name} skipped: runs on {'/'.join(devices)} only")
            continue
        out.append(_peer_impl(name, loss, be, dtypes, devices))
    if want("gemm_floor") and not for_profile:

        def build_floor(f: Features) -> Step:
            return FloorStep(f.feat(0), f.feat(1))

        out.append(
            Impl(
                "gemm_floor",
                "floor",
                "torch",
                build_floor,
                flops_floor,
                check_na="n/a (not a loss)",
                note="4 GEMMs in the input dtype" + ("" if on_gpu else " (CPU floor)"),
            )
        )
    return out


def _peer_impl(name: str, loss: str, be: str, dtypes, devices) -> Impl:
    if name == "open_clip":

        def build(f: Features) -> Step:
            from open_clip.loss import ClipLoss

            mod, a, b = ClipLoss(), f.feat(0), f.feat(1)
            return Step(lambda: mod(a, b, f.scale), _leaves(f, 2))

        return Impl(
            name,
            loss,
            be,
            build,
            flops_two_pass,
            expected_materialised,
            _ref_clip,
            dtypes=dtypes,
            devices=devices,
            note="open_clip.loss.ClipLoss",
        )
    if name == "memeff":

        def build(f: Features) -> Step:
            from memeff import MemoryEfficientCLIPLoss

            mod = MemoryEfficientCLIPLoss(
                temperature=1.0 / f.scale_value, normalized_inputs=True, stable=False
            )
            a, b = f.feat(0), f.feat(1)
            return Step(lambda: mod(a, b), [a, b])

        return Impl(
            name,
            loss,
            be,
            build,
            flops_two_pass,
            reference=_ref_clip,
            dtypes=dtypes,
            devices=devices,
            note="fixed temperature 1/scale (not learnable)",
        )
    if name == "inf_cl":

        def build(f: Features) -> Step:
            from inf_cl import cal_flash_loss

            a, b, s = f.feat(0), f.feat(1), f.scale
            return Step(
                lambda: (
                    0.5
                    * (cal_flash_loss(a, b, scale=s).mean() + cal_flash_loss(b, a, scale=s).mean())
                ),
                _leaves(f, 2),
            )

        return Impl(
            name,
            loss,
            be,
            build,
            flops_two_pass,
            reference=_ref_clip,
            dtypes=dtypes,
            devices=devices,
            note="cal_flash_loss both directions, fp32",
        )
    if name == "siglip_kernel":

        def build(f: Features) -> Step:
            from siglip_kernel import fused_siglip_loss

            a, b = f.feat(0), f.feat(1)
            bias = torch.tensor(-10.0, device=f.device, requires_grad=True)
            return Step(
                lambda: fused_siglip_loss(a, b, f.scale.log(), bias), _leaves(f, 2) + [bias]
            )

        return Impl(
            name,
            loss,
            be,
            build,
            flops_two_pass,
            check_na="n/a (sigmoid loss: a different loss)",
            dtypes=dtypes,
            devices=devices,
            note="SigLIP sigmoid loss, not CLIP: time only",
        )
    raise ValueError(name)


def available_backends(device: torch.device, requested: str, notes: list[str]) -> list[str]:
    """gammacl backends usable on `device` (dispatch.resolve_backend decides); triton is never
    timed under TRITON_INTERPRET=1 (the CPU interpreter is a test harness, not a backend)."""
    from gammacl.dispatch import interpreter_on, resolve_backend

    names = OUR_BACKENDS if requested == "all" else tuple(csv_list(requested))
    out = []
    for be in names:
        if be not in OUR_BACKENDS:
            raise SystemExit(
                f"--backend: unknown backend {be!r}; choose from {','.join(OUR_BACKENDS)} or all"
            )
        if be == "triton" and interpreter_on():
            msg = (
                "TRITON_INTERPRET=1 is set: Triton kernels would run in the CPU interpreter, "
                "so the triton backend is not timed"
            )
            if requested != "all":
                raise SystemExit(f"refusing --backend triton: {msg}. Unset TRITON_INTERPRET.")
            notes.append(f"backend triton skipped: {msg}")
            continue
        try:
            resolve_backend(be, device)
        except Exception as exc:
            if requested != "all":
                raise SystemExit(f"--backend {be} is unavailable on {device}: {exc}") from None
            notes.append(f"backend {be} skipped on {device.type}: {exc}")
            continue
        out.append(be)
    return out


def select_impls(
    args: argparse.Namespace,
    device: torch.device,
    *,
    for_profile: bool,
    default_losses: Sequence[str] | None = None,
) -> tuple[list[Impl], list[str]]:
    """The impls a run covers, from --loss / --backend / --impl, plus human-readable notes on
    what was left out and why."""
    notes: list[str] = []
    requested = set(csv_list(args.impl))
    unknown = requested - set(IMPL_NAMES) - {"all"}
    if unknown:
        raise SystemExit(
            f"--impl: unknown {sorted(unknown)}; choose from {','.join(IMPL_NAMES)} or all"
        )
    losses = set(csv_list(args.loss))
    impls: list[Impl] = []
    if "all" in requested or "gammacl" in requested:
        backends = available_backends(device, args.backend, notes)
        impls += our_impls(backends, notes)
    impls += peer_impls(device, requested, notes, for_profile=for_profile)
    if "all" not in losses:
        known = set(our_loss_names()) | {"siglip", "floor"}
        bad = losses - known
        if bad:
            raise SystemExit(f"--loss: unknown {sorted(bad)}; available: {','.join(sorted(known))}")
        # the GEMM floor goes with every loss; siglip-kernel (a different loss) with clip
        impls = [
            i
            for i in impls
            if i.loss in losses or i.loss == "floor" or (i.loss == "siglip" and "clip" in losses)
        ]
    elif default_losses is not None:
        impls = [i for i in impls if i.loss in default_losses]
    kept = [i for i in impls if device.type in i.devices]
    return kept, notes


# ------------------------------------------------------------------------------------------
# running one point: timing, memory, OOM
# ------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def frozen_gc():
    """gc.freeze() the heap built by the imports (torch, triton: ~0.5 s per full collection on
    a busy 2-core host) so the per-row collections below only scan new objects; unfrozen on
    exit so interpreter shutdown collects everything."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:  # a faulted context: nothing more to free here
            pass
        torch.cuda.empty_cache()


def classify_error(exc: BaseException) -> tuple[str, str]:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    low = str(exc).lower()
    oom = isinstance(exc, torch.OutOfMemoryError) or any(
        s in low for s in ("out of memory", "can't allocate memory", "cublas_status_alloc_failed")
    )
    if oom:
        return "OOM", msg[:300]
    return "error", f"{type(exc).__name__}: {msg}"[:300]


def _quantiles(xs: list[float], qs: Sequence[float]) -> list[float]:
    s = sorted(xs)
    out = []
    for q in qs:
        pos = q * (len(s) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(s) - 1)
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out


@dataclasses.dataclass
class TimingConfig:
    warmup: int = 1  # CPU: untimed calls first
    min_reps: int = 3  # CPU: at least this many timed calls
    min_time_s: float = 0.2  # CPU: and until this much time is spent
    max_reps: int = 50
    gpu_warmup_ms: int = 25  # triton.testing.do_bench
    gpu_rep_ms: int = 100


def timer_name(device: torch.device) -> str:
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is not None:
            return "triton.testing.do_bench (CUDA events, L2 flushed per rep)"
        return "CUDA events"
    return "time.perf_counter (CPU wall clock)"


def time_call(
    fn: Callable[[], Any], step: Step, device: torch.device, cfg: TimingConfig
) -> dict[str, Any]:
    """p20 / p50 / p80 of one call in ms. GPU: triton.testing.do_bench (CUDA events); CPU:
    time.perf_counter around each call. Grads are cleared before each call, untimed."""
    if device.type == "cuda":
        from gammacl.dispatch import interpreter_on

        if interpreter_on():
            raise RuntimeError("refusing to time on CUDA with TRITON_INTERPRET=1 set")
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            p20, p50, p80 = do_bench(
                fn,
                warmup=cfg.gpu_warmup_ms,
                rep=cfg.gpu_rep_ms,
                grad_to_none=step.leaves or None,
                quantiles=[0.2, 0.5, 0.8],
            )
            return {"time_ms_p20": p20, "time_ms_p50": p50, "time_ms_p80": p80, "reps": None}
        times = []
        for i in range(cfg.warmup + max(cfg.min_reps, 10)):
            step.clear_grads()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            if i >= cfg.warmup:
                times.append(start.elapsed_time(end))
    else:
        for _ in range(cfg.warmup):
            step.clear_grads()
            fn()
        times = []
        spent = 0.0
        while len(times) < cfg.min_reps or (spent < cfg.min_time_s and len(times) < cfg.max_reps):
            step.clear_grads()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times.append(dt * 1e3)
            spent += dt
    p20, p50, p80 = _quantiles(times, (0.2, 0.5, 0.8))
    return {"time_ms_p20": p20, "time_ms_p50": p50, "time_ms_p80": p80, "reps": len(times)}


# --- CPU: process resident set (Linux /proc) ---------------------------------------------


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def pin_malloc_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """glibc: serve every allocation >= nbytes by mmap and unmap it on free (fixes the dynamic
    M_MMAP_THRESHOLD, which otherwise grows after frees up to 32 MiB and keeps freed buffers in
    the heap), so peak RSS deltas follow the live large buffers of each step. Costs page faults
    per large allocation: the profiler uses it, the timing benchmark does not."""
    global MALLOC_PINNED
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        MALLOC_PINNED = bool(libc.mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        MALLOC_PINNED = False
    return MALLOC_PINNED


MALLOC_PINNED = False  # set by pin_malloc_mmap_threshold (the profile CLI entry point only)


# --- NVML ----------------------------------------------------------------------------------


def _import_pynvml():
    if os.environ.get("GAMMACL_NVML", "").lower() in ("0", "off", "no"):
        raise ImportError("NVML disabled by GAMMACL_NVML=off")
    import pynvml

    return pynvml


def _uuid_key(u: Any) -> str:
    """NVML says 'GPU-xxxxxxxx-...' (or 'MIG-...'), torch says 'xxxxxxxx-...': compare the hex."""
    s = u.decode() if isinstance(u, bytes) else str(u)
    s = s.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if s.startswith(prefix):
            s = s[len(prefix) :]
    return s


def nvml_handle_for_uuid(nvml: Any, uuid: str) -> tuple[Any, str]:
    """The NVML handle whose UUID equals torch's device UUID (NVML enumerates every GPU and
    ignores CUDA_VISIBLE_DEVICES, so indices do not match); MIG instances are searched too."""
    want = _uuid_key(uuid)
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        if _uuid_key(nvml.nvmlDeviceGetUUID(h)) == want:
            return h, f"NVML device {i}"
        try:
            if nvml.nvmlDeviceGetMigMode(h)[0]:
                for j in range(nvml.nvmlDeviceGetMaxMigDeviceCount(h)):
                    try:
                        m = nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
                    except Exception:
                        continue
                    if _uuid_key(nvml.nvmlDeviceGetUUID(m)) == want:
                        return m, f"NVML device {i} MIG {j}"
        except Exception:  # MIG queries unsupported on this GPU
            pass
    raise LookupError(f"no NVML device has the UUID {uuid} of the torch device")


@dataclasses.dataclass
class NvmlView:
    nvml: Any = None
    handle: Any = None
    error: str | None = None
    where: str = ""
    driver: str | None = None

    @property
    def ok(self) -> bool:
        return self.handle is not None

    def used(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)


def open_nvml(device: torch.device) -> NvmlView:
    """NVML for the torch device, or the reason it is unavailable (never raises)."""
    try:
        nvml = _import_pynvml()
    except ImportError as exc:
        why = (
            str(exc)
            if "GAMMACL_NVML" in str(exc)
            else f"nvidia-ml-py (module pynvml) is not installed ({exc})"
        )
        return NvmlView(error=why)
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return NvmlView(error=f"{type(exc).__name__}: {exc}")
    view = NvmlView(nvml=nvml)
    try:
        drv = nvml.nvmlSystemGetDriverVersion()
        view.driver = drv.decode() if isinstance(drv, bytes) else str(drv)
    except Exception:
        pass
    if device.type != "cuda":
        view.error = "no CUDA device (NVML initialised, but there is no torch CUDA device)"
        return view
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        view.handle, view.where = nvml_handle_for_uuid(nvml, uuid)
    except Exception as exc:
        view.error = f"{type(exc).__name__}: {exc}"
    return view


class NvmlSampler:
    """Device used memory (NVML) sampled on a thread every `period_ms` while the block runs."""

    def __init__(self, view: NvmlView, period_ms: float) -> None:
        self.view, self.period = view, period_ms / 1e3
        self.before = self.peak = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            u = self.view.used()
            self.peak = u if self.peak is None else max(self.peak, u)
            self.samples += 1
            self._stop.wait(self.period)

    def __enter__(self) -> NvmlSampler:
        if self.view.ok:
            self.before = self.peak = self.view.used()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            u = self.view.used()
            self.peak = max(self.peak, u)
            self.samples += 1


def measure_memory(
    fn: Callable[[], Any],
    step: Step,
    device: torch.device,
    *,
    nvml: NvmlView | None = None,
    sample_ms: float = 2.0,
) -> dict[str, Any]:
    """One call of fn: torch allocator peaks over what was allocated before it (CUDA), NVML
    device-used peak (CUDA with NVML), process peak RSS over the RSS before it (CPU). Columns a
    device cannot provide are None (null), never 0."""
    out: dict[str, Any] = {
        "base_allocated": None,
        "peak_allocated": None,
        "peak_reserved": None,
        "nvml_before": None,
        "nvml_peak": None,
        "nvml_samples": None,
        "rss_before": None,
        "rss_peak": None,
        "rss_reset": None,
    }
    step.clear_grads()
    if device.type == "cuda":
        sync(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        out["base_allocated"] = torch.cuda.memory_allocated(device)
        sampler = NvmlSampler(nvml, sample_ms) if nvml is not None and nvml.ok else None
        if sampler is not None:
            with sampler:
                res = fn()
                sync(device)
            out.update(
                nvml_before=sampler.before, nvml_peak=sampler.peak, nvml_samples=sampler.samples
            )
        else:
            res = fn()
            sync(device)
        out["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved"] = torch.cuda.max_memory_reserved(device)
        del res
    else:
        gc.collect()
        out["rss_reset"] = reset_peak_rss()
        rss0 = _proc_status_kib("VmRSS")
        res = fn()
        hwm = _proc_status_kib("VmHWM")
        del res
        if rss0 is not None and hwm is not None:
            out["rss_before"], out["rss_peak"] = rss0 * 1024, hwm * 1024
    return out


# ------------------------------------------------------------------------------------------
# metadata, output files, tables, plots
# ------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
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


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _meminfo_mib(key: str) -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def device_capacity(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
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
        "triton": _version("triton"),
        "gammacl": getattr(gammacl, "__version__", None),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "host_mem_total_mib": _meminfo_mib("MemTotal"),
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
        "matplotlib": _version("matplotlib"),
        "nvidia_ml_py": _version("nvidia-ml-py"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(
            device_name=props.name,
            device_uuid=str(props.uuid),
            device_capacity_mib=props.total_memory / MIB,
        )
    else:
        meta["device_name"] = f"{_cpu_model()} ({os.cpu_count()} logical CPUs)"
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


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib (extra 'plot') is absent."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def row_series_label(r: dict) -> str:
    if r["impl"] == "gammacl":
        return f"gammacl[{r['backend']}]"
    return r["impl"]


def plot_bench(rows: list[dict], path: Path, title: str) -> Path | None:
    """Time and TFLOP/s vs N (log-log), one panel row per (loss, D, dtype, mode); the GEMM
    floor is drawn in every panel of its (D, dtype, mode)."""
    plt = pyplot()
    if plt is None:
        return None
    ok = [r for r in rows if r["status"] == "ok" and r["time_ms_p50"] is not None]
    groups = sorted(
        {(r["loss"], r["D"], r["dtype"], r["mode"]) for r in ok if r["loss"] != "floor"},
        key=lambda g: (g[0], g[1], g[2], MODES.index(g[3])),
    )
    if len(groups) > 8:  # many losses: fwd+bwd only, clip / infonce first
        groups = [g for g in groups if g[3] == "fwd+bwd"] or groups
        groups.sort(key=lambda g: (g[0] not in ("clip", "infonce"), g))
    groups = groups[:16]
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 2.8 * len(groups)), squeeze=False)
    for (loss, d, dt, mode), (ax_t, ax_f) in zip(groups, axes, strict=False):
        sel = [
            r
            for r in ok
            if r["D"] == d
            and r["dtype"] == dt
            and r["mode"] == mode
            and (r["loss"] in (loss, "floor") or (loss == "clip" and r["loss"] == "siglip"))
        ]
        for lab in sorted({row_series_label(r) for r in sel}):
            pts = sorted(
                (r["N"], r["time_ms_p50"], r["tflops"]) for r in sel if row_series_label(r) == lab
            )
            style = dict(ls="--", color="k") if lab == "gemm_floor" else {}
            ns = [p[0] for p in pts]
            ax_t.plot(ns, [p[1] for p in pts], marker="o", label=lab, **style)
            fl = [(p[0], p[2]) for p in pts if p[2]]
            if fl:
                ax_f.plot([p[0] for p in fl], [p[1] for p in fl], marker="o", label=lab, **style)
        for ax, what in ((ax_t, "time p50 (ms)"), (ax_f, "TFLOP/s (p50)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N")
            ax.set_ylabel(what)
            ax.set_title(f"{loss}  D={d} {dt} {mode}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
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
    """Peak memory vs N (log-log) per implementation, analytic expectation dashed, failures
    (OOM / over budget) as x, the device capacity (or CPU budget) as a horizontal line."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))

    def add(r: dict) -> float:
        return (r["inputs_mib"] or 0.0) + (r["grads_mib"] or 0.0)

    labels = sorted({r["label"] for r in rows})
    for lab in labels:
        sel = sorted((r for r in rows if r["label"] == lab), key=lambda r: r["N"])
        pts = [
            (r["N"], r[ycol])
            for r in sel
            if r["status"] == "ok" and r[ycol] is not None and r[ycol] > 0
        ]
        line = None
        if pts:
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab)
        # analytic extra, + inputs and grads when the measured column is absolute
        exp = [
            (r["N"], r["expected_extra_mib"] + (add(r) if absolute else 0.0))
            for r in sel
            if r["expected_extra_mib"]
        ]
        if exp:
            ax.plot(
                [p[0] for p in exp],
                [p[1] for p in exp],
                ls=":",
                color=line.get_color() if line else None,
                label=f"{lab} (analytic)",
            )
        bad = [r["N"] for r in sel if r["status"] != "ok" or r.get("fits") is False]
        if bad:
            top = capacity_mib or max([p[1] for p in pts] or [1.0])
            ax.plot(
                bad, [top] * len(bad), ls="", marker="x", color=line.get_color() if line else "r"
            )
    if capacity_mib:
        ax.axhline(capacity_mib, color="k", ls="--", lw=1, label=capacity_label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (batch size)")
    ax.set_ylabel(f"{ycol} (MiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
