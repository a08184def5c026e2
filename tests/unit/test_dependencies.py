"""pyckpt imports nothing that the cluster venv does not install: the python_env role installs torch and
requirements.txt, nothing else (a module the controller venv happens to have, such as click through
another tool, would break `pyckpt` on every node)."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMPORT_NAMES = {"pyyaml": "yaml"}     # distribution name -> import name, where they differ


def _declared() -> set[str]:
    names = {"torch"}                  # pinned by the python_env role itself
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)", line.split("#")[0].strip())
        if match:
            name = match.group(1).lower()
            names.add(IMPORT_NAMES.get(name, name.replace("-", "_")))
    return names


def _imported() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted((REPO / "pyckpt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                found.setdefault(module.split(".")[0], path.name)
    return found


def test_pyckpt_imports_only_the_standard_library_and_its_declared_requirements():
    declared = _declared()
    foreign = {top: where for top, where in _imported().items()
               if top not in sys.stdlib_module_names and top not in declared and top != "pyckpt"}
    assert not foreign, f"pyckpt imports packages missing from requirements.txt: {foreign}"
