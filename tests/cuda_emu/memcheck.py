"""Memory check of the cuda backend's kernels and bindings under the CPU emulator, built with
AddressSanitizer: every op (simlse with 0-d and vector scales, gamma_onepass, siglip) on every
dtype, one and many row chunks, strided rows. Any out-of-bounds read or write of a buffer
(torch's CPU allocations get ASan redzones) aborts with an "ERROR: AddressSanitizer" report.

Must run with libasan preloaded (tests/test_cuda_emu.py::test_cuda_emu_memcheck does):
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
        PYTHONPATH=tests python tests/cuda_emu/memcheck.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cuda_emu.build import load  # noqa: E402


def main() -> int:
    ops = load(asan=True)
    g = torch.Generator().manual_seed(0)
    cases = 0
    for chunk in ("", "0.02"):
        if chunk:
            os.environ["GAMMACL_CUDA_CHUNK_MIB"] = chunk
        else:
            os.environ.pop("GAMMACL_CUDA_CHUNK_MIB", None)
        for m, n, d in ((130, 300, 16), (70, 257, 5), (9, 1030, 8), (1, 1, 4)):
            for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                acc = torch.float64 if dt == torch.float64 else torch.float32
                a = torch.randn(m, d + 3, generator=g).to(dt)[:, :d]  # row stride d + 3
                b = torch.randn(n, d, generator=g).to(dt)
                s = torch.tensor(3.0, dtype=acc)
                gr = torch.randn(m, generator=g).to(acc)
                gc = torch.randn(n, generator=g).to(acc)
                rs = 3.0 + torch.rand(m, generator=g).to(acc)  # per-row / per-column scales
                cs = 3.0 + torch.rand(n, generator=g).to(acc)
                for exclude, cols in ((False, True), (True, True), (True, False)):
                    g_c = gc if cols else gc[:0]
                    r, c = ops.simlse_fwd(a, b, s, 1, exclude, cols)
                    ops.simlse_bwd(a, b, s, r, c, gr, g_c, 1, exclude, cols)
                    v = cs if cols else None
                    r, c = ops.simlse_fwd(a, b, rs, 1, exclude, cols, v)
                    ops.simlse_bwd(a, b, rs, r, c, gr, g_c, 1, exclude, cols, v)
                    cases += 2
                for grad in (True, False):
                    ops.gamma_onepass_fwd(a, b, s, gr, gc, 0.5, 0.25, 30.0, -1, grad)
                    ops.siglip_fwd(a, b, s, torch.tensor(-2.0, dtype=acc), 1, grad)
                    cases += 2
    print(f"memcheck: {cases} op calls clean", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
