"""The README's Quick start is one bash block of exactly two commands, and CI runs the second."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no ```bash block under ## Quick start"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_has_two_commands():
    cmds = _quick_start_commands()
    assert len(cmds) == 2, cmds
    assert "gammacl.bench" in cmds[0] and "gammacl.profile" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _quick_start_commands()[1] in ci


_SOURCES = ("README.md", "docs", "python", "kernels", "csrc", "bench")


def _text_files():
    for top in _SOURCES:
        p = ROOT / top
        files = [p] if p.is_file() else sorted(p.rglob("*"))
        for f in files:
            if f.is_file() and f.suffix in (".md", ".py", ".cpp", ".cu", ".h", ".cuh"):
                yield f, f.read_text(errors="replace")


def test_docs_cite_only_files_inside_the_project():
    """The project's docs and sources never point outside it (shared/ is a workspace folder, not
    part of the project), and the file paths the README names in backticks exist."""
    for f, text in _text_files():
        assert "shared/reference" not in text and "../shared" not in text, f
    readme = (ROOT / "README.md").read_text()
    for path in re.findall(r"`((?:python|docs|kernels|csrc|tests|bench)/[\w./-]+)`", readme):
        if path == "bench/out":  # the quick start's output folder, written by the commands
            continue
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
    assert "`gammacl/gamma.py`" not in readme  # the file is python/gammacl/gamma.py


def test_every_math_md_section_cited_exists():
    """Every "math.md §X.Y" (or "§X.Y-X.Z") cited in the docs or the code is a heading of
    docs/math.md."""
    math = (ROOT / "docs" / "math.md").read_text()
    heads = set()
    for line in math.splitlines():
        m = re.match(r"#+ ([A-Z0-9](?:\.\d+)?)(?:-([A-Z]?\.?\d+))?[ .]", line)
        if m:
            heads.add(m.group(1))
            if m.group(2):  # "### B.5-B.7 ..." covers B.5, B.6, B.7
                lo, hi = int(m.group(1).split(".")[1]), int(m.group(2).split(".")[-1])
                heads.update(f"{m.group(1)[0]}.{k}" for k in range(lo, hi + 1))
    cited = set()
    for f, text in _text_files():
        for m in re.finditer(r"math\.md §?([A-Z])(\.\d+)?(?:[–-]([A-Z])?\.?(\d+))?", text):
            sec = m.group(1) + (m.group(2) or "")
            cited.add((sec, f.name))
            if m.group(4):
                cited.add((f"{m.group(1)}.{m.group(4)}", f.name))
    missing = sorted((s, f) for s, f in cited if s not in heads)
    assert cited and not missing, f"cited but not in docs/math.md: {missing}"
