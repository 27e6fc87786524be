"""Standard descriptors as scripts leave them: closed (``>&-``), or a pipe whose reader has gone
(``| head -0``).  The command works as it would otherwise, with its usual exit status, and no
traceback."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers.checks import assert_all_clean
from tests.helpers.images import SAMPLE, image_format, make_qcow2
from tests.helpers.runner import Runner, pid_gone, wait_for


def _pid(pid_file: Path) -> int:
    return int(pid_file.read_text())


@pytest.mark.parametrize("closed", ["<&-", ">&-", "2>&-"])
def test_detached_with_a_standard_descriptor_closed(
    fde: Runner, tmp_path: Path, closed: str
) -> None:
    img = make_qcow2(tmp_path / "a.qcow2", "64M", *SAMPLE)
    pid_file = tmp_path / "fde.pid"
    command = shlex.join(fde.argv("-dp", str(pid_file), str(img)))
    done = subprocess.run(
        ["sh", "-c", f"exec {command} {closed}"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    pid = _pid(pid_file)
    fde.track_pid(pid)
    assert image_format(img) == "raw"
    os.kill(pid, signal.SIGINT)
    wait_for(lambda: not pid_file.exists() and pid_gone(pid), what="the revert")
    assert image_format(img) == "qcow2"
    assert_all_clean(tmp_path)


def _live(pid_file: Path) -> None:
    """Written once every export is live."""
    wait_for(lambda: pid_file.exists() and pid_file.stat().st_size > 0, what="the pid file")


def test_foreground_with_stdout_closed(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "a.qcow2", "64M", *SAMPLE)
    pid_file = tmp_path / "fde.pid"
    command = shlex.join(fde.argv("-p", str(pid_file), str(img)))
    proc = subprocess.Popen(["sh", "-c", f"exec {command} >&-"], stderr=subprocess.PIPE, text=True)
    try:
        _live(pid_file)
    finally:
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=30)
    err = proc.stderr.read() if proc.stderr else ""
    assert status == 0 and "Traceback" not in err, err
    assert_all_clean(tmp_path)


def test_ready_line_to_a_reader_that_has_gone(fde: Runner, tmp_path: Path) -> None:
    """``fuse-disk-export IMG | head -0``: the line cannot be read, the export serves on."""
    img = make_qcow2(tmp_path / "a.qcow2", "64M", *SAMPLE)
    pid_file = tmp_path / "fde.pid"
    proc = fde.start("-p", str(pid_file), str(img))
    assert proc.stdout is not None
    proc.stdout.close()  # before the tool is live: its ready line meets a closed pipe
    try:
        _live(pid_file)
        assert image_format(img) == "raw"
    finally:
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=30)
    err = proc.stderr.read() if proc.stderr else ""
    assert status == 0 and "Traceback" not in err, err
    assert image_format(img) == "qcow2"
    assert_all_clean(tmp_path)


def test_stop_reports_to_a_reader_that_has_gone(fde: Runner, tmp_path: Path) -> None:
    """``--stop IMG | head -0`` reverted: exit 0, not a traceback."""
    img = make_qcow2(tmp_path / "a.qcow2", "64M", *SAMPLE)
    pid_file = tmp_path / "fde.pid"
    assert fde.run("-dp", str(pid_file), str(img)).returncode == 0
    pid = _pid(pid_file)
    fde.track_pid(pid)
    stop = fde.start("--stop", str(img))
    assert stop.stdout is not None
    stop.stdout.close()
    status = stop.wait(timeout=60)
    err = stop.stderr.read() if stop.stderr else ""
    assert status == 0 and "Traceback" not in err, err
    assert not pid_file.exists()
    assert image_format(img) == "qcow2"
    assert_all_clean(tmp_path)
