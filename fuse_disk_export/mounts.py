"""What is mounted where, read from /proc/self/mountinfo, and how to get rid of a dead FUSE mount.

A path that is exported already reads as raw, and stat() on a dead FUSE mount fails with ENOTCONN,
so every decision about a path is taken from mountinfo before the path itself is touched.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass

from fuse_disk_export.errors import RequirementError

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo, reduced to what we decide on."""

    mount_id: int
    mount_point: str
    fstype: str
    source: str

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")


def _unescape(field: str) -> str:
    # The kernel escapes only space, tab, newline and backslash, as three octal digits.
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse the text of a mountinfo file (see proc(5)); malformed lines are skipped."""
    entries: list[MountEntry] = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split(" ")
        rest = tail.split(" ")
        if not sep or len(fields) < 5 or len(rest) < 2:
            continue
        try:
            mount_id = int(fields[0])
        except ValueError:
            continue
        entries.append(
            MountEntry(mount_id, _unescape(fields[4]), _unescape(rest[0]), _unescape(rest[1]))
        )
    return entries


def read_mounts() -> list[MountEntry]:
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mount_at(path: str, mounts: list[MountEntry] | None = None) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path`` (absolute), if any."""
    found = None
    for entry in read_mounts() if mounts is None else mounts:
        if entry.mount_point == path:
            found = entry
    return found


def is_dead(path: str) -> bool:
    """Whether ``path`` is a FUSE mount whose server is gone (stat fails with ENOTCONN)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def lazy_unmount(path: str) -> None:
    """Detach the mount on ``path`` even while files on it are open (``fusermount3 -u -z``)."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise RequirementError("fusermount3 not found (Debian package fuse3)", path=path)
    subprocess.run(
        [tool, "-u", "-z", "-q", "--", path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


def wait_unmounted(paths: Iterable[str], timeout: float) -> list[str]:
    """Wait until none of ``paths`` is a mount point; return those still mounted at the deadline.

    The kernel flags mountinfo with POLLPRI whenever the mount table changes, so this sleeps until
    something happens rather than polling on a timer.
    """
    wanted = set(paths)
    deadline = time.monotonic() + timeout
    with open(MOUNTINFO, "rb") as f:
        poller = select.poll()
        poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
        while True:
            f.seek(0)
            text = f.read().decode("utf-8", "surrogateescape")
            left = sorted({e.mount_point for e in parse_mountinfo(text)} & wanted)
            remaining = deadline - time.monotonic()
            if not left or remaining <= 0:
                return left
            poller.poll(remaining * 1000)
