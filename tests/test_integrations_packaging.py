"""Packaging (issue 23): the top-level kernels/ never shadows another `kernels` package, a plain
install needs no triton, install lines keep the installed torch, the extension build reports
progress."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path, env: dict | None = None, args=()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args, "-c", code],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_regular_kernels_package_wins_over_the_repo_folder(tmp_path):
    """From the repo root (first on sys.path under `python -c`) a regular package named kernels
    later on sys.path is what `import kernels` finds; gammacl.kernels still imports."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'the other kernels'\n")
    code = (
        "import sys; sys.path.insert(1, sys.argv[-1]); import kernels; print(kernels.MARK); "
        "import gammacl.kernels as k; print(k.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["the", "other", "kernels", "gammacl.kernels"]


def test_hugging_face_kernels_is_found_from_the_repo_root():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("optional dependency: Hugging Face `kernels` is not installed")
    import kernels  # in this pytest process (rootdir on sys.path)

    assert kernels.__file__ and not Path(kernels.__file__).is_relative_to(ROOT / "kernels")
    out = _run("import kernels; from kernels import CUDAProperties", ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_sentence_transformers_imports_from_the_repo_root():
    """transformers imports Hugging Face's kernels when it is installed (issue 23's failure)."""
    pytest.importorskip("sentence_transformers", reason="optional dependency sentence-transformers")
    out = _run("import sentence_transformers", ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def _site_without_triton(tmp_path: Path) -> Path:
    """A folder of links to every entry of this interpreter's site-packages folders except
    triton's: on PYTHONPATH under `python -S`, an environment where triton is not installed."""
    import site

    view = tmp_path / "site"
    view.mkdir()
    for sp in [*site.getsitepackages(), site.getusersitepackages()]:
        if not os.path.isdir(sp):
            continue
        for entry in os.listdir(sp):
            if entry.lower().startswith("triton") or entry.endswith(".pth"):
                continue
            if not (view / entry).exists():
                (view / entry).symlink_to(Path(sp) / entry)
    return view


@pytest.mark.slow
def test_gammacl_works_without_triton(tmp_path):
    """No triton importable: gammacl imports (every module), auto resolves to cpp/torch, the
    losses run, and backend='triton' raises naming the missing package."""
    view = _site_without_triton(tmp_path)
    code = """
import importlib, pkgutil, torch, gammacl
from gammacl import dispatch
assert importlib.util.find_spec("triton") is None
skip = ("gammacl.integrations.", "gammacl.experiments.", "gammacl.measure.")
for m in pkgutil.walk_packages(gammacl.__path__, "gammacl."):
    if not m.name.startswith(skip):
        importlib.import_module(m.name)
x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
ref = gammacl.clip_loss(x, y, 3.0, backend="reference")
out = gammacl.clip_loss(x, y, 3.0, backend="torch")
assert abs(float(out - ref)) < 1e-12, (float(out), float(ref))
print(dispatch.resolve_backend("auto", torch.device("cpu")))
try:
    gammacl.clip_loss(x, y, 3.0, backend="triton")
except RuntimeError as e:
    print("refused:", e)
"""
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(view)]), "GAMMACL_NO_EXT": "1"}
    out = _run(code, tmp_path, env=env, args=("-S", "-W", "ignore"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "torch"
    assert lines[1].startswith("refused:") and "needs the triton package" in lines[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_triton_is_an_extra_and_the_tests_extra_brings_it():
    proj = _pyproject()["project"]
    assert not any(d.startswith("triton") for d in proj["dependencies"])
    extras = proj["optional-dependencies"]
    assert any(d.startswith("triton") for d in extras["triton"])
    assert any(d.startswith("triton") for d in extras["test"])  # the README test command


def test_install_lines_pin_torch_and_ci_checks_it_after_each_install():
    """Every README `pip install` of gammacl or an extra pins torch (and torchvision wherever
    open_clip is installed); .ci/run checks torch.__version__ right after each install step."""
    readme = (ROOT / "README.md").read_text()
    lines = [ln for ln in readme.splitlines() if re.search(r"pip install .*(gammacl|-e )", ln)]
    assert len(lines) >= 3
    for ln in (ln for ln in lines if "--no-deps" not in ln):  # --no-deps keeps any torch
        assert re.search(r"torch==\d", ln), ln
        if "open-clip" in ln or "open_clip" in ln or "integrations]" in ln:
            assert re.search(r"torchvision==\d", ln), ln
    quick = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    assert "python -m gammacl.build_ext" in quick
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = [ln for ln in ci if ln and not ln.startswith("#")]
    installs = [i for i, ln in enumerate(ci) if "pip install" in ln and "torch" in ln]
    assert len(installs) >= 3
    for i in installs:
        assert "check_torch" in ci[i] or "check_torch" in ci[i + 1], ci[i]


def test_build_progress_reports_objects_and_the_measured_estimate(tmp_path, capsys):
    from gammacl._progress import BuildProgress, estimate

    assert "46 s of CPU time measured" in estimate(False, 3)
    assert "not measured" in estimate(True, 5)
    with BuildProgress("C++", tmp_path, 3, cuda=False, interval=3600) as p:
        assert p.compiled() == 0
        (tmp_path / "a.o").write_bytes(b"")
        (tmp_path / "b.o").write_bytes(b"")
        assert p.compiled() == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("gammacl: building the C++ extension (3 sources)")
    assert re.fullmatch(r"gammacl: C\+\+ extension built in \d+ s", err[-1])


@pytest.mark.slow
def test_wheel_installs_kernels_as_gammacl_kernels_only(tmp_path):
    """`pip wheel --no-deps .`: kernels/ ships as gammacl/kernels/ (no top-level `kernels`, no
    __init__.py), triton only under an extra; unpacked and imported from outside the repo,
    gammacl.kernels resolves inside the wheel."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (whl,) = tmp_path.glob("gammacl-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
        z.extractall(tmp_path / "unpacked")
    assert "gammacl/kernels/tiles.py" in names and "gammacl/_layout.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert "gammacl/kernels/__init__.py" not in names
    triton = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist: triton")]
    assert triton and all("extra ==" in ln for ln in triton)
    code = "import gammacl.kernels.tiles as t; print(t.__file__)"
    res = _run(code, tmp_path, env={"PYTHONPATH": str(tmp_path / "unpacked")})
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip()).is_relative_to(tmp_path / "unpacked" / "gammacl" / "kernels")
