"""Builds and loads gammacl's C++ (CPU) and C++/CUDA extensions from csrc/, on first use.

Two shared libraries, both plain torch op libraries (no Python module):
  cpu : every csrc/*.cpp except *_cuda.cpp. Defines the `gammacl::` op schemas
        (TORCH_LIBRARY_FRAGMENT) and their CPU kernels. Flags -O3 -ffp-contract=off -fopenmp.
  cuda: csrc/*_cuda.cpp + csrc/*.cu, only CUDA kernels (TORCH_LIBRARY_IMPL(gammacl, CUDA, ...)).
        Loaded after the cpu library, which owns the schemas, so both can live in one process.
        Needs a CUDA torch, a visible GPU and nvcc (CUDA_HOME); links cuBLAS.
        Archs: TORCH_CUDA_ARCH_LIST (default "8.0;9.0").

torch.utils.cpp_extension (ninja) compiles them into GAMMACL_EXT_DIR, else
<repo>/.ext_build/<torch version>-py<XY>-<cpu|cuda> when the source tree is a writable checkout
(editable install), else ~/.cache/gammacl/ext/<same>. ninja rebuilds whatever changed (sources
and headers), so editing csrc/ needs no manual step. `python -m gammacl.build_ext [--cuda]` builds
ahead of time. GAMMACL_NO_EXT=1 disables both (the dispatcher then falls back to the torch backend
with one warning).

Stand-ins: `register_cuda_provider(device_type, load)` lets backend="cuda" run on tensors of
another device type through an op library with the same schemas (tests/cuda_emu registers the
CPU emulation of csrc's CUDA code this way); `op(name, cuda)` is how the ops call a compiled
kernel, picking the library from the tensors' device at call time.

Fake (meta) kernels of the compiled ops are written beside their op contracts
(gammacl/ops/<op>.py) with the decorator `compiled_fake("gammacl::<name>")`; they are registered
(torch.library.register_fake) when the CPU library loads, so torch.compile and
torch.library.opcheck can trace them with symbolic shapes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gammacl._progress import BuildProgress

_LOCK = threading.RLock()
_STATE: dict[bool, tuple[bool, str]] = {}
_BUILT: dict[bool, str] = {}
_FAKES_REGISTERED = False
_FAKES: dict[str, Callable[..., Any]] = {}  # compiled op name -> its fake (compiled_fake)
# device type -> loader of an op library standing in for the CUDA library on that device type
_CUDA_PROVIDERS: dict[str, Callable[[], Any]] = {}


def csrc_dir() -> Path:
    """Directory of the C++/CUDA sources (the gammacl.csrc package)."""
    import gammacl.csrc

    return Path(gammacl.csrc.__file__).resolve().parent


def sources(cuda: bool = False) -> list[Path]:
    """Sources of the cpu library, or of the cuda library when cuda=True."""
    d = csrc_dir()
    if cuda:
        return sorted(d.glob("*_cuda.cpp")) + sorted(d.glob("*.cu"))
    return sorted(p for p in d.glob("*.cpp") if not p.name.endswith("_cuda.cpp"))


def _tag(cuda: bool) -> str:
    return (
        f"{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-"
        f"{'cuda' if cuda else 'cpu'}"
    )


def build_dir(cuda: bool = False) -> Path:
    """Where the library for `cuda` is (or will be) built; see the module docstring."""
    env = os.environ.get("GAMMACL_EXT_DIR", "").strip()
    if env:
        return Path(env).expanduser() / _tag(cuda)
    repo = csrc_dir().parent
    if (repo / "pyproject.toml").is_file() and os.access(repo, os.W_OK):
        return repo / ".ext_build" / _tag(cuda)
    cache = Path(os.environ.get("XDG_CACHE_HOME", "") or Path.home() / ".cache")
    return cache / "gammacl" / "ext" / _tag(cuda)


def _name(cuda: bool) -> str:
    return "gammacl_cuda" if cuda else "gammacl_cpu"


def _arch_flags() -> list[str]:
    """-gencode flags from TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), e.g. "8.0;9.0a+PTX"."""
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or "8.0;9.0"
    flags = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        arch = item.removesuffix("+PTX")
        num = arch.replace(".", "")
        if not num.rstrip("af").isdigit():
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {item!r} is not like '8.0' or '9.0a+PTX'")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _wheel_cuda_dirs() -> tuple[list[Path], list[Path]]:
    """(include dirs, library dirs) of the nvidia-* wheels CUDA builds of torch depend on: CUDA
    13's one folder (nvidia/cu13/include, nvidia/cu13/lib: libcublas.so.13, cusparse.h, ...) and
    CUDA 12's one folder per library (nvidia/cublas/include, nvidia/cublas/lib, ...)."""
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return [], []
    incs, libs = [], []
    for root in map(Path, nvidia.__path__):
        for pkg in sorted(root.iterdir()):
            if (pkg / "include").is_dir():
                incs.append(pkg / "include")
            if (pkg / "lib").is_dir():
                libs.append(pkg / "lib")
    return incs, libs


def _toolkit_has(sub: str, name: str) -> bool:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    return bool(home) and any((Path(home) / d / name).exists() for d in sub.split(","))


def _cuda_include_paths() -> list[str]:
    """The wheels' header folders when the toolkit at CUDA_HOME lacks the library headers that
    torch's ATen/cuda headers include (cusparse.h, cublas_v2.h: an nvcc-only toolkit)."""
    if _toolkit_has("include", "cusparse.h") and _toolkit_has("include", "cublas_v2.h"):
        return []
    return [str(p) for p in _wheel_cuda_dirs()[0]]


def _cublas_ldflags() -> list[str]:
    """Link flags for cuBLAS (cublasGemmEx on torch's handle): the toolkit's libcublas.so, else
    the versioned library of the nvidia wheels (CUDA 13: nvidia/cu13/lib/libcublas.so.13; CUDA 12:
    nvidia/cublas/lib/libcublas.so.12)."""
    if _toolkit_has("lib64,lib", "libcublas.so"):
        return ["-lcublas"]
    for lib_dir in _wheel_cuda_dirs()[1]:
        libs = sorted(lib_dir.glob("libcublas.so.*"))
        if libs:
            return [f"-L{lib_dir}", f"-l:{libs[0].name}"]
    return ["-lcublas"]


def _needs_compile(cuda: bool) -> bool:
    lib = build_dir(cuda) / f"{_name(cuda)}.so"
    if not lib.exists():
        return True
    t = lib.stat().st_mtime
    d = csrc_dir()
    deps = sources(cuda) + sorted(d.glob("*.h")) + sorted(d.glob("*.cuh"))
    deps += sorted((d / "platform").glob("*.h"))
    return any(p.stat().st_mtime > t for p in deps)


def _toolchain_problem(cuda: bool) -> str | None:
    if os.environ.get("GAMMACL_NO_EXT", "0") not in ("", "0"):
        return "disabled by GAMMACL_NO_EXT=1"
    from torch.utils import cpp_extension

    if not sources(cuda):
        return f"no {'CUDA ' if cuda else ''}sources in {csrc_dir()}"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found ({cxx!r} is not on PATH; set CXX)"
    if cuda:
        if torch.version.cuda is None:
            return f"this torch build ({torch.__version__}) has no CUDA support"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        home = cpp_extension.CUDA_HOME
        if home is None or not (Path(home) / "bin" / "nvcc").exists():
            return "nvcc not found (set CUDA_HOME to a CUDA toolkit matching torch.version.cuda)"
    return None


def _build(cuda: bool) -> str:
    """Compiles (when needed) and loads one library; returns the .so path."""
    from torch.utils import cpp_extension

    out = build_dir(cuda)
    kw: dict = {}
    # -ffp-contract=off: no fused multiply-add across statements. A logit l = s * x feeds both
    # the row max m and the exponent l - m; contracted into fma(s, x, -m) the exponent uses the
    # unrounded product, so exp(l_max - m) != 1 and, at |l| ~ 1e3, gradients are off by ~ulp(l)
    # (2e-4 relative; tests/test_large_logits.py).
    cflags = ["-O3", "-ffp-contract=off"]
    if sys.platform.startswith("linux"):
        cflags.append("-fopenmp")
    ldflags = ["-fopenmp"] if sys.platform.startswith("linux") else []
    if cuda:
        kw["extra_cuda_cflags"] = ["-O3", "-lineinfo", *_arch_flags()]
        cflags = ["-O3"]
        ldflags = _cublas_ldflags()
        # after the toolkit's own headers (-idirafter): the wheels only fill in what it lacks
        for inc in _cuda_include_paths():
            cflags += ["-idirafter", inc]
    n = len(sources(cuda))
    progress = BuildProgress("C++/CUDA" if cuda else "C++", out, n, cuda)
    with progress if _needs_compile(cuda) else contextlib.nullcontext():
        path = cpp_extension.load(
            name=_name(cuda),
            sources=[str(p) for p in sources(cuda)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            # platform/: the real <gammacl_cuda_device.h> / <gammacl_cuda_torch.h> (tests/cuda_emu
            # has the CPU emulator's versions of the two and puts its own directory there instead)
            extra_include_paths=[str(csrc_dir()), str(csrc_dir() / "platform")],
            build_directory=str(out),
            with_cuda=cuda,
            is_python_module=False,
            verbose=False,
            **kw,
        )
    return str(path)


# torch.utils.cpp_extension's FileBaton in the build directory: a build killed mid-compile leaves
# it behind and every later load() waits on it forever.
_TORCH_LOCK = "lock"
# gammacl's own lock beside it: an flock, released by the kernel when its holder dies, so whoever
# holds it knows no other gammacl build runs and any FileBaton left is stale.
_FLOCK = "gammacl-build.flock"
# A CUDA build's attempt record: written before compiling, removed on success, so it remains
# after a failure or a kill; later processes (pytest, sanitizers, bench, profile of one GPU
# session) read it instead of compiling again (GAMMACL_EXT_RETRY=1 or build_ext retries).
FAILED_MARK = "gammacl-build-failed.txt"


@contextlib.contextmanager
def _build_lock(out: Path):
    """Exclusive flock on out/_FLOCK for the build; then removes a stale torch FileBaton."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's FileBaton alone
        yield
        return
    with open(out / _FLOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            (out / _TORCH_LOCK).unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fingerprint(cuda: bool) -> str:
    """What a retry must differ in: the sources' newest mtime, the archs and the toolkit."""
    d = csrc_dir()
    deps = sources(cuda) + sorted(d.glob("*.h")) + sorted(d.glob("*.cuh"))
    newest = max((p.stat().st_mtime_ns for p in deps), default=0)
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    return f"sources={newest} arch={arch!r} cuda_home={os.environ.get('CUDA_HOME', '')!r}"


def _earlier_failure(out: Path, cuda: bool) -> str | None:
    """The recorded reason when an earlier CUDA build with the same fingerprint failed or was
    killed, unless GAMMACL_EXT_RETRY=1."""
    mark = out / FAILED_MARK
    if not cuda or os.environ.get("GAMMACL_EXT_RETRY", "0") not in ("", "0") or not mark.exists():
        return None
    first, _, reason = mark.read_text().partition("\n")
    return reason.strip() or "no reason recorded" if first == _fingerprint(cuda) else None


def _build_once(cuda: bool) -> str:
    """_build under the build lock; a CUDA build is attempted once per fingerprint (see
    FAILED_MARK), so the steps of a session do not each spend their budget on it."""
    out = build_dir(cuda)
    out.mkdir(parents=True, exist_ok=True)
    with _build_lock(out):
        earlier = _earlier_failure(out, cuda)
        if earlier is not None:
            raise RuntimeError(
                f"an earlier CUDA build in {out} failed and is not retried: {earlier} (fix the "
                "cause, then `python -m gammacl.build_ext --cuda` or GAMMACL_EXT_RETRY=1)"
            )
        mark = out / FAILED_MARK
        if cuda:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            mark.write_text(f"{_fingerprint(cuda)}\nkilled during the build started {started} UTC")
        try:
            path = _build(cuda)
        except BaseException as exc:
            if cuda:
                mark.write_text(f"{_fingerprint(cuda)}\n{_short(exc, 600)}")
            (out / _TORCH_LOCK).unlink(missing_ok=True)
            raise
        mark.unlink(missing_ok=True)
        return path


def compiled_fake(op: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: `fn` is the fake (shape/dtype-only) kernel of compiled op `op`, registered when
    the CPU library loads (at once if it is loaded already)."""

    def record(fn: Callable[..., Any]) -> Callable[..., Any]:
        _FAKES[op] = fn
        if _FAKES_REGISTERED:
            _register_fake(op, fn)
        return fn

    return record


def _register_fake(op: str, fn: Callable[..., Any]) -> None:
    try:
        torch.library.register_fake(op, fn)
    except RuntimeError as exc:  # registered elsewhere already: keep that one
        if "already" not in str(exc):
            raise


def _register_fakes() -> None:
    """Shape/dtype-only kernels for FakeTensor / torch.compile / opcheck (once per process): the
    ones compiled_fake recorded beside the op contracts (the ops modules are imported with
    gammacl, before any library loads)."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return

    for op, fn in _FAKES.items():
        _register_fake(op, fn)
    _FAKES_REGISTERED = True


def _short(exc: BaseException, limit: int = 1500) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip()
    return msg if len(msg) <= limit else "... " + msg[-limit:]


def _try_load(cuda: bool) -> tuple[bool, str]:
    problem = _toolchain_problem(cuda)
    if problem is not None:
        return False, problem
    if cuda:
        ok, why = available(cuda=False)
        if not ok:
            return False, f"the CPU library (which defines the op schemas) is unavailable: {why}"
    try:
        _BUILT[cuda] = _build_once(cuda)
        if not cuda:
            _register_fakes()
    except Exception as exc:  # compiler errors, missing headers, ABI problems: report, never raise
        where = build_dir(cuda)
        return False, f"building the {'CUDA' if cuda else 'C++'} extension in {where} failed: " + (
            _short(exc)
        )
    return True, ""


def register_cuda_provider(device_type: str, load: Callable[[], Any] | None) -> None:
    """backend="cuda" on tensors of `device_type` (not "cuda") runs the ops of the library that
    `load()` returns: an object with the gammacl ops (simlse_fwd, simlse_bwd, gamma_onepass_fwd,
    siglip_fwd) under the same schemas, taking tensors of that device type. None removes it."""
    if device_type == "cuda":
        raise ValueError("the CUDA library itself serves device type 'cuda'")
    if load is None:
        _CUDA_PROVIDERS.pop(device_type, None)
    else:
        _CUDA_PROVIDERS[device_type] = load


def cuda_provider(device_type: str) -> Callable[[], Any] | None:
    """The registered stand-in for the CUDA library on `device_type`, or None."""
    return _CUDA_PROVIDERS.get(device_type)


@torch.compiler.assume_constant_result  # torch.compile calls it eagerly, never traces the lock
def available(cuda: bool = False, device_type: str = "cuda") -> tuple[bool, str]:
    """(True, "") when the cpu (or cuda) library is built and loaded, else (False, reason).
    Builds on first call; the answer is cached for the process. Never raises. With cuda=True
    and another `device_type`, whether a stand-in is registered for it."""
    if cuda and device_type != "cuda":
        if device_type in _CUDA_PROVIDERS:
            return True, ""
        return False, f"the CUDA kernels run on CUDA tensors, not on {device_type!r} tensors"
    state = _STATE.get(cuda)
    if state is not None:
        return state
    with _LOCK:
        if cuda not in _STATE:
            try:
                _STATE[cuda] = _try_load(cuda)
            except Exception as exc:  # pragma: no cover - belt and braces
                _STATE[cuda] = (False, _short(exc))
        return _STATE[cuda]


def load(cuda: bool = False, device_type: str | None = None):
    """torch.ops.gammacl, after making sure the cpu (and, for cuda=True, cuda) library is loaded
    (for cuda=True and another `device_type`: its registered stand-in). Raises RuntimeError with
    the reason when it cannot be."""
    if cuda and device_type not in (None, "cuda"):
        provider = _CUDA_PROVIDERS.get(device_type)
        if provider is None:
            raise RuntimeError(available(cuda=True, device_type=device_type)[1])
        return provider()
    ok, why = available(cuda=cuda)
    if not ok:
        raise RuntimeError(f"gammacl {'CUDA' if cuda else 'C++'} extension unavailable: {why}")
    return torch.ops.gammacl


def op(name: str, cuda: bool) -> Callable[..., Any]:
    """The compiled op `name` of the cpp (cuda=False) or cuda library as a function of the op's
    arguments; the library is picked from the first argument's device when called."""

    def call(a: torch.Tensor, *args: Any) -> Any:
        return getattr(load(cuda=cuda, device_type=a.device.type), name)(a, *args)

    call.__name__ = call.__qualname__ = f"{name}[{'cuda' if cuda else 'cpp'}]"
    return call


def library_path(cuda: bool = False) -> str | None:
    """Path of the loaded library, or None when it is not loaded."""
    return _BUILT.get(cuda)
