"""The shell completions (generated from the parser into share/), run as each shell runs them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SHARE = Path(__file__).resolve().parents[2] / "share"
COMPLETION = SHARE / "bash-completion" / "completions" / "fuse-disk-export"
ZSH_COMPLETION = SHARE / "zsh" / "site-functions" / "_fuse-disk-export"
FISH_COMPLETION = SHARE / "fish" / "vendor_completions.d" / "fuse-disk-export.fish"


def complete(*words: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> list[str]:
    """What the bash completion function offers for the last of ``words``."""
    if shutil.which("bash") is None:
        pytest.skip("bash is missing")
    script = (
        f"source {COMPLETION}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _shtab_fuse_disk_export\n'
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


def complete_fish(*words: str, cwd: Path | None = None) -> list[str]:
    """What fish offers for the last of ``words`` (``complete -C``), without descriptions."""
    if shutil.which("fish") is None:
        pytest.skip("fish is missing")
    line = " ".join(["fuse-disk-export", *words])
    out = subprocess.run(
        ["fish", "--no-config", "-c", f"source {FISH_COMPLETION}; complete -C {line!r}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(line.split("\t", 1)[0] for line in out.stdout.splitlines() if line)


SCRIPTS = {"bash": COMPLETION, "zsh": ZSH_COMPLETION, "fish": FISH_COMPLETION}


def check_syntax(shell: str) -> None:
    """``SHELL -n`` on that shell's script: it parses (skipped where the shell is missing)."""
    for name in ("bash", "zsh", "fish"):  # literal names: tests/unit/test_requirements.py
        if name != shell:
            continue
        if shutil.which(name) is None:
            pytest.skip(f"{name} is missing")
        subprocess.run([name, "-n", str(SCRIPTS[name])], check=True, capture_output=True)
