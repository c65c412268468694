"""Building the C++/CUDA extension on a GPU box's stack (issue 22), without compiling anything:
cuBLAS and its headers found in the CUDA 13 wheel layout (torch 2.11.0+cu130) and in CUDA 12's;
a stale torch build lock (a build killed mid-compile) removed before the next build; a failed or
killed CUDA build attempted once, not by every later process of a session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from gammacl import _ext


def _nvidia_wheels(monkeypatch, root: Path, layout: dict[str, list[str]]) -> None:
    """A fake `nvidia` namespace package under root: {relative dir: [file names]}."""
    for rel, names in layout.items():
        (root / "nvidia" / rel).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / "nvidia" / rel / name).write_text("")
    pkg = types.ModuleType("nvidia")
    pkg.__path__ = [str(root / "nvidia")]
    monkeypatch.setitem(sys.modules, "nvidia", pkg)
    toolkit = root / "nvcc-only"  # a toolkit with nvcc and nothing else
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("")
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(toolkit))


def test_cuda13_wheel_layout(tmp_path, monkeypatch):
    _nvidia_wheels(
        monkeypatch,
        tmp_path,
        {
            "cu13/include": ["cusparse.h", "cublas_v2.h"],
            "cu13/lib": ["libcublasLt.so.13", "libcublas.so.13"],
            "cudnn/lib": ["libcudnn.so.9"],
        },
    )
    lib = tmp_path / "nvidia" / "cu13" / "lib"
    assert _ext._cublas_ldflags() == [f"-L{lib}", "-l:libcublas.so.13"]
    assert str(tmp_path / "nvidia" / "cu13" / "include") in _ext._cuda_include_paths()


def test_cuda12_wheel_layout(tmp_path, monkeypatch):
    _nvidia_wheels(
        monkeypatch,
        tmp_path,
        {
            "cublas/include": ["cublas_v2.h"],
            "cublas/lib": ["libcublas.so.12"],
            "cusparse/include": ["cusparse.h"],
        },
    )
    lib = tmp_path / "nvidia" / "cublas" / "lib"
    assert _ext._cublas_ldflags() == [f"-L{lib}", "-l:libcublas.so.12"]
    incs = _ext._cuda_include_paths()
    assert str(tmp_path / "nvidia" / "cusparse" / "include") in incs
    assert str(tmp_path / "nvidia" / "cublas" / "include") in incs


def test_full_toolkit_needs_no_wheels(tmp_path, monkeypatch):
    _nvidia_wheels(monkeypatch, tmp_path, {"cu13/lib": ["libcublas.so.13"]})
    from torch.utils import cpp_extension

    home = Path(cpp_extension.CUDA_HOME)
    for rel in ("include/cusparse.h", "include/cublas_v2.h", "lib64/libcublas.so"):
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text("")
    assert _ext._cublas_ldflags() == ["-lcublas"]
    assert _ext._cuda_include_paths() == []


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """build_dir -> tmp_path/<tag>; _build replaced by a recorder that leaves torch's lock file
    behind like a compile in progress and raises when `fail` is set."""
    monkeypatch.setenv("GAMMACL_EXT_DIR", str(tmp_path))
    monkeypatch.delenv("GAMMACL_EXT_RETRY", raising=False)
    calls = {"n": 0, "fail": None, "lock_seen": []}

    def build(cuda: bool) -> str:
        out = _ext.build_dir(cuda)
        calls["n"] += 1
        calls["lock_seen"].append((out / _ext._TORCH_LOCK).exists())
        (out / _ext._TORCH_LOCK).write_text("")
        if calls["fail"]:
            raise RuntimeError(calls["fail"])
        (out / _ext._TORCH_LOCK).unlink()
        return str(out / "lib.so")

    monkeypatch.setattr(_ext, "_build", build)
    return calls


@pytest.mark.parametrize("cuda", [False, True])
def test_stale_torch_lock_removed_before_building(fake_build, cuda):
    out = _ext.build_dir(cuda)
    out.mkdir(parents=True)
    (out / _ext._TORCH_LOCK).write_text("")  # left by a build killed mid-compile
    assert _ext._build_once(cuda).endswith("lib.so")
    assert fake_build["lock_seen"] == [False]
    assert not (out / _ext.FAILED_MARK).exists()


def test_failed_cuda_build_attempted_once(fake_build, monkeypatch):
    fake_build["fail"] = "nvcc fatal: cusparse.h: No such file"
    with pytest.raises(RuntimeError, match="cusparse.h"):
        _ext._build_once(True)
    out = _ext.build_dir(True)
    assert not (out / _ext._TORCH_LOCK).exists()
    with pytest.raises(RuntimeError, match="earlier CUDA build .* not retried: .*cusparse.h"):
        _ext._build_once(True)
    assert fake_build["n"] == 1
    monkeypatch.setenv("GAMMACL_EXT_RETRY", "1")
    fake_build["fail"] = None
    _ext._build_once(True)
    assert fake_build["n"] == 2 and not (out / _ext.FAILED_MARK).exists()
    # a CPU build is always retried (a developer's interrupted run must not stick)
    monkeypatch.delenv("GAMMACL_EXT_RETRY")
    fake_build["fail"] = "g++: internal compiler error"
    for _ in range(2):
        with pytest.raises(RuntimeError, match="internal compiler error"):
            _ext._build_once(False)
    assert fake_build["n"] == 4


def test_changed_sources_retry_a_failed_build(fake_build, monkeypatch):
    fake_build["fail"] = "boom"
    with pytest.raises(RuntimeError, match="boom"):
        _ext._build_once(True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")  # a different fingerprint
    with pytest.raises(RuntimeError, match="^boom"):
        _ext._build_once(True)
    assert fake_build["n"] == 2


@pytest.mark.slow  # a child process importing torch: ~5 s idle, far more on a loaded host
def test_build_killed_mid_compile(tmp_path, monkeypatch):
    """SIGKILL during the compile (a step's timeout): the next process finds no stale lock to wait
    on and does not compile again; it reports the killed attempt."""
    monkeypatch.setenv("GAMMACL_EXT_DIR", str(tmp_path))
    monkeypatch.delenv("GAMMACL_EXT_RETRY", raising=False)
    out = _ext.build_dir(True)
    child = textwrap.dedent(
        f"""
        import time, pathlib
        from gammacl import _ext
        def build(cuda):
            out = _ext.build_dir(cuda)
            (out / _ext._TORCH_LOCK).write_text("")
            pathlib.Path({str(tmp_path / "compiling")!r}).write_text("")
            time.sleep(60)
        _ext._build = build
        _ext._build_once(True)
        """
    )
    env = {**os.environ, "GAMMACL_EXT_DIR": str(tmp_path)}
    env.pop("GAMMACL_EXT_RETRY", None)
    proc = subprocess.Popen([sys.executable, "-c", child], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "compiling").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "child never compiled"
            time.sleep(0.05)
        assert (out / _ext._TORCH_LOCK).exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    calls = []
    monkeypatch.setattr(_ext, "_build", lambda cuda: calls.append(cuda))
    with pytest.raises(RuntimeError, match="killed during the build started"):
        _ext._build_once(True)
    assert calls == [] and not (out / _ext._TORCH_LOCK).exists()
