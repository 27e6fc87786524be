"""Shared fixtures: real qemu-storage-daemon, real FUSE, and cleanup that holds even on failure.
The code behind them is in tests/helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.host import require
from tests.helpers.runner import Runner


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


@pytest.fixture(scope="session")
def qemu_tools() -> None:
    for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io", "fusermount3"):
        require(shutil.which(tool) is not None, tool)
    require(os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK), "/dev/fuse")


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


@pytest.fixture
def registry_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A private runtime registry (registry.registry_dir()) for the test's process and children:
    other test runs on this machine have exports of their own."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return runtime / "fuse-disk-export"
