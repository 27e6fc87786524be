"""What the path to live may cost at import: checked here, measured in scripts/bench."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fuse_disk_export"


def _defines_named_tuple(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ClassDef)
        and any(isinstance(b, ast.Name) and b.id == "NamedTuple" for b in node.bases)
        for node in ast.walk(tree)
    )


def _postpones_annotations(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(a.name == "annotations" for a in node.names)
        for node in tree.body
    )


def test_named_tuples_are_built_from_evaluated_annotations() -> None:
    # typing.NamedTuple compiles every string annotation into a ForwardRef: with postponed
    # annotations, the modules on the path to live took 1.4 ms longer to import.
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if _defines_named_tuple(tree := ast.parse(path.read_text()))
        and _postpones_annotations(tree)
    ]
    assert offenders == []


def test_the_path_to_live_leaves_out_what_it_does_not_use() -> None:
    code = (
        "import sys\n"
        "import fuse_disk_export.cli, fuse_disk_export.lifecycle, fuse_disk_export.request\n"
        "import fuse_disk_export.background\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    # Each of these costs a millisecond or more, for work a plain export does not do.
    unwanted = {
        "tempfile",
        "dataclasses",
        "uuid",
        "asyncio",
        "rich",
        "psutil",
        "pathlib",
        "fuse_disk_export.partitions",
        "fuse_disk_export.table_reader",
        "fuse_disk_export.mountfs",
    }
    assert loaded & unwanted == set()
