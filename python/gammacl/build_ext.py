"""Build gammacl's compiled extensions ahead of time (otherwise they build on first use).

    python -m gammacl.build_ext            # the C++ CPU library (csrc/*.cpp)
    python -m gammacl.build_ext --cuda     # ... and the CUDA library (csrc/*_cuda.cpp, csrc/*.cu)

Environment: GAMMACL_EXT_DIR (build directory root), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"),
CXX, CUDA_HOME, MAX_JOBS (parallel compile jobs, read by torch.utils.cpp_extension).
Exit status 0 when everything asked for was built and loaded, 1 otherwise (the reason is printed).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _ops() -> list[str]:
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n for n in names if n.startswith("gammacl::"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gammacl.build_ext",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cuda", action="store_true", help="also build the CUDA library")
    args = parser.parse_args(argv)
    # an explicit build retries a CUDA build that failed earlier (_ext.FAILED_MARK)
    os.environ.setdefault("GAMMACL_EXT_RETRY", "1")

    from gammacl import _ext

    status = 0
    for cuda in (False, True) if args.cuda else (False,):
        kind = "CUDA" if cuda else "C++ (CPU)"
        ok, why = _ext.available(cuda=cuda)
        if not ok:
            print(f"gammacl: {kind} extension NOT built: {why}", file=sys.stderr)
            status = 1
            continue
        print(f"gammacl: {kind} extension ready: {_ext.library_path(cuda)}")
        print(
            f"  sources: {', '.join(p.name for p in _ext.sources(cuda))} (from {_ext.csrc_dir()})"
        )
    if status == 0:
        print(f"  ops: {', '.join(_ops())}")
    return status


if __name__ == "__main__":
    sys.exit(main())
