"""The bash completion script, run as bash runs it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

COMPLETION = (
    Path(__file__).resolve().parents[2] / "scripts" / "completion" / "fuse-disk-export.bash"
)


def complete(*words: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> list[str]:
    """What the completion function offers for the last of ``words``."""
    if shutil.which("bash") is None:
        pytest.skip("bash is missing")
    script = (
        f"source {COMPLETION}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _fuse_disk_export\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(
        ["bash", "-c", script, "bash", "fuse-disk-export", *words],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(line for line in out.stdout.splitlines() if line)
