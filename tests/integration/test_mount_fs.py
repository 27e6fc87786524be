"""``--mount-fs DIR``: the files inside an image, through a userspace driver on top of the export.

Real images (GPT + ext4, NTFS, FAT, a whole-disk ext4 without a table), real drivers (fuse2fs,
ntfs-3g, fusefat), real FUSE mounts, both layers checked gone after every test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from fuse_disk_export import cli, mounts
from fuse_disk_export.request import build_request
from tests.helpers.checks import assert_all_clean, is_mounted, one_line
from tests.helpers.disks import tool
from tests.helpers.images import image_format, qemu_img
from tests.helpers.runner import Runner, pid_gone, wait_for
from tests.helpers.units import MiB


def _table(raw: Path, *parts: tuple[int, int, str]) -> None:
    script = "label: gpt\n" + "".join(
        f"start={start}, size={size}, type={kind}\n" for start, size, kind in parts
    )
    subprocess.run([tool("sfdisk"), "-q", str(raw)], input=script, text=True, check=True)


LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BASIC = "EBD0A0A2-B9E5-4433-87C0-68B6979AC7C7"


def _mkfs(raw: Path, fs: str, offset: int, size: int) -> None:
    """A filesystem of ``size`` bytes at ``offset`` of ``raw``, holding hello.txt."""
    part = raw.with_suffix(".part")
    with open(part, "wb") as f:
        f.truncate(size)
    seed = raw.parent / "seed"
    seed.mkdir(exist_ok=True)
    (seed / "hello.txt").write_text(f"hello from {fs}\n")
    if fs == "ext4":
        subprocess.run([tool("mkfs.ext4"), "-q", "-F", "-d", str(seed), str(part)], check=True)
    elif fs == "ntfs":
        subprocess.run(
            [tool("mkntfs"), "-q", "-F", "-f", str(part)], check=True, capture_output=True
        )
    elif fs == "vfat":
        subprocess.run([tool("mkfs.fat"), str(part)], check=True, capture_output=True)
    with open(part, "rb") as src, open(raw, "r+b") as dst:
        dst.seek(offset)
        shutil.copyfileobj(src, dst)
    part.unlink()


def filesystem_disk(root: Path, fs: str, fmt: str = "qcow2", table: bool = True) -> Path:
    raw = root / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    offset = 0
    if table:
        _table(raw, (2048, 100000, BASIC if fs != "ext4" else LINUX))
        offset = 2048 * 512
    _mkfs(raw, fs, offset, 100000 * 512 if table else 64 * MiB)
    image = root / f"disk.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", fmt, str(raw), str(image))
    raw.unlink()
    return image


def _mount_dir(root: Path) -> Path:
    directory = root / "mnt"
    directory.mkdir()
    return directory


def _stop(pid_file: Path, clean: Path | None = None) -> None:
    """Revert the export of ``pid_file``; with ``clean``, check nothing is left under it."""
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGINT)
    wait_for(lambda: not pid_file.exists() and pid_gone(pid), 30, "the revert")
    if clean is not None:
        assert_all_clean(clean, pid_files=(pid_file,))


def _files_ready(fde: Runner, root: Path, *args: str) -> tuple[Path, Path]:
    directory = _mount_dir(root)
    pid_file = root / "fde.pid"
    result = fde.run("-dp", str(pid_file), "--mount-fs", str(directory), *args)
    assert result.returncode == 0, result.stderr
    fde.track_pid(int(pid_file.read_text()))
    # -d returned: the filesystem is there already.
    assert is_mounted(directory)
    return directory, pid_file


def test_ext4_in_a_gpt_qcow2_read_write(fde: Runner, tmp_path: Path) -> None:
    image = filesystem_disk(tmp_path, "ext4")
    directory, pid_file = _files_ready(fde, tmp_path, str(image))
    assert (directory / "hello.txt").read_text() == "hello from ext4\n"
    (directory / "new.txt").write_text("written through both layers\n")
    entry = mounts.mount_at(str(directory))
    assert entry is not None and entry.is_fuse
    assert not is_mounted(image), "the image's own path is not touched"
    # Ours only: --list shows every export on the machine.
    serving = int(pid_file.read_text())
    listed = [r for r in json.loads(fde.run("--list", "--json").stdout) if r["pid"] == serving]
    assert [(r["fs_dir"], r["fs_type"], r["fs_driver"]) for r in listed] == [
        (str(directory), "ext", "fuse2fs")
    ]
    assert str(directory) in fde.run("--list").stdout
    _stop(pid_file, tmp_path)
    assert not is_mounted(directory)
    # The write is in the image: read it back read-only, through a second export.
    directory.rmdir()
    directory, pid_file = _files_ready(fde, tmp_path, "-r", str(image))
    assert (directory / "new.txt").read_text() == "written through both layers\n"
    stop = fde.run("--stop", str(directory))
    assert stop.returncode == 0, stop.stderr
    assert not pid_file.exists() and not is_mounted(directory)
    assert_all_clean(tmp_path, pid_files=(pid_file,))


@pytest.mark.parametrize("fmt", ["vmdk", "vdi"])
def test_whole_disk_ext4_without_a_table(fde: Runner, tmp_path: Path, fmt: str) -> None:
    image = filesystem_disk(tmp_path, "ext4", fmt=fmt, table=False)
    start = time.monotonic()
    directory, pid_file = _files_ready(fde, tmp_path, "-r", str(image))
    names = os.listdir(directory)
    elapsed = time.monotonic() - start
    assert "hello.txt" in names, names
    print(f"{fmt}: command to a working ls in {elapsed * 1000:.0f} ms")
    _stop(pid_file, tmp_path)


def test_ntfs_read_write(fde: Runner, tmp_path: Path) -> None:
    image = filesystem_disk(tmp_path, "ntfs")
    directory, pid_file = _files_ready(fde, tmp_path, str(image))
    (directory / "n.txt").write_text("ntfs\n")
    _stop(pid_file)
    directory.rmdir()
    directory, pid_file = _files_ready(fde, tmp_path, "-r", str(image))
    assert (directory / "n.txt").read_text() == "ntfs\n"
    with pytest.raises(OSError):
        (directory / "x.txt").write_text("no")
    _stop(pid_file, tmp_path)


def test_fat_is_read_only(fde: Runner, tmp_path: Path) -> None:
    image = filesystem_disk(tmp_path, "vfat")
    directory = _mount_dir(tmp_path)
    refused = fde.run("--mount-fs", str(directory), str(image))
    assert refused.returncode == 2 and "fusefat" in refused.stderr and "-r" in refused.stderr
    assert not is_mounted(directory)
    directory.rmdir()
    directory, pid_file = _files_ready(fde, tmp_path, "-r", str(image))
    assert os.path.isdir(directory)
    _stop(pid_file, tmp_path)


def test_fat_driver_chatter_is_left_out(fde: Runner, tmp_path: Path) -> None:
    """fusefat writes a line for every request it serves ("getattr(/)"), the layout at each
    mount and, run read-only, a failed write-back at each unmount ("write() error: Bad file
    descriptor"): none of it reaches the user."""
    image = filesystem_disk(tmp_path, "vfat")
    directory = _mount_dir(tmp_path)
    proc = fde.start_live("-r", "--mount-fs", str(directory), str(image))
    assert is_mounted(directory)
    assert os.listdir(directory) == [] and not (directory / "missing").exists()
    err = fde.revert(proc)
    assert err == "", err
    assert_all_clean(tmp_path)


def test_sigint_unmounts_both_layers(fde: Runner, tmp_path: Path) -> None:
    image = filesystem_disk(tmp_path, "ext4")
    directory = _mount_dir(tmp_path)
    proc = fde.start_live("--mount-fs", str(directory), str(image))
    assert is_mounted(directory)
    (directory / "late.txt").write_text("just before the revert\n")
    fde.revert(proc)
    assert not is_mounted(directory)
    assert_all_clean(tmp_path)


@pytest.mark.parametrize("fs", ["ext4", "vfat"])
def test_unmounting_the_filesystem_ends_the_export(fde: Runner, tmp_path: Path, fs: str) -> None:
    """``fusermount3 -u DIR`` is the user's way to end it: the export under it is reverted, one
    line says so, exit 0; what the driver says as it goes (fusefat: "readn() error", and exit
    status 255) is not an error."""
    image = filesystem_disk(tmp_path, fs)
    directory = _mount_dir(tmp_path)
    proc = fde.start_live(
        *(["-r"] if fs == "vfat" else []), "--mount-fs", str(directory), str(image)
    )
    subprocess.run(["fusermount3", "-u", str(directory)], check=True)
    status = proc.wait(timeout=30)
    err = proc.stderr.read() if proc.stderr else ""
    assert status == 0, err
    assert f"{directory} unmounted from outside" in err, err
    assert "readn()" not in err and "Traceback" not in err, err
    assert not is_mounted(directory)
    assert_all_clean(tmp_path)
    assert image_format(image) == "qcow2"


def test_a_folder_renamed_while_mounted(fde: Runner, tmp_path: Path) -> None:
    """``mv`` of the folder above DIR takes the filesystem's mount along: the revert unmounts it
    where it went (it left a dead mount there)."""
    image = filesystem_disk(tmp_path, "ext4")
    folder = tmp_path / "before"
    directory = folder / "mnt"
    directory.mkdir(parents=True)
    pid_file = tmp_path / "fde.pid"
    result = fde.run("-dp", str(pid_file), "--mount-fs", str(directory), str(image))
    assert result.returncode == 0, result.stderr
    fde.track_pid(int(pid_file.read_text()))
    moved = tmp_path / "after"
    folder.rename(moved)
    assert is_mounted(moved / "mnt")
    _stop(pid_file)
    assert not is_mounted(moved / "mnt")
    assert_all_clean(tmp_path)
    assert image_format(image) == "qcow2"


def _driver(directory: Path) -> int:
    entry = mounts.mount_at(str(directory))
    assert entry is not None
    servers = mounts.fuse_server_pids(entry)
    assert servers
    return servers[0]


@pytest.mark.parametrize("victim", ["driver", "daemon"])
def test_a_killed_layer_leaves_no_dead_mount(fde: Runner, tmp_path: Path, victim: str) -> None:
    image = filesystem_disk(tmp_path, "ext4")
    directory, pid_file = _files_ready(fde, tmp_path, str(image))
    serving = int(pid_file.read_text())
    if victim == "driver":
        os.kill(_driver(directory), signal.SIGKILL)
    else:
        daemons = [
            c.pid for c in psutil.Process(serving).children() if c.name().startswith("qemu-st")
        ]
        assert daemons
        os.kill(daemons[0], signal.SIGKILL)
    wait_for(lambda: pid_gone(serving), 10, "the tool to notice and exit")
    wait_for(lambda: not is_mounted(directory), 5, "the directory to be detached")
    os.stat(directory)  # not "Transport endpoint is not connected"
    assert not pid_file.exists()
    assert_all_clean(tmp_path, pid_files=(pid_file,))


def test_a_killed_daemon_under_the_filesystem_is_one_line(fde: Runner, tmp_path: Path) -> None:
    """What the driver says once its disk is gone (fuse2fs: "Transport endpoint is not
    connected while closing fs") is a consequence: only the tool's line is shown."""
    image = filesystem_disk(tmp_path, "ext4")
    directory = _mount_dir(tmp_path)
    proc = fde.start_live("--mount-fs", str(directory), str(image))
    (daemon,) = [
        c.pid for c in psutil.Process(proc.pid).children() if c.name().startswith("qemu-st")
    ]
    os.kill(daemon, signal.SIGKILL)
    status = proc.wait(timeout=30)
    err = proc.stderr.read() if proc.stderr else ""
    assert status == 1, err
    line = one_line(err)
    assert line.startswith(f"fuse-disk-export: {directory}: ") and "killed by SIGKILL" in line, err
    assert not is_mounted(directory)
    assert_all_clean(tmp_path)


def test_choice_of_partition(fde: Runner, tmp_path: Path) -> None:
    raw = tmp_path / "two.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    _table(raw, (2048, 40000, LINUX), (43008, 40000, LINUX))
    _mkfs(raw, "ext4", 2048 * 512, 40000 * 512)
    _mkfs(raw, "ext4", 43008 * 512, 40000 * 512)
    image = tmp_path / "two.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    directory = _mount_dir(tmp_path)
    refused = fde.run("-r", "--mount-fs", str(directory), str(image))
    assert refused.returncode == 2
    assert "1: ext" in refused.stderr and "2: ext" in refused.stderr and "-P" in refused.stderr
    directory.rmdir()
    directory, pid_file = _files_ready(fde, tmp_path, "-r", "-P", "2", str(image))
    assert (directory / "hello.txt").exists()
    _stop(pid_file, tmp_path)


def test_whole_disk_fat_in_a_vhdx(fde: Runner, tmp_path: Path) -> None:
    # A USB stick's layout: mkfs.fat on the whole disk, no table; its boot sector ends in 55 AA.
    image = filesystem_disk(tmp_path, "vfat", fmt="vhdx", table=False)
    listed = fde.run("--list-partitions", str(image))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [f"{image}: no partition table; the whole disk holds vfat"]
    directory, pid_file = _files_ready(fde, tmp_path, "-r", str(image))
    entry = mounts.mount_at(str(directory))
    assert entry is not None and entry.is_fuse
    assert os.listdir(directory) == []  # mkfs.fat made it empty
    _stop(pid_file, tmp_path)
    directory.rmdir()
    directory, pid_file = _files_ready(fde, tmp_path, "-r", "--fs-type", "fat", str(image))
    assert os.listdir(directory) == []
    _stop(pid_file, tmp_path)


def test_whole_disk_ntfs_in_a_qcow2_read_write(fde: Runner, tmp_path: Path) -> None:
    image = filesystem_disk(tmp_path, "ntfs", fmt="qcow2", table=False)
    directory, pid_file = _files_ready(fde, tmp_path, str(image))
    (directory / "n.txt").write_text("through ntfs-3g\n")
    _stop(pid_file, tmp_path)
    # After the revert, the file is in the qcow2: ntfs-3g's own ntfscat reads it from a copy.
    raw = tmp_path / "check.raw"
    qemu_img("convert", "-O", "raw", str(image), str(raw))
    cat = subprocess.run(
        [tool("ntfscat"), str(raw), "n.txt"], capture_output=True, text=True, check=True
    )
    assert cat.stdout == "through ntfs-3g\n"


def test_whole_disk_refusals_say_what_was_found(fde: Runner, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run([tool("mkfs.exfat"), str(raw)], check=True, capture_output=True)
    image = tmp_path / "ex.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    directory = _mount_dir(tmp_path)
    refused = fde.run("-r", "--mount-fs", str(directory), str(image))
    assert refused.returncode == 2
    assert "holds exfat" in refused.stderr and "without --mount-fs" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    listed = fde.run("--list-partitions", str(image))
    # libblkid, too, sees an (empty) MBR and exFAT in this boot sector.
    assert listed.stdout.splitlines() == [
        f"{image}: MBR with no partitions; the whole disk holds exfat"
    ]
    blank = tmp_path / "blank.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(blank), "8M")
    refused = fde.run("-r", "--mount-fs", str(directory), str(blank))
    assert refused.returncode == 1, refused.stderr
    assert "no filesystem recognised on the disk (no partition table)" in refused.stderr
    assert "--fs-type" in refused.stderr and "-P" not in refused.stderr
    assert not is_mounted(directory)


def test_logical_partition_5(fde: Runner, tmp_path: Path) -> None:
    raw = tmp_path / "logical.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    parted = [tool("parted"), "-s", str(raw), "mklabel", "msdos"]
    parted += ["mkpart", "extended", "2048s", "100%", "mkpart", "logical", "4096s", "90111s"]
    subprocess.run(parted, check=True, capture_output=True)
    _mkfs(raw, "ntfs", 4096 * 512, 86016 * 512)
    image = tmp_path / "logical.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    listed = fde.run("--list-partitions", str(image))
    assert listed.stdout.splitlines()[0] == f"{image}: MBR partition table"
    assert listed.stdout.split()[-5:] == ["5", str(4096 * 512), str(86016 * 512), "0x83", "ntfs"]
    directory, pid_file = _files_ready(fde, tmp_path, "-P", "5", str(image))
    (directory / "five.txt").write_text("in partition 5\n")
    _stop(pid_file)
    directory.rmdir()
    directory, pid_file = _files_ready(fde, tmp_path, "-r", "-P", "5", str(image))
    assert (directory / "five.txt").read_text() == "in partition 5\n"
    _stop(pid_file, tmp_path)


def test_a_request_never_set_up_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export's private folder is made by the setup, which removes it: a stop signal
    between the request and the setup left it behind."""
    image = filesystem_disk(tmp_path, "ext4")
    directory = _mount_dir(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    args = cli.build_parser().parse_args(["--mount-fs", str(directory), str(image)])
    request = build_request(cli.options_from(args), ask_passphrase=None)
    assert request.filesystem is not None
    assert request.filesystem.private_dir.startswith(str(scratch) + "/")
    assert list(scratch.iterdir()) == []
