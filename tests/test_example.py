"""examples/train_clip.py at tiny scale: one process, and torchrun with 2 gloo processes on CPU.
The loss must fall and held-out image->text recall@1 must rise far above chance."""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import gammacl

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_clip.py"
TIMEOUT_S = 180
TINY = [
    "--steps",
    "40",
    "--batch-size",
    "32",
    "--num-samples",
    "1024",
    "--eval-size",
    "128",
    "--backend",
    "torch",
    "--log-every",
    "20",
    "--json",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("GAMMACL_BACKEND", None)
    # own session, so a hang kills torchrun *and* its workers
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT_S}s\n{out}\n{err}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, f"expected one RESULT line (rank 0 only):\n{out}"
    return json.loads(lines[0][len("RESULT ") :])


def _torchrun(nproc: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(SCRIPT),
        *extra,
    ]


def _assert_learned(res: dict, world: int) -> None:
    assert res["world_size"] == world
    if res["loss"] == "clip":
        assert res["loss_last"] < 0.5 * res["loss_first"], res
    else:  # the gamma objective's estimate (negative: Z excludes the positive and is a mean)
        assert res["loss_last"] < res["loss_first"] - 1.0, res
    assert res["recall_after"] >= 0.3, res  # chance is 1/128
    assert res["recall_after"] > res["recall_before"] + 0.2, res


def test_example_single_process_clip():
    _assert_learned(_run([sys.executable, str(SCRIPT), "--loss", "clip", *TINY]), 1)


@pytest.mark.slow
def test_example_torchrun_two_processes_clip():
    _assert_learned(_run(_torchrun(2, ["--loss", "clip", *TINY])), 2)


def test_gamma_has_the_distributed_hook():
    """The torchrun gamma example relies on GammaClipLoss sharing one state across ranks (its
    `distributed` hook); a missing hook is a failure, not a skip."""
    assert "distributed" in inspect.signature(gammacl.GammaClipLoss.__init__).parameters


def test_example_single_process_gamma():
    _assert_learned(_run([sys.executable, str(SCRIPT), "--loss", "gamma", *TINY]), 1)


@pytest.mark.slow
def test_example_torchrun_two_processes_gamma():
    _assert_learned(_run(_torchrun(2, ["--loss", "gamma", *TINY])), 2)
