"""Every ```python block of README.md runs, as a program of its own, and exits with status 0.

The README's examples are the first code users copy, so each block is a complete program and
this test keeps it true. Blocks that are not programs (shell commands, output) use another
fence language (```console, ```text) and are not run. Each block runs in a fresh interpreter
(``sys.executable``) in an empty temporary directory, with this process's environment passed
through, so that ``STREAMPICKLE_PURE_PYTHON=1`` runs them against the pure-Python code too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

# A fenced block: an opening fence with its language, the body, a closing fence, each fence at
# the start of a line.
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ``python`` blocks of ``text``, each with the line its body starts on."""
    return [
        (text.count("\n", 0, match.start(2)) + 1, match.group(2))
        for match in _FENCE.finditer(text)
        if match.group(1).strip() == "python"
    ]


with open(README, encoding="utf-8") as _f:
    BLOCKS = python_blocks(_f.read())


def test_the_readme_has_python_blocks_and_every_fence_names_a_language() -> None:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert len(BLOCKS) >= 5
    unnamed = [text.count("\n", 0, m.start()) + 1 for m in _FENCE.finditer(text) if not m.group(1).strip()]
    assert not unnamed, f"README.md: fences without a language at lines {unnamed}"


def test_quick_start_holds_two_commands_and_ci_runs_the_second_verbatim() -> None:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = next(_FENCE.finditer(section))
    commands = block.group(2).strip().splitlines()
    assert len(commands) == 2, commands
    with open(os.path.join(os.path.dirname(README), ".ci", "run"), encoding="utf-8") as f:
        ci = [line.strip() for line in f]
    assert commands[1] in ci


def test_python_blocks_are_found() -> None:
    text = "x\n```python\nprint(1)\n```\n```console\n$ ls\n```\n```python\nraise SystemExit(3)\n```\n"
    assert python_blocks(text) == [(3, "print(1)\n"), (9, "raise SystemExit(3)\n")]


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line: int, code: str, tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"README.md line {line}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
