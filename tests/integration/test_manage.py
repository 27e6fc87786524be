"""Living with exports, for real: --list, --stop, daemon logs, systemd readiness, the post's script
name and the service unit."""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fuse_disk_export import mounts
from tests.helpers.checks import is_mounted
from tests.helpers.completion import complete
from tests.helpers.images import SAMPLE, image_format, make_qcow2, qemu_img
from tests.helpers.runner import Runner, pid_gone, read_line, wait_for
from tests.helpers.units import MiB

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "qemu-fuse-disk-export.py"
UNIT = REPO / "scripts" / "fuse-disk-export@.service"

pytestmark = pytest.mark.usefixtures("registry_dir")


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """What systemd listens on for a Type=notify service; NOTIFY_SOCKET names it to children."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield sock
    sock.close()


def listed(fde: Runner) -> list[dict[str, Any]]:
    result = fde.run("--list", "--json")
    assert result.returncode == 0, result.stderr
    items: list[dict[str, Any]] = json.loads(result.stdout)
    return items


def receive(sock: socket.socket) -> dict[str, str]:
    lines = sock.recv(4096).decode().splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_list_and_stop(fde: Runner, tmp_path: Path) -> None:
    a = make_qcow2(tmp_path / "a.qcow2", "64M", *SAMPLE)
    b = tmp_path / "b.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(b), "16M")
    assert fde.run("-dp", "a.pid", str(a)).returncode == 0
    assert fde.run("-dr", "-p", "b.pid", str(b)).returncode == 0
    pid_a, pid_b = (int((tmp_path / n).read_text()) for n in ("a.pid", "b.pid"))
    fde.track_pid(pid_a)
    fde.track_pid(pid_b)

    items = listed(fde)
    assert [
        (i["image"], i["format"], i["virtual_size"], i["writable"], i["pid"]) for i in items
    ] == [
        (str(a), "qcow2", 64 * MiB, True, pid_a),
        (str(b), "vdi", 16 * MiB, False, pid_b),
    ]
    assert [i["mountpoint"] for i in items] == [str(a), str(b)]
    assert all(not pid_gone(i["daemon_pid"]) for i in items)

    plain = fde.run("--list")  # not a terminal: plain columns
    assert plain.returncode == 0, plain.stderr
    header, row_a, row_b = plain.stdout.splitlines()
    assert header.split()[:4] == ["PID", "FORMAT", "SIZE", "MODE"]
    assert row_a.split()[:5] == [str(pid_a), "qcow2", "64", "MiB", "rw"]
    assert row_b.split()[:5] == [str(pid_b), "vdi", "16", "MiB", "ro"]
    assert row_a.endswith(str(a)) and row_b.endswith(str(b))

    # One by path (relative, as typed), one by pid; back only once both are reverted.
    result = fde.run("--stop", "a.qcow2", str(pid_b))
    assert result.returncode == 0, result.stderr
    assert pid_gone(pid_a) and pid_gone(pid_b)
    assert not is_mounted(a) and not is_mounted(b)
    assert image_format(a) == "qcow2" and image_format(b) == "vdi"
    assert not (tmp_path / "a.pid").exists()
    assert result.stdout.splitlines() == [
        f"Reverted {a} (pid {pid_a})",
        f"Reverted {b} (pid {pid_b})",
    ]
    assert listed(fde) == []
    empty = fde.run("--list")
    assert empty.returncode == 0 and empty.stdout == "" and "no live exports" in empty.stderr


def test_completion_of_stop_offers_live_exports(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    proc = fde.start_live(str(img))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert complete("--stop", "", env=env) == sorted([str(img), str(proc.pid)])
    assert complete("--stop", str(tmp_path), env=env) == [str(img)]
    fde.revert(proc)


def test_stop_a_foreground_export_by_pid(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    proc = fde.start_live(str(img))
    result = fde.run("--stop", str(proc.pid))
    assert result.returncode == 0, result.stderr
    assert proc.poll() is not None  # exited before --stop returned
    assert proc.wait() == 0
    assert image_format(img) == "qcow2"


def test_stop_what_is_not_exported(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    result = fde.run("--stop", str(img))
    assert result.returncode == 1
    assert result.stderr == f"fuse-disk-export: {img}: is not exported (see --list)\n"
    unknown = fde.run("--stop", str(os.getpid()))  # a live pid, but not in the registry
    assert unknown.returncode == 1 and "not a fuse-disk-export process" in unknown.stderr
    assert len(unknown.stderr.splitlines()) == 1


def test_stop_cleans_up_a_dead_mount(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    assert fde.run("-d", str(img)).returncode == 0
    (item,) = listed(fde)
    fde.track_pid(item["pid"])
    # A crash that leaves the mount behind: we are frozen when QEMU dies, then killed.
    os.kill(item["pid"], signal.SIGSTOP)
    os.kill(item["daemon_pid"], signal.SIGKILL)
    wait_for(lambda: mounts.is_dead(str(img)), what="the mount to die")
    os.kill(item["pid"], signal.SIGKILL)
    wait_for(lambda: pid_gone(item["pid"]), what="the process to die")

    result = fde.run("--stop", str(img))
    assert result.returncode == 0, result.stderr
    assert "dead FUSE mount" in result.stderr and "unmounted it lazily" in result.stderr
    assert not is_mounted(img)
    assert image_format(img) == "qcow2"


def test_daemon_says_why_it_stopped(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    log = tmp_path / "fde.log"
    assert fde.run("-d", "--log-file", "fde.log", str(img)).returncode == 0
    (item,) = listed(fde)
    fde.track_pid(item["pid"])
    assert f"INFO: live: {img}" in log.read_text()

    os.kill(item["daemon_pid"], signal.SIGKILL)
    wait_for(lambda: pid_gone(item["pid"]), what="the daemon to exit")
    text = log.read_text()
    assert f"fuse-disk-export[{item['pid']}]: ERROR: qemu-storage-daemon" in text, text
    assert "killed by SIGKILL while serving" in text, text
    assert not is_mounted(img)
    assert listed(fde) == []


def test_log_file_needs_daemonize(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    result = fde.run("--log-file", "x.log", str(img))
    assert result.returncode == 2 and "--log-file goes with -d" in result.stderr
    result = fde.run("-d", "--log-file", str(tmp_path / "no" / "x.log"), str(img))
    assert result.returncode == 2 and "cannot open the log file" in result.stderr
    assert not is_mounted(img)


def test_systemd_ready_only_once_live(
    fde: Runner, tmp_path: Path, notify_socket: socket.socket
) -> None:
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    proc = fde.start(str(img))
    ready = receive(notify_socket)
    live_at_receipt = is_mounted(img)
    assert ready["READY"] == "1" and live_at_receipt
    assert ready["MAINPID"] == str(proc.pid)
    assert "All exports set up" in read_line(proc, 30)

    proc.send_signal(signal.SIGINT)
    assert receive(notify_socket)["STOPPING"] == "1"
    assert proc.wait(timeout=30) == 0
    assert not is_mounted(img)


def test_systemd_notify_from_a_daemon_on_an_abstract_socket(
    fde: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    name = f"fde-test-{os.getpid()}-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert fde.run("-dp", "fde.pid", str(img)).returncode == 0
        pid = int((tmp_path / "fde.pid").read_text())
        fde.track_pid(pid)
        ready = receive(sock)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(pid)  # the daemon, not the parent
        assert fde.run("--stop", str(pid)).returncode == 0
        assert receive(sock)["STOPPING"] == "1"


def test_failed_setup_never_says_ready(
    fde: Runner, tmp_path: Path, notify_socket: socket.socket
) -> None:
    # QEMU itself refuses it, in the middle of setup: its backing file does not exist.
    img = tmp_path / "orphan.qcow2"
    qemu_img(
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        str(tmp_path / "gone.raw"),
        "-F",
        "raw",
        str(img),
        "16M",
    )
    result = fde.run("--backing", "any", str(img))
    assert result.returncode != 0 and "gone.raw" in result.stderr, result.stderr
    notify_socket.settimeout(0)
    messages = []
    with contextlib.suppress(BlockingIOError):
        while True:
            messages.append(notify_socket.recv(4096).decode())
    assert not any("READY=1" in m for m in messages), messages


def test_the_posts_script_name(fde: Runner, tmp_path: Path) -> None:
    """qemu-fuse-disk-export.py, run as the post does, from this checkout (via its .venv)."""
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    assert os.access(SCRIPT, os.X_OK)
    proc = subprocess.Popen(
        [str(SCRIPT), "foo.qcow2"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    fde.procs.append(proc)
    assert read_line(proc, 30) == "All exports set up, ^C to revert\n"
    assert image_format(img) == "raw"
    fde.revert(proc)  # kill -SIGINT %1
    assert image_format(img) == "qcow2"

    result = subprocess.run(
        [str(SCRIPT), "-dp", "qfde.pid", "foo.qcow2"], cwd=tmp_path, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "qfde.pid").read_text())
    fde.track_pid(pid)
    assert image_format(img) == "raw"
    os.kill(pid, signal.SIGINT)  # kill -SIGINT $(cat qfde.pid)
    wait_for(lambda: pid_gone(pid) and not is_mounted(img), what="the revert")
    assert image_format(img) == "qcow2"


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    return unit


def test_service_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing")
    instance = subprocess.run(
        ["systemd-escape", "--path", "/var/lib/images/foo.qcow2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    console_script = Path(sys.executable).parent / "fuse-disk-export"
    text = UNIT.read_text().replace("ExecStart=fuse-disk-export", f"ExecStart={console_script}")
    copy = tmp_path / f"fuse-disk-export@{instance}.service"
    copy.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_service_unit_runs_as_systemd_would(
    fde: Runner, tmp_path: Path, notify_socket: socket.socket
) -> None:
    """The unit's own ExecStart, readiness protocol and stop signal, without systemd."""
    service = _unit()["Service"]
    assert service["Type"] == "notify" and service["KillMode"] == "mixed"
    img = make_qcow2(tmp_path / "my disk.qcow2", "64M", *SAMPLE)
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "fuse-disk-export"
    argv = [str(Path(sys.executable).parent / "fuse-disk-export")] + [
        str(img) if arg == "%f" else arg for arg in argv[1:]
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    fde.procs.append(proc)  # type: ignore[arg-type]
    assert receive(notify_socket)["READY"] == "1"
    assert image_format(img) == "raw"
    proc.send_signal(getattr(signal, service["KillSignal"]))
    assert receive(notify_socket)["STOPPING"] == "1"
    assert proc.wait(timeout=30) == 0
    assert image_format(img) == "qcow2"
