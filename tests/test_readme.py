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
