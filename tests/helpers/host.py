"""What this machine has: system requirements (skipped without them, failed under CI=true) and
the QEMU the run tests."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

import pytest

from fuse_disk_export.engine import qemuinfo
from fuse_disk_export.engine.qemuinfo import QemuInfo

IN_CI = os.environ.get("CI") == "true"


def require(condition: bool, what: str) -> None:
    """Skip when a system requirement is missing; under CI=true, fail instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and {what} is missing", pytrace=False)
    pytest.skip(f"{what} is missing")


@functools.cache
def qemu_info() -> QemuInfo:
    """What the qemu-storage-daemon on PATH is, asked the way the tool asks it."""
    binary = shutil.which("qemu-storage-daemon")
    assert binary is not None
    info = qemuinfo.probe(binary)
    assert info is not None, f"{binary} did not answer query-qmp-schema"
    return info


@functools.cache
def qemu_version() -> tuple[int, int, int]:
    """The version of the qemu-storage-daemon on PATH (the QEMU this run tests)."""
    out = subprocess.run(
        ["qemu-storage-daemon", "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    assert found, out
    major, minor, micro = map(int, found.groups())
    return major, minor, micro
