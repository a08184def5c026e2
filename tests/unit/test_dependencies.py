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


# pyckpt's modules from the top (what scripts and the CLI call) down: a module imports only modules of
# lower layers (imports only for type checking excepted), so there is no cycle and nothing below knows
# what uses it.
LAYERS = [
    ["__init__", "cli"],
    ["doctor"],
    ["coordinator", "inspect"],
    ["commit", "restore"],
    ["capture", "peers"],
    ["runtime", "reader"],
    ["fitting", "stores"],
    ["s3_store"],
    ["posix_store"],
    ["writer", "storage", "messages", "config"],
    ["planner", "safe_fs", "shards", "paths"],
    ["manifest", "sysio", "testhooks", "collectives"],
    ["tree"],
    ["errors", "boxes", "sampler"],
]


def _pyckpt_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in type_only:
            out.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
    return out


def test_pyckpt_modules_import_only_from_the_layers_below_and_say_their_job():
    layer = {module: depth for depth, modules in enumerate(LAYERS) for module in modules}
    found = {p.stem for p in (REPO / "pyckpt").glob("*.py")}
    assert found == set(layer), f"modules missing from LAYERS: {found - set(layer)}; gone: {set(layer) - found}"
    upward = [f"{module} -> {dep}" for module in found for dep in _pyckpt_imports(REPO / "pyckpt" / f"{module}.py")
              if layer[dep] <= layer[module]]
    assert not upward, f"imports that do not go down a layer: {sorted(upward)}"
    silent = [m for m in found if not ast.get_docstring(ast.parse((REPO / "pyckpt" / f"{m}.py").read_text()))]
    assert not silent, f"modules without a docstring saying their job: {silent}"


def test_no_function_in_pyckpt_is_longer_than_60_lines():
    """Functions a newcomer can read on one screen (the house rule of issue 14)."""
    long = [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted((REPO / "pyckpt").glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, f"functions over 60 lines: {long}"
