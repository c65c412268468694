"""The shape of the house (docs/architecture.md): no import cycle inside gammacl, no oversized
module, and a short path from the public loss to a kernel launcher."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch

import gammacl

simlse_op = importlib.import_module("gammacl.ops.simlse")

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "python" / "gammacl"
KERNELS = ROOT / "kernels"
MAX_LINES = 700


def _module_files() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((PKG, "gammacl"), (KERNELS, "gammacl.kernels")):
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([prefix, *parts])] = f
    return mods


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Every gammacl module `path` imports, at any depth of the file (function-level imports
    are cycles too)."""
    out = set()
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + [base])
                base = base.rstrip(".")
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:
                    out.add(sub)  # `from gammacl import reference`: the submodule
                elif base in known and base != "gammacl":
                    out.add(base)
    out.discard(module)
    return out


def test_no_import_cycle_inside_gammacl():
    mods = _module_files()
    known = set(mods)
    graph = {m: _imports(f, m, known) for m, f in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle through the package
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_cycle_detector_finds_a_cycle(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from gammacl import b\n")
    b.write_text("from gammacl.a import f\n")
    known = {"gammacl.a", "gammacl.b"}
    assert _imports(a, "gammacl.a", known) == {"gammacl.b"}
    assert _imports(b, "gammacl.b", known) == {"gammacl.a"}


def test_no_module_over_700_lines():
    """python/gammacl and kernels/ alike: a kernel file holds one algorithm."""
    long = {
        str(f.relative_to(ROOT)): n
        for base in (PKG, KERNELS)
        for f in base.rglob("*.py")
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _gammacl_frames_between(outer: str, stack: list[inspect.FrameInfo]) -> list[str]:
    """Names of the gammacl frames between the launcher (stack[0]'s caller chain) and the first
    frame named `outer` (exclusive both ends); torch's dispatcher frames are not ours."""
    names = []
    for fr in stack[1:]:
        path = Path(fr.filename).resolve()
        if fr.function == outer and path.is_relative_to(PKG):
            return names
        if path.is_relative_to(PKG) or path.is_relative_to(KERNELS):
            names.append(fr.function)
    raise AssertionError(f"{outer} not on the stack")


def test_clip_loss_forward_reaches_the_launcher_in_four_calls(monkeypatch):
    """ClipLoss.forward -> clip_step -> clip_pairs -> simlse (the custom op) -> launcher."""
    seen = []
    fwd, bwd = simlse_op.torch_fwd, simlse_op.torch_bwd

    def launcher(*args):
        seen.append(_gammacl_frames_between("forward", inspect.stack()))
        return fwd(*args)

    monkeypatch.setitem(simlse_op._IMPLS, "torch", lambda: (launcher, bwd))
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    gammacl.ClipLoss(backend="torch")(a, b, 2.0)
    assert seen, "the torch launcher was not reached"
    assert seen[0] == ["simlse", "clip_pairs", "clip_step"], seen[0]
    assert len(seen[0]) + 1 <= 4


@pytest.mark.parametrize("form", ["function", "module"])
def test_reference_backend_means_the_same_everywhere(form):
    """backend="reference" runs every op on its materialised reference, whichever entry point:
    clip_loss and ClipLoss agree bitwise, and both equal the reference loss."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g)
    b = b.double()
    if form == "function":
        out = gammacl.clip_loss(a, b, 3.0, backend="reference")
    else:
        out = gammacl.ClipLoss(backend="reference")(a, b, 3.0)
    other = gammacl.ClipLoss(backend="reference")(a, b, 3.0)
    assert torch.equal(out, other)
    torch.testing.assert_close(out, gammacl.reference.clip_loss(a, b, 3.0), rtol=1e-12, atol=0)
