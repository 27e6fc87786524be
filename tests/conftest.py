"""Shared fixtures: real qemu-storage-daemon, real FUSE, and cleanup that holds even on failure."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fuse_disk_export import mounts

IN_CI = os.environ.get("CI") == "true"


def pytest_report_header() -> str:
    """Which qemu-storage-daemon this run uses (scripts/test runs the suite on more than one)."""
    path = shutil.which("qemu-storage-daemon")
    if path is None:
        return "qemu-storage-daemon: not found on PATH"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        version = (out.stdout.splitlines() or ["no version"])[0]
    except (OSError, subprocess.SubprocessError) as e:
        version = f"--version failed: {e}"
    return f"qemu-storage-daemon: {path} ({version})"


def require(condition: bool, what: str) -> None:
    """Skip when a system requirement is missing; under CI=true, fail instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and {what} is missing", pytrace=False)
    pytest.skip(f"{what} is missing")


@pytest.fixture(scope="session")
def qemu_tools() -> None:
    for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io", "fusermount3"):
        require(shutil.which(tool) is not None, tool)
    require(os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK), "/dev/fuse")


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
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" in line
    except OSError:
        return True
    return True


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
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
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


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Lets fixtures see whether the test itself failed (item.fde_call_failed).
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.fde_call_failed = report.failed  # type: ignore[attr-defined]


@pytest.fixture
def fde(request: pytest.FixtureRequest, tmp_path: Path, qemu_tools: None) -> Iterator[Runner]:
    runner = Runner(tmp_path)
    yield runner
    # Cleanup runs whatever happened; what it had to clean is a failure of its own only when the
    # test passed (a test that failed half-way leaves its processes for us to stop, by design).
    problems = runner.cleanup()
    if problems and not getattr(request.node, "fde_call_failed", False):
        pytest.fail("left behind: " + "; ".join(problems))


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


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qemu_io(fmt: str, path: Path | str, command: str) -> str:
    out = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", command, str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0 and "fail" not in out.stdout.lower(), out.stdout + out.stderr
    return out.stdout


def image_format(path: Path | str) -> str:
    import json

    return str(json.loads(qemu_img("info", "--output=json", "--force-share", str(path)))["format"])


def is_mounted(path: Path | str) -> bool:
    return mounts.mount_at(os.path.abspath(path)) is not None
