"""Progress lines for the extension build (gammacl._ext), which otherwise runs silently for the
minutes a cold build takes on a small or busy machine.

Measured cost of the CPU library (3 sources, -O3, torch 2.13 headers): 46 s of CPU time in all on
a 2-core AMD EPYC (2 min 51 s wall there with the machine's load average at ~15); ninja compiles
the sources in parallel, so the wall time is about the largest source's share on an idle machine
with a core per source, and stretches with load. The CUDA library has not been timed (no GPU).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

CPU_SECONDS = {False: 46.0}  # measured compile CPU time of the whole library, by cuda flag
INTERVAL_S = 15.0


def estimate(cuda: bool, n_sources: int) -> str:
    cpu = CPU_SECONDS.get(cuda)
    if cpu is None:
        return "time not measured yet (several minutes expected: nvcc, two architectures)"
    jobs = min(n_sources, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
    plural = "s" if jobs > 1 else ""
    return (
        f"{cpu / jobs:.0f}-{cpu:.0f} s with {jobs} parallel job{plural} on an idle machine "
        f"({cpu:.0f} s of CPU time measured), several times that on a busy one"
    )


class BuildProgress:
    """Context manager: prints what is built with the estimate, then every `interval` seconds
    the objects compiled so far and the elapsed time, then the total time."""

    def __init__(self, what: str, out: Path, n_sources: int, cuda: bool, interval=INTERVAL_S):
        self.what, self.out, self.n, self.cuda, self.interval = what, out, n_sources, cuda, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = 0.0

    def _say(self, msg: str) -> None:
        print(f"gammacl: {msg}", file=sys.stderr, flush=True)

    def compiled(self) -> int:
        return sum(1 for p in self.out.glob("*.o") if p.stat().st_mtime >= self.t0 - 1.0)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            done = self.compiled()
            step = "linking" if done >= self.n else f"{done}/{self.n} sources compiled"
            self._say(f"  ... {step}, {time.monotonic() - self.m0:.0f} s")

    def __enter__(self) -> BuildProgress:
        self.t0, self.m0 = time.time(), time.monotonic()
        self._say(
            f"building the {self.what} extension ({self.n} sources) in {self.out}: "
            f"{estimate(self.cuda, self.n)}; once per torch version (cached)"
        )
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        status = "failed" if exc_type is not None else "built"
        self._say(f"{self.what} extension {status} in {time.monotonic() - self.m0:.0f} s")
