"""Every package the installed tool imports is declared in pyproject.toml's dependencies."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_third_party_import_is_a_declared_dependency() -> None:
    declared = {
        _name(r)
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    modules: dict[str, str] = {}
    for path in sorted((ROOT / "fuse_disk_export").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "fuse_disk_export":
                    modules.setdefault(top, str(path.relative_to(ROOT)))
    providers = importlib.metadata.packages_distributions()
    undeclared = {
        module: where
        for module, where in modules.items()
        if not {d.lower().replace("_", "-") for d in providers.get(module, [module])} & declared
    }
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
    assert modules.keys() >= {"psutil", "daemon", "rich"}
