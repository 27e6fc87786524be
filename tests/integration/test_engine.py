"""The engine's face, driven directly: start, serve (until a watch calls it off, or the daemon
dies), stop; with nothing of the application (no signals, no pid file, no registry)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_disk_export import engine
from fuse_disk_export.errors import QemuError
from fuse_disk_export.images import ImageOptions, resolve
from tests.helpers.checks import (
    assert_all_clean,
    assert_not_mounted,
    daemons_using,
    is_mounted,
)
from tests.helpers.images import SAMPLE, image_format, make_qcow2, qemu_io
from tests.helpers.runner import Processes, Runner


@pytest.fixture
def graph(fde: Runner, tmp_path: Path) -> engine.BlockGraph:
    """One read-only qcow2 (``fde`` checks that nothing is left mounted after the test)."""
    img = make_qcow2(tmp_path / "a.qcow2", "64M", *SAMPLE)
    return engine.plan([resolve(str(img), ImageOptions(read_only=True)).spec], engine.Tuning())


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_served_until_a_watched_process_exits(
    graph: engine.BlockGraph, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    daemon = engine.start(graph)
    try:
        (mountpoint,) = daemon.mountpoints
        assert image_format(mountpoint) == "raw"
        exited = engine.Exited(sleeper.pid, "sleep")
        try:
            sleeper.kill()
            by, why = engine.serve(daemon, watch=[exited])
        finally:
            exited.close()
        assert by is exited and why == f"sleep (pid {sleeper.pid}) exited"
        assert is_mounted(mountpoint)
    finally:
        status = engine.stop(daemon)
    assert status == 0
    assert_not_mounted(mountpoint)
    assert image_format(mountpoint) == "qcow2"
    assert engine.stop(daemon) == 0  # a second stop just reports
    assert_all_clean(tmp_path)


def test_a_daemon_that_dies_while_serving_is_reported_and_detached(
    graph: engine.BlockGraph, tmp_path: Path
) -> None:
    daemon = engine.start(graph)
    try:
        os.kill(daemon.pid, signal.SIGKILL)
        with pytest.raises(QemuError, match="killed by SIGKILL while serving"):
            engine.serve(daemon)
        assert_not_mounted(daemon.mountpoints[0])
    finally:
        assert engine.stop(daemon) == -signal.SIGKILL
    assert_all_clean(tmp_path)


def test_a_mount_another_process_serves_is_left_alone(
    graph: engine.BlockGraph, hand: Processes, tmp_path: Path
) -> None:
    """What a daemon leaves mounted is detached after it exits; a FUSE mount that another
    process serves on the same path meanwhile is not (it mounted there after the daemon
    started: a rollback must not take it down)."""
    from fuse_disk_export.engine.daemon import _detach_new, _still_mounted

    (export,) = graph.exports
    assert not _still_mounted(graph)
    other = make_qcow2(tmp_path / "b.qcow2", "64M")
    foreign = hand.export_by_hand(other, Path(export.mountpoint))
    assert _detach_new(graph, set()) == []
    assert is_mounted(export.mountpoint) and _still_mounted(graph)
    foreign.kill()
    foreign.wait(timeout=10)
    # Now nobody serves it: a dead mount (ENOTCONN), which is detached.
    assert _still_mounted(graph)
    assert _detach_new(graph, set()) == [export.mountpoint]
    assert_not_mounted(export.mountpoint)
    assert not _still_mounted(graph)


def test_a_stop_that_does_not_reap_returns_with_everything_closed(
    fde: Runner, tmp_path: Path
) -> None:
    """`stop_all` without reaping may return before the daemon has exited, but only once it has
    unmounted every export and flushed and closed every image: what was written through the
    export is in the image, and a writer may open it at once; `reap_all` then reaps."""
    img = make_qcow2(tmp_path / "w.qcow2", "64M")
    graph = engine.plan([resolve(str(img), ImageOptions()).spec], engine.Tuning())
    daemon = engine.start(graph)
    try:
        fd = os.open(img, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x42" * 65536, 2 << 20)
        finally:
            os.close(fd)  # no fsync: the revert flushes
    finally:
        engine.stop_all([daemon], reap=False)
    try:
        assert_not_mounted(img)
        assert daemons_using(tmp_path) == []
        qemu_io("qcow2", img, "read -P 0x42 2M 64k")
        qemu_io("qcow2", img, "write -P 0x11 0 4k")
    finally:
        engine.reap_all([daemon])
    assert daemon.process.returncode == 0
    assert engine.stop(daemon) == 0
    assert_all_clean(tmp_path)


def test_a_recorded_mount_whose_numbers_went_to_another_is_left_alone(
    graph: engine.BlockGraph, hand: Processes, tmp_path: Path
) -> None:
    """The kernel gives a freed mount's ID and device to the next mount at once: once our daemon
    or driver has gone, a mount with the numbers we recorded that a process serves is another's
    (a test of ours detached an export of another program's that way)."""
    from fuse_disk_export import mounts
    from fuse_disk_export.engine.daemon import _detach_new
    from fuse_disk_export.mountfs.drivers import DRIVERS
    from fuse_disk_export.mountfs.mount import Mounted

    other = make_qcow2(tmp_path / "b.qcow2", "64M")
    hand.export_by_hand(other)
    entry = mounts.mount_at(str(other))
    assert entry is not None
    recorded = entry._replace(mount_point=str(tmp_path / "where-ours-was"))
    assert _detach_new(graph, set(), [recorded]) == []
    assert is_mounted(other)
    gone = subprocess.Popen(["true"])
    gone.wait()
    driver = Mounted(recorded.mount_point, "ext", DRIVERS["ext"], gone, None, recorded)  # type: ignore[arg-type]
    assert driver.now() is None
