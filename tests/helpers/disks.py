"""Commands the disk tests run (parted, sfdisk, mkfs, debugfs...), and disks made with parted."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from tests.helpers.host import require

#: Where Debian keeps parted, sfdisk and mkfs, which a user's PATH may lack.
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def tool(name: str) -> str:
    """The path of command ``name`` (skipped without it; failed under CI=true)."""
    found = shutil.which(name, path=SBIN_PATH)
    require(found is not None, name)
    assert found is not None
    return found


def run(*argv: str) -> str:
    """Run ``argv`` (its first word looked up with `tool`); fail on a non-zero exit; its stdout.

    parted calls udevadm to settle devices; on a plain file that prints noise, not failure.
    """
    done = subprocess.run([tool(argv[0]), *argv[1:]], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv} failed: {done.stdout}{done.stderr}"
    return done.stdout


def parted_disk(image: Path, size: int, *commands: str) -> Path:
    """A sparse raw ``image`` of ``size`` bytes on which parted has run ``commands`` (each a
    shell-quoted string, or single words)."""
    with image.open("wb") as f:
        f.truncate(size)  # sparse: only the tables get written
    run("parted", "-s", str(image), *(word for c in commands for word in shlex.split(c)))
    return image
