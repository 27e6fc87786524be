"""Helpers for the fault, bad-input and backing tests: processes we start by hand, and the checks
every such test ends with (nothing mounted, no qemu-storage-daemon of ours, no pid file, bytes as
they should be).  Everything started here is ended by pid in the fixtures' teardown.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from fuse_disk_export import mounts
from tests.conftest import pid_gone, qemu_img, wait_for

MiB = 1024 * 1024
QSD = "qemu-storage-daemon"


def sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def daemon_children(pid: int) -> list[int]:
    """qemu-storage-daemon processes that are children of ``pid`` (and not zombies)."""
    with contextlib.suppress(psutil.Error):
        return [
            c.pid
            for c in psutil.Process(pid).children()
            if c.name().startswith("qemu-storage") and not pid_gone(c.pid)
        ]
    return []


def wait_daemon_child(pid: int, timeout: float = 10) -> int:
    found: list[int] = []

    def check() -> bool:
        found[:] = daemon_children(pid)
        return bool(found)

    wait_for(check, timeout, f"a qemu-storage-daemon child of {pid}")
    return found[0]


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


def mounts_under(root: Path) -> list[str]:
    """Mount points inside ``root`` (not ``root`` itself, which may be a test's tmpfs)."""
    prefix = str(root) + "/"
    return [e.mount_point for e in mounts.read_mounts() if e.mount_point.startswith(prefix)]


def assert_not_mounted(path: Path | str) -> None:
    """Not a mount point, and no "Transport endpoint is not connected" on it."""
    path = os.path.abspath(path)
    assert mounts.mount_at(path) is None, f"{path} is still a mount point"
    if os.path.lexists(path):
        os.stat(path)  # raises ENOTCONN on a dead mount


def assert_all_clean(root: Path, *, pid_files: tuple[Path, ...] = ()) -> None:
    """The end state every test here checks: nothing mounted and no daemon under ``root``."""
    assert mounts_under(root) == [], f"left mounted: {mounts_under(root)}"
    assert daemons_using(root) == [], f"qemu-storage-daemon left: {daemons_using(root)}"
    for pid_file in pid_files:
        assert not pid_file.exists(), f"pid file {pid_file} left behind"


def qemu_img_check(path: Path | str, fmt: str = "qcow2") -> dict[str, object]:
    """``qemu-img check``; fail on corruption (leaked clusters are not corruption)."""
    out = subprocess.run(
        ["qemu-img", "check", "-f", fmt, "--output=json", str(path)],
        capture_output=True,
        text=True,
    )
    # 0: clean, 3: leaks only; 2: corruption, 1: check failed
    assert out.returncode in (0, 3), (
        f"qemu-img check {path}: {out.returncode} {out.stdout}{out.stderr}"
    )
    report: dict[str, object] = json.loads(out.stdout)
    assert not report.get("corruptions"), report
    return report


def make_qcow2(path: Path, size: str = "64M", *patterns: tuple[int, str, str]) -> Path:
    """A qcow2 with ``(byte, offset, length)`` patterns written by qemu-io."""
    qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    for byte, offset, length in patterns:
        io("qcow2", path, f"write -P {byte:#x} {offset} {length}")
    return path


def io(fmt: str, path: Path | str, command: str) -> str:
    out = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", command, str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0 and "fail" not in out.stdout.lower(), (
        f"qemu-io {command} {path}: {out.stdout}{out.stderr}"
    )
    return out.stdout


#: The start-up warning every writable export gets on QEMU < 8.0 (README, Safety): not the error.
PUNCH_HOLE_WARNING = "turns a punched hole into an advisory discard"


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


class Processes:
    """Processes a test starts by hand (qemu-storage-daemon, qemu-io, writers): ended by pid at
    teardown, gently first, and any mount a hand-started daemon leaves is detached."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.mountpoints: list[str] = []  # where daemons started by hand export

    def start(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def hold_image(self, image: Path, fmt: str = "qcow2") -> subprocess.Popen[bytes]:
        """Another QEMU process (qemu-io) that has ``image`` open read-write, with its locks.

        Readiness is qemu-io's answer to a read: polling with ``qemu-img info`` instead would
        itself hold the image now and then, and make qemu-io fail to take its lock.
        """
        proc = self.start(
            ["qemu-io", "-f", fmt, str(image)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"read 0 512\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        line = proc.stdout.readline() if ready else b""
        assert b"read 512/512 bytes" in line, f"qemu-io did not open {image}: {line!r}"
        return proc

    def export_by_hand(
        self, image: Path, mountpoint: Path | None = None, fmt: str = "qcow2"
    ) -> subprocess.Popen[bytes]:
        """qemu-storage-daemon on a command line of its own, no QMP: ``--blockdev`` JSON."""
        target = mountpoint or image
        self.mountpoints.append(str(target))
        proc = self.start(
            [
                QSD,
                "--blockdev",
                json.dumps({"driver": "file", "node-name": "p", "filename": str(image)}),
                "--blockdev",
                json.dumps({"driver": fmt, "node-name": "f", "file": "p"}),
                "--export",
                json.dumps(
                    {
                        "type": "fuse",
                        "id": "e",
                        "node-name": "f",
                        "mountpoint": str(target),
                        "writable": True,
                    }
                ),
            ]
        )
        wait_for(lambda: mounts.mount_at(str(target)) is not None, 10, f"{QSD} to mount {target}")
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # Only mounts of daemons started here (left dead on purpose): anything else left is
        # the tool's, for the fde fixture to report.
        for path in self.mountpoints:
            if mounts.mount_at(path) is not None and mounts.fuse_state(path, 1.0) != "live":
                mounts.lazy_unmount(path)


def timed(action: Callable[[], object]) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start
