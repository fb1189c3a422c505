"""Commands are built as argument lists: no shell strings anywhere a program is started."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py"),
                  *ROOT.glob("data_preprocessing/*.py"), *ROOT.glob("data_loading/*.py"), *ROOT.glob("nnunet/*.py"),
                  *ROOT.glob("utils/*.py")])
STARTERS = {"run", "call", "check_call", "check_output", "Popen"}


def shell_uses(tree: ast.AST) -> list[str]:
    """Calls that hand a string to a shell: os.system, os.popen, shell=True, or a subprocess call given a string."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        owner = getattr(node.func.value, "id", "") if isinstance(node.func, ast.Attribute) else ""
        if owner == "os" and (name in {"system", "popen"} or name.startswith(("spawnl", "execl"))):
            found.append(f"line {node.lineno}: os.{name}")
        if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
               for k in node.keywords):
            found.append(f"line {node.lineno}: shell=")
        if owner == "subprocess" and name in STARTERS and node.args and \
                isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
            found.append(f"line {node.lineno}: subprocess.{name} with a string command")
    return found


def test_the_check_finds_shell_strings():
    code = ('import os, subprocess\nos.system("rm -rf " + path)\nsubprocess.run(f"ls {x}")\n'
            'subprocess.run(["ls"], shell=True)\nsubprocess.run(["ls", path])\n')
    assert shell_uses(ast.parse(code)) == ["line 2: os.system", "line 3: subprocess.run with a string command",
                                           "line 4: shell="]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shell_strings(path):
    assert shell_uses(ast.parse(path.read_text(), str(path))) == []
