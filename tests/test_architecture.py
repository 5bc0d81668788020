"""The layering of docs/ARCHITECTURE.md: tools -> model.py/weight.py -> glm_engine, the
library never importing a root file, and no import circle anywhere (imports inside
functions and under TYPE_CHECKING count)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

LIBRARY = "glm_engine"
SKIPPED_DIRS = {"tests", "scripts", "benchmarks", "docs", "data", "__pycache__"}


def repo_modules() -> dict[str, Path]:
    """Module name -> file, for the tools, the root modules and the library."""
    modules = {}
    for path in REPO_ROOT.rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).parts
        if parts[0] in SKIPPED_DIRS or parts[0].startswith("."):
            continue
        name = ".".join(parts)[:-3].removesuffix(".__init__")
        modules[name] = path
    return modules


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the repository modules it imports, anywhere in its file."""
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            targets |= {target for target in map(resolve, names) if target and target != module}
        edges[module] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, found by depth-first search."""
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            found.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for target in sorted(edges[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
    return found


def test_the_library_never_imports_a_root_file_and_nothing_imports_in_a_circle():
    modules = repo_modules()
    assert {"model", "weight", "build", f"{LIBRARY}.runtime.session"} <= modules.keys()
    edges = import_edges(modules)
    upward = [(module, target) for module, targets in edges.items() if module.startswith(LIBRARY)
              for target in targets if not target.startswith(LIBRARY)]
    assert upward == []
    assert cycles(edges) == []


def test_the_checker_sees_imports_in_functions_and_under_type_checking(tmp_path):
    (tmp_path / "lib.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import top\n\n\n"
                                     "def f():\n    from top import x\n")
    (tmp_path / "top.py").write_text("import lib\n")
    edges = import_edges({"lib": tmp_path / "lib.py", "top": tmp_path / "top.py"})
    assert edges == {"lib": {"top"}, "top": {"lib"}}
    assert cycles(edges) == [["lib", "top", "lib"]]


def test_the_runtime_imports_from_another_directory_whatever_model_py_is_there(tmp_path):
    (tmp_path / "model.py").write_text("raise ImportError('a stray model.py was imported')\n")
    (tmp_path / "weight.py").write_text("raise ImportError('a stray weight.py was imported')\n")
    script = ("import glm_engine.runtime.session, glm_engine.runtime.model_runner, glm_engine.tools.hf_reference, "
              "glm_engine.runtime.ops; print('ok')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
