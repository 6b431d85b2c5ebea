"""The layers' import rules (architecture: who may import whom), checked on the source of every module.

* ``methods/``: torch, the standard library, triton and ``methods`` itself -- nothing else;
* the core (the loop, data, models, teachers, evaluation and their helpers): never Ray or MLflow at module level,
  never the edges (run, sweep, tracking, reproduce, cli, ...); Ray inside a function only in the modules whose job is
  to run a cache build or an extraction on a Ray cluster (``RAY_BACKENDS``); MLflow nowhere.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

#: the edges: the only modules that may import Ray and MLflow at will
EDGES = {
    "orchestrator.run",
    "orchestrator.sweep",
    "orchestrator.tracking",
    "orchestrator.reproduce",
    "orchestrator.cli",
    "orchestrator.ray_train_hooks",
    "orchestrator.ray_logs",
    "orchestrator.system_metrics",
    "orchestrator.ui_server",
    "orchestrator.leaderboard",
    "orchestrator.notify",
    "orchestrator.search_space",
    "orchestrator.preflight",
    "orchestrator.storage",
    "orchestrator.run_folders",
    "orchestrator.run_ray",
    "orchestrator.recipe",
    "orchestrator.space_checks",
}
#: core modules that may import Ray inside a function, and why
RAY_BACKENDS = {
    "orchestrator.teachers.ray_backend": "teachers.backend ray: the Ray Data actor pool",
    "orchestrator.teachers.placement": "teachers.backend auto: asks the connected cluster for its GPUs",
    "orchestrator.data.image_cache": "picks the Ray build of the decoded-image cache when a cluster is there",
    "orchestrator.data.image_cache_build": "the decoded-image cache built as Ray tasks",
    "orchestrator.teachers.store_fill": "imports the Ray backend module for teachers.backend ray",
}
METHODS_ALLOWED = {"torch", "triton", "methods", "__future__"}


def is_edge(module: str) -> bool:
    """An edge module, or a module of an edge package (``orchestrator.sweep.driver``)."""
    return any(module == e or module.startswith(e + ".") for e in EDGES)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement; relative imports resolved."""
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):  # an import under a module-level if/try is still module level
        if isinstance(node, (ast.If, ast.Try)) and id(node) in top:
            top.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, id(node) in top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:
                base = module.split(".")[: -node.level] if node.level else []
                name = ".".join([*base, name]) if name else ".".join(base)
            out.append((name, id(node) in top))
            out.extend((f"{name}.{alias.name}", id(node) in top) for alias in node.names)  # a submodule, maybe
    return out


def violations(source: str, module: str) -> list[str]:
    """What ``module``'s ``source`` imports against the rules (empty: it keeps them)."""
    found = []
    for name, module_level in imports(source, module):
        root = name.split(".")[0]
        if module.startswith("methods"):
            if root not in METHODS_ALLOWED and root not in sys.stdlib_module_names:
                found.append(f"{module} imports {name}: methods/ imports torch only")
            continue
        if is_edge(module) or not module.startswith("orchestrator"):
            continue
        if root == "mlflow":
            found.append(f"{module} imports {name}: the core never imports MLflow")
        elif root == "ray" and (module_level or module not in RAY_BACKENDS):
            found.append(
                f"{module} imports {name}"
                + (" at module level" if module_level else "")
                + ": the core imports Ray only inside a Ray backend's functions"
            )
        elif is_edge(name) and module_level:
            found.append(f"{module} imports the edge {name} at module level")
        elif name == "orchestrator.teachers.ray_backend" and module_level:
            found.append(f"{module} imports the Ray backend at module level")
    return found


def project_modules() -> list[Path]:
    return sorted(p for folder in ("methods", "orchestrator") for p in (REPO / folder).rglob("*.py"))


def test_the_checker_flags_each_kind_of_breach():
    assert violations("import numpy\n", "methods.functional") == [
        "methods.functional imports numpy: methods/ imports torch only"
    ]
    assert violations("import math\nimport torch\nfrom .batch import X\n", "methods.functional") == []
    assert violations("import mlflow\n", "orchestrator.data.loader")
    assert violations("import ray\n", "orchestrator.train_loop")
    assert violations("def f():\n    import ray\n", "orchestrator.train_loop")
    assert violations("def f():\n    import ray\n", "orchestrator.teachers.ray_backend") == []
    assert violations("try:\n    import ray\nexcept ImportError:\n    pass\n", "orchestrator.teachers.ray_backend")
    assert violations("from orchestrator import tracking\n", "orchestrator.evaluation.suite")
    assert violations("from orchestrator import errors\n", "orchestrator.evaluation.suite") == []
    assert violations("from orchestrator.tracking import x\n", "orchestrator.evaluation.suite")
    assert violations("from orchestrator.sweep.driver import run_sweep\n", "orchestrator.train_loop")
    assert violations("import mlflow\n", "orchestrator.sweep_helpers")  # only named like an edge package
    assert violations("import ray\nimport mlflow\n", "orchestrator.sweep.tracker") == []
    assert violations("import mlflow\nimport ray\n", "orchestrator.run") == []


@pytest.mark.parametrize("path", project_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_keeps_its_layers_import_rules(path):
    assert violations(path.read_text(), module_name(path)) == []


def test_the_ray_backend_list_names_real_modules():
    names = {module_name(p) for p in project_modules()}
    assert set(RAY_BACKENDS) <= names, set(RAY_BACKENDS) - names
    assert EDGES <= names, EDGES - names
