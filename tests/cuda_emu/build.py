"""Builds the CUDA emulation library: csrc/*_cuda.cpp and csrc/*.cu compiled by the host compiler
with this directory on the include path, so the platform headers the sources include
(<gammacl_cuda_device.h>, <gammacl_cuda_torch.h>) are the emulator's (cuda_emu.h,
cuda_emu_torch.h) rather than csrc/platform/'s; registered as CPU kernels of the
`gammacl_cuda_emu::` ops, whose schemas are those of the real `gammacl::` ops.

    from cuda_emu.build import load
    ops = load()        # torch.ops.gammacl_cuda_emu (simlse_fwd, simlse_bwd, gamma_onepass_fwd)

Each source is compiled through a one-line wrapper .cpp that #includes it (torch.utils.
cpp_extension would hand a .cu file to nvcc). ninja rebuilds on any change of the sources or
headers. The build directory is <repo>/.ext_build/cuda-emu-<torch>-py<XY> (GAMMACL_EXT_DIR
honoured, as for the real extensions).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from gammacl import _ext

EMU = Path(__file__).resolve().parent
REPO = EMU.parent.parent
CSRC = REPO / "csrc"
OPS = ("simlse_fwd", "simlse_bwd", "gamma_onepass_fwd", "siglip_fwd")
_LIB = None  # the torch.library.Library holding the schemas (must stay alive)


def build_dir(asan: bool = False) -> Path:
    tag = f"cuda-emu{'-asan' if asan else ''}-{torch.__version__}-py{sys.version_info.major}"
    tag += str(sys.version_info.minor)
    env = os.environ.get("GAMMACL_EXT_DIR", "").strip()
    return (Path(env).expanduser() if env else REPO / ".ext_build") / tag


def _define_schemas() -> None:
    global _LIB
    if _LIB is not None:
        return
    from gammacl import _ext

    real = _ext.load()  # the CPU library owns the gammacl:: schemas
    lib = torch.library.Library("gammacl_cuda_emu", "DEF")
    for name in OPS:
        schema = str(getattr(real, name).default._schema)
        lib.define(schema.split("::", 1)[1])
    _LIB = lib


def load(asan: bool = False):
    """torch.ops.gammacl_cuda_emu with the emulated CUDA kernels registered for CPU tensors.
    asan=True builds with AddressSanitizer (the process must preload libasan: test_cuda_emu.py's
    memcheck test runs it in a subprocess)."""
    from torch.utils import cpp_extension

    _define_schemas()
    out = build_dir(asan)
    out.mkdir(parents=True, exist_ok=True)
    wrappers = []
    for src in sorted(CSRC.glob("*_cuda.cpp")) + sorted(CSRC.glob("*.cu")):
        w = out / f"emu_{src.stem}_{src.suffix[1:]}.cpp"
        text = f'#include "{src}"\n'
        if not w.exists() or w.read_text() != text:
            w.write_text(text)
        wrappers.append(str(w))
    flags = [
        "-O2",
        "-fno-strict-aliasing",
        "-ffp-contract=off",
        "-Wno-unknown-pragmas",
    ]
    if asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
    with _ext._build_lock(out):  # a build killed mid-compile leaves no lock to hang on
        cpp_extension.load(
            name="gammacl_cuda_emu_asan" if asan else "gammacl_cuda_emu",
            sources=[*wrappers, str(EMU / "emu_runtime.cpp")],
            extra_cflags=flags,
            extra_ldflags=["-fsanitize=address"] if asan else [],
            extra_include_paths=[str(CSRC), str(EMU)],
            build_directory=str(out),
            is_python_module=False,
            with_cuda=False,
            verbose=False,
        )
    return torch.ops.gammacl_cuda_emu


def load_selftest():
    """torch.ops.gammacl_emu_selftest: the emulator's own self-test kernels (selftest.cpp)."""
    from torch.utils import cpp_extension

    out = build_dir().parent / (build_dir().name + "-selftest")
    out.mkdir(parents=True, exist_ok=True)
    with _ext._build_lock(out):
        cpp_extension.load(
            name="gammacl_emu_selftest",
            sources=[str(EMU / "selftest.cpp")],
            extra_cflags=["-O1", "-Wno-unknown-pragmas"],
            extra_include_paths=[str(EMU)],
            build_directory=str(out),
            is_python_module=False,
            with_cuda=False,
            verbose=False,
        )
    return torch.ops.gammacl_emu_selftest
