"""The core workflow against a real qemu-storage-daemon and real FUSE mounts."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from tests.helpers.checks import daemons_using, is_mounted
from tests.helpers.images import SAMPLE, image_format, make_qcow2, qemu_img, qemu_io
from tests.helpers.runner import Processes, Runner, pid_gone, wait_for
from tests.helpers.units import MiB


def test_qcow2_round_trip(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    reference = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", str(img), str(reference))

    proc = fde.start_live(str(img))
    assert is_mounted(img)
    assert image_format(img) == "raw"
    assert img.read_bytes() == reference.read_bytes()
    with open(img, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\x42" * 4096)
        f.flush()
        os.fsync(f.fileno())

    fde.revert(proc)
    assert not is_mounted(img)
    assert image_format(img) == "qcow2"
    qemu_io("qcow2", img, "read -P 0x42 5M 4k")
    qemu_io("qcow2", img, "read -P 0x5a 0 1M")
    qemu_img("check", str(img))


CREATABLE = ["qcow2", "qcow", "vmdk", "vdi", "vhdx", "vpc", "qed", "parallels", "raw"]


def test_every_format_in_one_invocation(fde: Runner, tmp_path: Path) -> None:
    images = []
    for fmt in CREATABLE:
        img = tmp_path / f"disk.{fmt}"
        qemu_img("create", "-q", "-f", fmt, str(img), "16M")
        qemu_io(fmt, img, "write -P 0x3c 1M 64k")
        images.append(img)
    sizes = {
        img: int(
            __import__("json").loads(qemu_img("info", "--output=json", str(img)))["virtual-size"]
        )
        for img in images
    }

    proc = fde.start_live(*map(str, images))
    for img in images:
        assert is_mounted(img), img
        assert os.path.getsize(img) == sizes[img], img
        with open(img, "rb") as f:
            f.seek(MiB)
            assert f.read(65536) == b"\x3c" * 65536, img
    fde.revert(proc)
    for img, fmt in zip(images, CREATABLE, strict=True):
        assert not is_mounted(img)
        assert image_format(img) == fmt


def start_detached(fde: Runner, pid_file: Path, *images: Path) -> int:
    """``-dp PID_FILE IMAGE...``, live once it returns: the serving process's pid (tracked)."""
    result = fde.run("-dp", str(pid_file), *map(str, images))
    assert result.returncode == 0, result.stderr
    pid = int(pid_file.read_text())
    fde.track_pid(pid)
    return pid


def test_daemonize_ready_when_parent_returns(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    pid_file = tmp_path / "fde.pid"
    pid = start_detached(fde, pid_file, img)
    # No waiting: the export must be readable the instant the parent has returned.
    with open(img, "rb") as f:
        assert f.read(16) == b"\x5a" * 16
    assert image_format(img) == "raw"

    os.kill(pid, signal.SIGINT)
    wait_for(lambda: pid_gone(pid), what="the daemon to exit")
    assert not pid_file.exists()
    assert not is_mounted(img)
    assert image_format(img) == "qcow2"


def test_pid_file_gone_means_reverted(fde: Runner, tmp_path: Path) -> None:
    """A script waits for the pid file to go, not for a pid: by then everything is reverted,
    even when the signal comes the moment the export is live (before the tool serves)."""
    images = [make_qcow2(tmp_path / f"i{n}.qcow2", "64M") for n in range(16)]
    pid_file = tmp_path / "fde.pid"
    pid = start_detached(fde, pid_file, *images)
    # Not the pid file's own watcher (pidfile.watcher): it goes once the tool has gone.
    daemons = [c.pid for c in psutil.Process(pid).children() if "fde-guard" not in c.cmdline()]
    assert daemons
    os.kill(pid, signal.SIGINT)
    wait_for(lambda: not pid_file.exists(), what="the pid file to be removed")
    # As qemu-storage-daemon's own pid file: the daemons may take milliseconds more to exit,
    # but hold nothing of the test any more, and the images take a writer at once.
    assert daemons_using(tmp_path) == []
    assert not any(is_mounted(img) for img in images)
    assert {image_format(img) for img in images} == {"qcow2"}
    qemu_io("qcow2", images[0], "write -P 0x11 0 4k")
    # The tool reaps them before it exits.
    wait_for(lambda: pid_gone(pid), what="the tool to exit")
    assert all(pid_gone(daemon) for daemon in daemons)


def test_daemonize_relative_paths(fde: Runner, tmp_path: Path) -> None:
    make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    result = fde.run("-dp", "fde.pid", "foo.qcow2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "fde.pid").read_text())
    fde.track_pid(pid)
    assert image_format(tmp_path / "foo.qcow2") == "raw"
    os.kill(pid, signal.SIGINT)
    wait_for(lambda: pid_gone(pid), what="the daemon to exit")
    assert not (tmp_path / "fde.pid").exists()
    assert not is_mounted(tmp_path / "foo.qcow2")
    assert image_format(tmp_path / "foo.qcow2") == "qcow2"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_revert_with_status_0(
    fde: Runner, tmp_path: Path, sig: signal.Signals
) -> None:
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    proc = fde.start_live(str(img))
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 0
    assert not is_mounted(img)
    assert image_format(img) == "qcow2"


def test_sigint_to_process_group(fde: Runner, tmp_path: Path) -> None:
    """What a terminal's Ctrl-C does: SIGINT to the whole foreground process group."""
    img = make_qcow2(tmp_path / "foo.qcow2", "64M", *SAMPLE)
    proc = fde.start_live(str(img), new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    assert not is_mounted(img)
    assert image_format(img) == "qcow2"


def test_awkward_names(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "my disk,format=raw:x.qcow2", "64M", *SAMPLE)
    proc = fde.start_live(str(img))
    assert image_format(img) == "raw"
    fde.revert(proc)
    assert image_format(img) == "qcow2"


def test_all_or_nothing(fde: Runner, hand: Processes, tmp_path: Path) -> None:
    good = make_qcow2(tmp_path / "good.qcow2", "64M", *SAMPLE)
    busy = make_qcow2(tmp_path / "busy.qcow2", "64M", *SAMPLE)
    pid_file = tmp_path / "fde.pid"
    hand.hold_image(busy)  # another QEMU process holds busy.qcow2 open, with its lock
    result = fde.run("-dp", str(pid_file), str(good), str(busy))
    assert result.returncode != 0
    line = result.stderr.strip()
    assert "busy.qcow2" in line and "lock" in line, line
    assert "Traceback" not in line and len(line.splitlines()) == 1, line
    assert not pid_file.exists()
    assert not is_mounted(good) and not is_mounted(busy)
    assert image_format(good) == "qcow2"
