"""Partitions as their own raw files, exports on a chosen file, and NBD beside FUSE."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.helpers.checks import is_mounted
from tests.helpers.disks import parted_disk, run
from tests.helpers.host import require
from tests.helpers.images import image_format, make_qcow2, qemu_img, qemu_io
from tests.helpers.runner import Runner, pid_gone, wait_for
from tests.helpers.units import MiB


@pytest.fixture(scope="module")
def fs_tools() -> None:
    for tool in ("parted", "mkfs.ext4", "e2fsck", "debugfs", "nbdinfo"):
        require(shutil.which(tool) is not None, tool)


def ext4_in_partition(
    tmp_path: Path, label: str, parts: list[str], fs_part: tuple[int, int]
) -> Path:
    """A qcow2 with a partition table made by parted; partition ``fs_part`` holds ext4."""
    raw = parted_disk(tmp_path / "disk.raw", 64 * MiB, "mklabel", label, *parts)
    start, size = fs_part
    run("mkfs.ext4", "-q", "-F", "-E", f"offset={start}", str(raw), f"{size // 1024}k")
    img = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    raw.unlink()
    return img


def stop(pid_file: Path) -> None:
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGINT)
    wait_for(lambda: pid_gone(pid), what="the daemon to exit")


def check_partition_round_trip(
    fde: Runner, tmp_path: Path, img: Path, number: int, size: int
) -> None:
    p = tmp_path / "p.img"
    pid_file = tmp_path / "fde.pid"
    result = fde.run("-dp", str(pid_file), "-P", str(number), "-m", str(p), str(img))
    assert result.returncode == 0, result.stderr
    fde.track_pid(int(pid_file.read_text()))
    assert not is_mounted(img), "the image itself must not be mounted over"
    assert is_mounted(p) and p.stat().st_size == size
    run("e2fsck", "-fn", str(p))
    note = tmp_path / "note.txt"
    note.write_text("written through one partition\n")
    run("debugfs", "-w", "-R", f"write {note} note.txt", str(p))
    stop(pid_file)
    assert not p.exists(), "a mount point we created is removed on revert"
    assert image_format(img) == "qcow2"
    qemu_img("check", str(img))

    # What was written is in the qcow2: look again, read-only.
    result = fde.run("-dp", str(pid_file), "-r", "-P", str(number), "-m", str(p), str(img))
    assert result.returncode == 0, result.stderr
    fde.track_pid(int(pid_file.read_text()))
    assert run("debugfs", "-R", "cat note.txt", str(p)) == "written through one partition\n"
    stop(pid_file)


def test_gpt_partition_2(fde: Runner, tmp_path: Path, fs_tools: None) -> None:
    img = ext4_in_partition(
        tmp_path,
        "gpt",
        ["mkpart", "one", "1MiB", "9MiB", "mkpart", "two", "ext4", "9MiB", "41MiB"],
        (9 * MiB, 32 * MiB),
    )
    check_partition_round_trip(fde, tmp_path, img, 2, 32 * MiB)


def test_mbr_logical_partition(fde: Runner, tmp_path: Path, fs_tools: None) -> None:
    img = ext4_in_partition(
        tmp_path,
        "msdos",
        [
            "mkpart",
            "primary",
            "1MiB",
            "9MiB",
            "mkpart",
            "extended",
            "9MiB",
            "60MiB",
            "mkpart",
            "logical",
            "ext4",
            "10MiB",
            "42MiB",
        ],
        (10 * MiB, 32 * MiB),
    )
    check_partition_round_trip(fde, tmp_path, img, 5, 32 * MiB)


def test_list_partitions(fde: Runner, tmp_path: Path, fs_tools: None) -> None:
    img = ext4_in_partition(
        tmp_path,
        "gpt",
        ["mkpart", "boot", "1MiB", "9MiB", "mkpart", "root", "ext4", "9MiB", "41MiB"],
        (9 * MiB, 32 * MiB),
    )
    result = fde.run("--list-partitions", str(img))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "GPT" in lines[0]
    assert any(
        line.split()[:3] == ["2", str(9 * MiB), str(32 * MiB)] and "root" in line for line in lines
    )
    assert not is_mounted(img)


def test_missing_partition_is_one_line(fde: Runner, tmp_path: Path, fs_tools: None) -> None:
    img = ext4_in_partition(
        tmp_path, "gpt", ["mkpart", "one", "ext4", "1MiB", "33MiB"], (MiB, 32 * MiB)
    )
    result = fde.run("-P", "7", "-m", str(tmp_path / "p.img"), str(img))
    assert result.returncode != 0
    assert "no partition 7" in result.stderr and str(img) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.img").exists()


def test_mountpoint_file_and_dir(fde: Runner, tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "8M")
    existing = tmp_path / "view.raw"
    existing.write_bytes(b"keep me")
    proc = fde.start_live("-m", str(existing), str(img))
    assert is_mounted(existing) and not is_mounted(img)
    assert existing.stat().st_size == 8 * MiB
    fde.revert(proc)
    assert existing.read_bytes() == b"keep me", "an existing mount point file is left as it was"

    (tmp_path / "d").mkdir()
    refused = fde.run("-m", str(tmp_path / "d"), str(img))
    assert refused.returncode != 0 and "directory" in refused.stderr

    two = fde.run("-m", str(existing), str(img), str(img))
    assert two.returncode == 2 and "--mountpoint-dir" in two.stderr

    b = tmp_path / "b.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(b), "4M")
    views = tmp_path / "views"
    views.mkdir()
    proc = fde.start_live("--mountpoint-dir", str(views), str(img), str(b))
    assert (views / "a.qcow2").stat().st_size == 8 * MiB
    assert (views / "b.vdi").stat().st_size == 4 * MiB
    fde.revert(proc)
    assert list(views.iterdir()) == []


def test_mountpoint_already_mounted_is_refused(fde: Runner, tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "8M")
    proc = fde.start_live(str(img))
    other = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(other), "8M")
    refused = fde.run("-m", str(img), str(other))
    assert refused.returncode != 0 and "mount point" in refused.stderr, refused.stderr
    assert image_format(img) == "raw", "the live export keeps working"
    fde.revert(proc)


def test_nbd_beside_fuse_shows_allocation_depth(
    fde: Runner, tmp_path: Path, fs_tools: None
) -> None:
    base = make_qcow2(tmp_path / "base.qcow2", "16M", (0x11, "0", "1M"))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    qemu_io("qcow2", top, "write -P 0x22 4M 1M")
    sock = tmp_path / "nbd.sock"
    proc = fde.start_live("--nbd-socket", str(sock), str(top))
    uri = f"nbd+unix:///top.qcow2?socket={sock}"
    depth = run("nbdinfo", "--map=qemu:allocation-depth", uri)
    kinds = {line.split(None, 3)[3].strip() for line in depth.splitlines()}
    assert "local" in kinds and any(k.startswith("backing") for k in kinds), depth
    with open(top, "rb") as f:  # the FUSE view at the same time
        f.seek(4 * MiB)
        assert f.read(4096) == b"\x22" * 4096
    # NBD is the writable side; a single image is also the default export, as with qemu-nbd.
    qemu_io("raw", f"nbd+unix:///?socket={sock}", "write -P 0x33 8M 64k")
    fde.revert(proc)
    assert not sock.exists()
    qemu_io("qcow2", top, "read -P 0x33 8M 64k")
    qemu_io("qcow2", base, "read -P 0x00 8M 64k")
