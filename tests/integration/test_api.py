"""The Python API, for real: `exported` from plain code, inside a running asyncio loop, with an
exception in the block, and with the calling process killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fuse_disk_export import FdeError, exported, exported_many
from fuse_disk_export.errors import ImageError, UsageError
from tests.helpers.checks import assert_all_clean, daemons_using, is_mounted
from tests.helpers.images import image_format, make_qcow2, qemu_io
from tests.helpers.runner import pid_gone, wait_for
from tests.helpers.units import MiB


def make(path: Path) -> Path:
    return make_qcow2(path, "16M", (0x5A, "0", "1M"))


def test_exported_in_plain_code(tmp_path: Path, qemu_tools: None) -> None:
    img = make(tmp_path / "a.qcow2")
    with exported(img) as raw:
        assert raw == img and is_mounted(raw)
        assert raw.stat().st_size == 16 * MiB
        with open(raw, "r+b") as f:
            assert f.read(4096) == b"\x5a" * 4096
            f.seek(2 * MiB)
            f.write(b"\x33" * 4096)
        result = subprocess.run(["qemu-img", "info", "--force-share", raw], capture_output=True)
        assert b"file format: raw" in result.stdout
    assert not is_mounted(img) and image_format(img) == "qcow2"
    qemu_io("qcow2", img, "read -P 0x33 2M 4k")
    assert_all_clean(tmp_path)


def test_exported_inside_a_running_event_loop(tmp_path: Path, qemu_tools: None) -> None:
    img = make(tmp_path / "a.qcow2")

    async def main() -> bytes:
        await asyncio.sleep(0)
        with exported(img, read_only=True) as raw:
            data = await asyncio.to_thread(raw.read_bytes)
            assert is_mounted(raw)
        return data[:4096]

    assert asyncio.run(main()) == b"\x5a" * 4096
    assert not is_mounted(img)
    assert_all_clean(tmp_path)


def test_an_exception_in_the_block_reverts(tmp_path: Path, qemu_tools: None) -> None:
    images = [make(tmp_path / f"{i}.qcow2") for i in range(3)]
    with pytest.raises(RuntimeError, match="boom"), exported_many(images) as raws:
        assert raws == images and all(is_mounted(r) for r in raws)
        raise RuntimeError("boom")
    assert not any(is_mounted(i) for i in images)
    assert all(image_format(i) == "qcow2" for i in images)
    assert_all_clean(tmp_path)


def test_failures_raise_the_package_errors(tmp_path: Path, qemu_tools: None) -> None:
    with pytest.raises(ImageError) as missing, exported(tmp_path / "missing.qcow2"):
        pass
    assert str(tmp_path / "missing.qcow2") in str(missing.value)
    img = make(tmp_path / "a.qcow2")
    with pytest.raises(UsageError, match="native needs"), exported(img, aio="native"):
        pass
    assert issubclass(UsageError, FdeError)
    assert_all_clean(tmp_path)


KILLED = """
import sys, time
from fuse_disk_export import exported
with exported(sys.argv[1], mountpoint=sys.argv[2]) as raw:
    print(raw, flush=True)
    time.sleep(600)
"""


def test_no_mount_is_left_when_the_caller_is_killed(tmp_path: Path, qemu_tools: None) -> None:
    img = make(tmp_path / "a.qcow2")
    view = tmp_path / "view.raw"
    view.touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(img), str(view)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == str(view)
        daemons = daemons_using(tmp_path)
        assert is_mounted(view) and daemons
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not is_mounted(view), 5, "the mount to go with the caller")
        wait_for(lambda: all(pid_gone(d) for d in daemons), 5, "its qemu-storage-daemon to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    os.stat(view)  # not a dead mount
    assert_all_clean(tmp_path)


DIES = """
import os, signal, sys
from fuse_disk_export import exported
from fuse_disk_export.errors import QemuError
from tests.helpers.checks import daemons_using
from tests.helpers.runner import pid_gone, wait_for
try:
    with exported(sys.argv[1]) as raw:
        (daemon,) = daemons_using(raw.parent)
        os.kill(daemon, signal.SIGKILL)
        wait_for(lambda: pid_gone(daemon), 5, "the daemon to die")
except QemuError as e:
    print(e)
"""


def test_a_daemon_dead_in_the_block_is_an_error_on_leaving_it(
    tmp_path: Path, qemu_tools: None
) -> None:
    """What was written in the block after the death is lost: leaving it raises, as the command
    line exits 1, and, the caller having configured no logging, nothing is printed."""
    img = make(tmp_path / "a.qcow2")
    result = subprocess.run(
        [sys.executable, "-c", DIES, str(img)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0 and result.stderr == "", result
    assert "killed by SIGKILL while serving" in result.stdout, result
    assert not is_mounted(img) and image_format(img) == "qcow2"
    assert_all_clean(tmp_path)
