"""The end state tests assert: nothing mounted, no qemu-storage-daemon holding a file of the test,
no pid file left, and errors in one line."""

from __future__ import annotations

import contextlib
import os
import select
import time
from pathlib import Path

import psutil
import pytest

from fuse_disk_export import mounts
from tests.helpers.runner import pid_gone

#: How soon a death is noticed, a refusal made, a rollback finished.  The product's bound is 1 s,
#: and these take milliseconds here; the tests allow 5 s so that a busy CI machine does not fail
#: them, which still fails anything that polls slowly or falls back to a timeout (the engine's
#: shortest, SETUP_GRACE, is 3 s and is followed by more work).
PROMPT = 5.0

#: The start-up warning every writable export gets on QEMU < 8.0 (README, Safety): not the error.
PUNCH_HOLE_WARNING = "turns a punched hole into an advisory discard"


def is_mounted(path: Path | str) -> bool:
    return mounts.mount_at(os.path.abspath(path)) is not None


def mounts_under(root: Path) -> list[str]:
    """Mount points inside ``root`` (not ``root`` itself, which may be a test's tmpfs)."""
    prefix = str(root) + "/"
    return [e.mount_point for e in mounts.read_mounts() if e.mount_point.startswith(prefix)]


def daemons_using(root: Path) -> list[int]:
    """Every live qemu-storage-daemon holding a file under ``root`` open (ours or by hand)."""
    prefix = str(root) + "/"
    found = []
    for proc in psutil.process_iter(["name"]):
        if not (proc.info["name"] or "").startswith("qemu-storage") or pid_gone(proc.pid):
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path).startswith(prefix):
                        found.append(proc.pid)
                        break
    return found


def assert_not_mounted(path: Path | str) -> None:
    """Not a mount point, and no "Transport endpoint is not connected" on it."""
    path = os.path.abspath(path)
    assert mounts.mount_at(path) is None, f"{path} is still a mount point"
    if os.path.lexists(path):
        os.stat(path)  # raises ENOTCONN on a dead mount


def assert_all_clean(root: Path, *, pid_files: tuple[Path, ...] = ()) -> None:
    """The end state every fault test checks: nothing mounted and no daemon under ``root``."""
    assert mounts_under(root) == [], f"left mounted: {mounts_under(root)}"
    assert daemons_using(root) == [], f"qemu-storage-daemon left: {daemons_using(root)}"
    for pid_file in pid_files:
        assert not pid_file.exists(), f"pid file {pid_file} left behind"


def one_line(stderr: str) -> str:
    """The tool's stderr must be exactly one line, no traceback; return it.  (The documented
    start-up warning of a writable export on QEMU < 8.0 may come before it.)"""
    lines = [line for line in stderr.strip().splitlines() if PUNCH_HOLE_WARNING not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, f"not one line: {stderr!r}"
    return lines[0]


def wait_first_mount(root: Path, timeout: float = 30) -> str:
    """Sleep on /proc/self/mountinfo (POLLPRI on change) until something under ``root`` is
    mounted; return its mount point."""
    deadline = time.monotonic() + timeout
    with open(mounts.MOUNTINFO, "rb") as f:
        poller = select.poll()
        poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
        while True:
            f.seek(0)
            text = f.read().decode("utf-8", "surrogateescape")
            base = str(root)
            for entry in mounts.parse_mountinfo(text):
                if entry.mount_point.startswith(base + "/"):
                    return entry.mount_point
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"nothing was mounted under {root} within {timeout}s")
            poller.poll(remaining * 1000)
