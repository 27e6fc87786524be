"""Hostile or mistaken input: refused at once, in one line naming the file and the reason.

Whatever the file is, the tool exits non-zero within a few seconds, prints one line on stderr (no
traceback unless -v), mounts nothing, and leaves the file's bytes as they were.

Decision on empty files: QEMU exports a 0-byte raw file without trouble (reads see end of file,
writes fail with EIO, a truncate through the export grows the file underneath), but there is
nothing to export in it and it is nearly always a mistake (a failed download, a wrong path), so it
is refused: "is empty (0 bytes); nothing to export".
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

from fuse_disk_export import mounts
from tests.helpers.checks import assert_all_clean, one_line
from tests.helpers.images import image_format, make_qcow2, qemu_img, sha256
from tests.helpers.runner import Runner

#: "Within a few seconds": a refusal takes about 0.15 s here.
QUICK = 5.0


def refuse(fde: Runner, *args: str, path: Path, reason: str) -> str:
    """Run with ``args``; check the refusal names ``path`` and says ``reason``; return the line."""
    digest = sha256(path) if path.is_file() else None
    start = time.monotonic()
    result = fde.run(*args, timeout=30)
    elapsed = time.monotonic() - start
    assert result.returncode != 0, result.stdout
    assert elapsed < QUICK, f"took {elapsed:.2f}s"
    line = one_line(result.stderr)
    assert str(path) in line and reason in line, line
    assert "All exports set up" not in result.stdout
    assert_all_clean(fde.root)
    if digest is not None:
        assert sha256(path) == digest, f"{path} changed"
    return line


# --------------------------------------------------------------------------------------------
# Not an image file at all


def test_missing_path(fde: Runner, tmp_path: Path) -> None:
    missing = tmp_path / "nope.qcow2"
    refuse(fde, str(missing), path=missing, reason="no such file")


def test_directory(fde: Runner, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    refuse(fde, str(folder), path=folder, reason="is a directory")


def test_dev_null(fde: Runner) -> None:
    refuse(fde, "/dev/null", path=Path("/dev/null"), reason="not a regular file")


def test_device_node(fde: Runner, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod of a device node needs root")
    node = tmp_path / "disk.img"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    refuse(fde, str(node), path=node, reason="not a regular file")
    assert stat.S_ISCHR(os.stat(node).st_mode)


def test_fifo_does_not_hang(fde: Runner, tmp_path: Path) -> None:
    fifo = tmp_path / "disk.img"
    os.mkfifo(fifo)
    refuse(fde, str(fifo), path=fifo, reason="not a regular file")


def test_empty_file(fde: Runner, tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    empty.touch()
    refuse(fde, str(empty), path=empty, reason="is empty (0 bytes)")
    refuse(fde, "-f", "raw", str(empty), path=empty, reason="is empty (0 bytes)")
    assert empty.stat().st_size == 0


# --------------------------------------------------------------------------------------------
# Truncated and inconsistent headers

LUKS = ["--object", "secret,id=sec0,data=x", "-o", "key-secret=sec0,iter-time=10,hash-alg=sha512"]

#: format -> bytes to keep: the magic (and version where the probe needs it) plus a few.
TRUNCATE_AT = {
    "qcow2": 12,
    "qcow": 12,
    "vmdk": 8,
    "vdi": 0x44 + 4,  # the vdi signature is at 0x40
    "vhdx": 12,
    "vpc": 12,
    "qed": 8,
    "parallels": 20,
    "luks": 10,
}


def create(fmt: str, path: Path, size: str = "16M") -> Path:
    options = LUKS if fmt == "luks" else []
    for attempt in range(5):  # qemu-img's PBKDF benchmark fails now and then (see DESIGN)
        result = subprocess.run(
            ["qemu-img", "create", "-q", "-f", fmt, *options, str(path), size],
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            return path
        if "Unable to get accurate CPU usage" not in result.stderr or attempt == 4:
            pytest.fail(f"qemu-img create -f {fmt}: {result.stderr}")
    return path


@pytest.mark.parametrize("fmt", sorted(TRUNCATE_AT))
def test_truncated_header(fde: Runner, tmp_path: Path, fmt: str) -> None:
    img = create(fmt, tmp_path / f"disk.{fmt}")
    with open(img, "r+b") as f:
        f.truncate(TRUNCATE_AT[fmt])
    line = refuse(fde, str(img), path=img, reason=f"truncated {fmt} header")
    assert "file is" in line  # says how short it is


@pytest.mark.parametrize(("table", "offset"), [("L1", 40), ("refcount", 48)])
def test_qcow2_table_past_the_end(fde: Runner, tmp_path: Path, table: str, offset: int) -> None:
    img = make_qcow2(tmp_path / "disk.qcow2", "64M", (0x5A, "0", "1M"))
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", 1 << 30))  # cluster-aligned, far past the end
    refuse(fde, str(img), path=img, reason=f"qcow2 {table} table lies past the end of the file")


def test_a_format_driver_crash_names_the_image(fde: Runner, tmp_path: Path) -> None:
    """A parallels header extension at offset 0: QEMU 7.2's driver aborts (an assertion), later
    QEMUs refuse the image; either way the one line names it, and nothing is left."""
    img = tmp_path / "disk.parallels"
    qemu_img("create", "-q", "-f", "parallels", str(img), "64M")
    with open(img, "r+b") as f:
        f.seek(62)
        f.write(b"\xff")
    before = sha256(img)
    result = fde.run("-r", str(img))
    assert result.returncode == 1, result.stderr
    assert one_line(result.stderr).startswith(f"fuse-disk-export: {img}: "), result.stderr
    assert sha256(img) == before
    assert_all_clean(tmp_path)


# --------------------------------------------------------------------------------------------
# -f that does not match


@pytest.mark.parametrize(
    ("given", "content", "reason"),
    [
        ("vmdk", "qcow2", "is not a vmdk image (its content looks like qcow2)"),
        ("qcow2", "raw", "is not a qcow2 image (its content looks like raw)"),
        ("qed", "vpc", "is not a qed image (its content looks like vpc)"),
        ("nonsense", "qcow2", "nonsense"),
    ],
)
def test_format_that_does_not_match(
    fde: Runner, tmp_path: Path, given: str, content: str, reason: str
) -> None:
    img = create(content, tmp_path / f"disk.{content}")
    refuse(fde, "-f", given, str(img), path=img, reason=reason)
    assert image_format(img) == content


def test_format_raw_over_a_qcow2_is_taken_literally(fde: Runner, tmp_path: Path) -> None:
    """-f raw is the explicit way to look at an image's own bytes: allowed, nothing probed."""
    img = make_qcow2(tmp_path / "disk.qcow2", "64M", (0x5A, "0", "1M"))
    digest = sha256(img)
    proc = fde.start_live("-r", "-f", "raw", str(img))
    with open(img, "rb") as f:
        assert f.read(4) == b"QFI\xfb"
    fde.revert(proc)
    assert_all_clean(tmp_path)
    assert sha256(img) == digest


# --------------------------------------------------------------------------------------------
# Not writable without -r


def test_read_only_mode_bits(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "disk.qcow2", "64M", (0x5A, "0", "1M"))
    img.chmod(0o444)
    refuse(fde, str(img), path=img, reason="use -r")
    # ... and with -r it is exported.
    proc = fde.start_live("-r", str(img))
    with open(img, "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096
    fde.revert(proc)
    assert_all_clean(tmp_path)
    assert image_format(img) == "qcow2"


def test_immutable_file(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "disk.qcow2", "64M", (0x5A, "0", "1M"))
    if shutil.which("chattr") is None:
        pytest.skip("chattr is missing")
    if subprocess.run(["chattr", "+i", str(img)], capture_output=True).returncode != 0:
        pytest.skip(f"chattr +i is not supported on the file system of {tmp_path}")
    try:
        refuse(fde, str(img), path=img, reason="is not writable (Operation not permitted)")
    finally:
        subprocess.run(["chattr", "-i", str(img)], check=True)


# --------------------------------------------------------------------------------------------
# Symlinks, tracebacks


def test_symlink_is_resolved(fde: Runner, tmp_path: Path) -> None:
    target = make_qcow2(tmp_path / "real.qcow2", "64M", (0x5A, "0", "1M"))
    link = tmp_path / "link.qcow2"
    link.symlink_to(target.name)
    proc = fde.start_live("-v", str(link))
    assert mounts.mount_at(str(target)) is not None
    assert mounts.mount_at(str(link)) is None  # the link is left alone, and reads through
    with open(link, "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096
    err = fde.revert(proc)
    log = err
    assert f"{link} is a symlink; exporting its target {target}" in log, log
    assert_all_clean(tmp_path)
    assert link.is_symlink() and image_format(target) == "qcow2"


def test_dangling_symlink(fde: Runner, tmp_path: Path) -> None:
    link = tmp_path / "link.qcow2"
    link.symlink_to("gone.qcow2")
    line = refuse(fde, str(link), path=tmp_path / "gone.qcow2", reason="no such file")
    assert link.is_symlink() and line


def test_traceback_only_with_verbose(fde: Runner, tmp_path: Path) -> None:
    img = create("qcow2", tmp_path / "disk.qcow2")
    with open(img, "r+b") as f:
        f.truncate(12)
    quiet = fde.run(str(img))
    verbose = fde.run("-v", str(img))
    assert "Traceback" not in quiet.stderr and len(quiet.stderr.strip().splitlines()) == 1
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
    assert "truncated qcow2 header" in verbose.stderr
    qemu_img("info", "--force-share", "-f", "raw", str(img))  # still a 12-byte file we can read
