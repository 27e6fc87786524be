"""Processes the tests start, and waiting on them.

``Runner`` (the ``fde`` fixture) starts fuse-disk-export; ``Processes`` (the ``hand`` fixture)
starts anything else by hand: qemu-storage-daemon on a command line of its own, qemu-io holding an
image, writers.  Both end what they started, by pid, at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fuse_disk_export import mounts

QSD = "qemu-storage-daemon"


def wait_for(
    condition: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``condition`` until true; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def pid_gone(pid: int) -> bool:
    """No such process, or a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" in line
    except OSError:
        return True
    return True


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of ``proc``'s stdout, or "" if none came within ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def end(proc: subprocess.Popen[Any], *signals: signal.Signals, timeout: float = 10) -> None:
    """Send ``signals`` to ``proc`` in turn; kill it if it has not exited within ``timeout``."""
    for sig in signals:
        proc.send_signal(sig)  # nothing if it has exited meanwhile
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def children(pid: int) -> list[int]:
    """The children of ``pid``, read from /proc at once (psutil's `children` walks every process,
    too slow to catch a setup in the act)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    return found


def daemon_children(pid: int) -> list[int]:
    """qemu-storage-daemon processes that are children of ``pid`` (and not zombies)."""
    return [
        c
        for c in children(pid)
        if (mounts.process_name(c) or "").startswith(QSD) and not pid_gone(c)
    ]


def wait_daemon_child(pid: int, timeout: float = 10) -> int:
    """The pid of the qemu-storage-daemon ``pid`` starts, once it has."""
    found: list[int] = []

    def check() -> bool:
        found[:] = daemon_children(pid)
        return bool(found)

    wait_for(check, timeout, f"a qemu-storage-daemon child of {pid}")
    return found[0]


class Runner:
    """Starts fuse-disk-export processes and guarantees they and their mounts are gone after."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[str]] = []
        self.daemon_pids: list[int] = []

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "fuse_disk_export", *args]

    def run(
        self, *args: str, cwd: Path | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion (for -d runs and failures)."""
        result = subprocess.run(
            self.argv(*args),
            cwd=cwd or self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return result

    def start(
        self, *args: str, cwd: Path | None = None, new_session: bool = False
    ) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            self.argv(*args),
            cwd=cwd or self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=new_session,
        )
        self.procs.append(proc)
        return proc

    def start_live(self, *args: str, timeout: float = 30, **kw: object) -> subprocess.Popen[str]:
        """Start in the foreground and wait for the one "set up" line."""
        proc = self.start(*args, **kw)  # type: ignore[arg-type]
        line = read_line(proc, timeout)
        if "All exports set up" not in line:
            proc.wait(timeout=10)
            pytest.fail(
                f"not live: stdout={line!r} stderr={proc.stderr.read() if proc.stderr else ''!r}"
            )
        return proc

    def revert(self, proc: subprocess.Popen[str], timeout: float = 30) -> str:
        """SIGINT a foreground export; it must revert and exit 0.  Returns its stderr."""
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=timeout)
        err = proc.stderr.read() if proc.stderr is not None else ""
        assert status == 0, f"exit status {status} after SIGINT; stderr: {err}"
        return err

    def track_pid(self, pid: int) -> None:
        self.daemon_pids.append(pid)

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        for proc in self.procs:
            if proc.poll() is None:
                problems.append(f"process {proc.pid} still running")
                end(proc, signal.SIGINT)
        for pid in self.daemon_pids:
            if not pid_gone(pid):
                problems.append(f"daemon {pid} still running")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)
                with contextlib.suppress(BaseException):
                    wait_for(lambda p=pid: pid_gone(p), 10, f"pid {pid} to exit")  # type: ignore[misc]
        root = str(self.root)
        for entry in mounts.read_mounts():
            if entry.mount_point == root or entry.mount_point.startswith(root + "/"):
                problems.append(f"mount left on {entry.mount_point}")
                mounts.lazy_unmount(entry.mount_point)
        return problems


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
                end(proc, signal.SIGCONT, signal.SIGTERM)  # a stopped one first resumes
        # Only mounts of daemons started here (left dead on purpose): anything else left is
        # the tool's, for the fde fixture to report.
        for path in self.mountpoints:
            if mounts.mount_at(path) is not None and mounts.fuse_state(path, 1.0) != "live":
                mounts.lazy_unmount(path)
