"""--snapshot, LUKS, internal snapshots, discard, read-only formats — with real qemu-img images."""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from fuse_disk_export.engine import versions
from tests.helpers.checks import is_mounted
from tests.helpers.host import qemu_version
from tests.helpers.images import image_format, make_qcow2, qemu_img, qemu_io, sha256
from tests.helpers.runner import Runner, children, pid_gone, wait_for
from tests.helpers.units import MiB

# Left here: bochs() builds its header with test_detect's own put() and sizes, and that module is
# not moved in this change.
from tests.unit.test_detect import bochs

SECRET = "--object", "secret,id=sec0,data=correct horse"


def stop(fde: Runner, pid_file: Path) -> None:
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGINT)
    wait_for(lambda: pid_gone(pid), what="the daemon to exit")
    assert not pid_file.exists()


def test_snapshot_keeps_the_image_byte_identical(fde: Runner, tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    images = []
    for name in ("a.qcow2", "b.vmdk"):
        img = tmp_path / name
        fmt = name.split(".")[1]
        qemu_img("create", "-q", "-f", fmt, str(img), "16M")
        qemu_io(fmt, img, "write -P 0x61 0 1M")
        images.append(img)
    before = {img: sha256(img) for img in images}
    pid_file = tmp_path / "fde.pid"
    env_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmpdir)
    try:
        result = fde.run("-s", "-dp", str(pid_file), *map(str, images))
    finally:
        if env_tmp is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = env_tmp
    assert result.returncode == 0, result.stderr
    fde.track_pid(int(pid_file.read_text()))
    for img in images:
        with open(img, "r+b") as f:
            assert f.read(4) == b"aaaa"
            f.seek(0)
            f.write(b"\x00" * 4 * MiB)
            os.fsync(f.fileno())
            f.seek(0)
            assert f.read(4) == b"\0\0\0\0", "writes are visible through the export"
    assert list(tmpdir.iterdir()) == [], "the overlay is unlinked as soon as QEMU holds it"
    stop(fde, pid_file)
    for img in images:
        assert sha256(img) == before[img]
        assert not is_mounted(img)


def _make_luks(path: Path, *options: str) -> None:
    # The PBKDF benchmark fails now and then here ("Unable to get accurate CPU usage").
    for _ in range(5):
        out = subprocess.run(
            ["qemu-img", "create", "-q", *SECRET, *options, str(path), "16M"],
            capture_output=True,
            text=True,
        )
        if out.returncode == 0:
            return
    pytest.fail(out.stderr)


def _luks_io(fmt: str, path: Path, command: str) -> None:
    key = "key-secret" if fmt == "luks" else "encrypt.key-secret"
    out = subprocess.run(
        [
            "qemu-io",
            *SECRET,
            "--image-opts",
            "-c",
            command,
            f"driver={fmt},file.filename={path},{key}=sec0",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "fail" not in out.stdout.lower(), out.stdout + out.stderr


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("luks", ["-f", "luks", "-o", "key-secret=sec0,iter-time=10,hash-alg=sha512"]),
        (
            "qcow2",
            [
                "-f",
                "qcow2",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,"
                "encrypt.iter-time=10,encrypt.hash-alg=sha512",
            ],
        ),
    ],
)
def test_luks(fde: Runner, tmp_path: Path, fmt: str, options: list[str]) -> None:
    img = tmp_path / f"secret.{fmt}"
    _make_luks(img, *options)
    _luks_io(fmt, img, "write -P 0x7e 1M 64k")
    good = tmp_path / "pass"
    good.write_text("correct horse\n")
    bad = tmp_path / "wrong"
    bad.write_text("battery staple\n")

    refused = fde.run("--passphrase-file", str(bad), str(img))
    assert refused.returncode != 0
    assert str(img) in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, (
        refused.stderr
    )
    assert not is_mounted(img)

    no_key = fde.run(str(img))
    assert no_key.returncode != 0 and "passphrase" in no_key.stderr

    proc = fde.start_live("--passphrase-file", str(good), str(img))
    with open(img, "r+b") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\x7e" * 65536
        f.seek(2 * MiB)
        f.write(b"\x5f" * 4096)
    fde.revert(proc)
    _luks_io(fmt, img, "read -P 0x5f 2M 4k")


def test_legacy_aes_qcow2_is_read_with_its_passphrase_and_never_written(
    fde: Runner, tmp_path: Path
) -> None:
    """qcow2's old AES-CBC: QEMU opens it given the format (not LUKS), and cannot tell a wrong
    passphrase, so a write under one would store garbage: exported read-only, with a note."""
    img = tmp_path / "old.qcow2"
    _make_luks(img, "-f", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=sec0")
    _luks_io("qcow2", img, "write -P 0x7e 1M 64k")
    before = sha256(img)
    good = tmp_path / "pass"
    good.write_text("correct horse\n")
    proc = fde.start_live("--passphrase-file", str(good), str(img))
    with open(img, "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\x7e" * 65536
    with pytest.raises(OSError), open(img, "r+b") as f:
        f.write(b"\x5f" * 4096)
        f.flush()
        os.fsync(f.fileno())
    err = fde.revert(proc)
    assert "legacy AES" in err and "read-only" in err, err
    assert sha256(img) == before


def test_secret_stays_out_of_verbose_output(fde: Runner, tmp_path: Path) -> None:
    img = tmp_path / "secret.luks"
    _make_luks(img, "-f", "luks", "-o", "key-secret=sec0,iter-time=10,hash-alg=sha512")
    good = tmp_path / "pass"
    good.write_text("correct horse\n")
    proc = fde.start_live("-v", "--passphrase-file", str(good), str(img))
    try:
        # Not in any process's command line or environment (the daemon reads a pipe).
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            for what in ("cmdline", "environ"):
                try:
                    with open(f"/proc/{pid}/{what}", "rb") as f:
                        assert b"correct horse" not in f.read(), f"in /proc/{pid}/{what}"
                except OSError:
                    pass
    finally:
        err = fde.revert(proc)
    log = err
    assert '"qom-type":"secret"' in log and "/dev/fd/" in log and "correct horse" not in log


def test_load_internal_snapshot(fde: Runner, tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "snap.qcow2", "16M", (0x11, "0", "1M"))
    qemu_img("snapshot", "-c", "before", str(img))
    qemu_io("qcow2", img, "write -P 0x22 0 1M")
    before = sha256(img)

    proc = fde.start_live("-l", "before", str(img))
    assert image_format(img) == "raw"
    with open(img, "rb") as f:
        assert f.read(MiB) == b"\x11" * MiB
    with pytest.raises(OSError), open(img, "r+b") as f:
        f.write(b"x")
    fde.revert(proc)
    assert not is_mounted(img) and sha256(img) == before
    _assert_no_qemu_nbd_for(img)

    missing = fde.run("-l", "nope", str(img))
    assert missing.returncode != 0 and "nope" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    _assert_no_qemu_nbd_for(img)


def _assert_no_qemu_nbd_for(img: Path) -> None:
    import psutil

    def gone() -> bool:
        for p in psutil.process_iter(["name", "cmdline", "status"]):
            mine = p.info["name"] == "qemu-nbd" and str(img) in (p.info["cmdline"] or [])
            if mine and p.info["status"] != psutil.STATUS_ZOMBIE:
                return False
        return True

    wait_for(gone, what="qemu-nbd to exit")


def _allocated(img: Path, offset: int, length: int) -> bool:
    extents = json.loads(qemu_img("map", "--output=json", str(img)))
    return any(
        e["data"] and e["start"] < offset + length and offset < e["start"] + e["length"]
        for e in extents
    )


@pytest.mark.parametrize("discard", ["unmap", "ignore"])
def test_discard_through_the_export(fde: Runner, tmp_path: Path, discard: str) -> None:
    img = make_qcow2(tmp_path / "trim.qcow2", "16M", (0x44, "2M", "2M"))
    assert _allocated(img, 2 * MiB, 2 * MiB)
    proc = fde.start_live("--discard", discard, str(img))
    # Writes first (direct and buffered): the hole guard must stay armed through them.
    fd = os.open(img, os.O_WRONLY | os.O_DIRECT)
    try:
        block = mmap.mmap(-1, 64 * 1024)
        block.write(b"\x55" * len(block))
        os.pwrite(fd, block, 8 * MiB)
    finally:
        os.close(fd)
    with open(img, "r+b") as f:
        f.seek(12 * MiB)
        f.write(b"\x66" * 4096)
        f.flush()
        os.fsync(f.fileno())
    punched = subprocess.run(
        ["fallocate", "-p", "-o", str(2 * MiB), "-l", str(2 * MiB), str(img)],
        capture_output=True,
        text=True,
    )
    with open(img, "rb") as f:
        f.seek(2 * MiB)
        served = f.read(4096)
    fde.revert(proc)
    if versions.punch_hole_may_keep_data(qemu_version()):
        # Before 8.0 a punched hole would be an advisory discard that may keep the data while
        # succeeding: the tool makes it fail instead (EOPNOTSUPP), and the data is untouched.
        assert punched.returncode != 0, "a punched hole must fail, not keep data silently"
        assert served == b"\x44" * 4096
        assert _allocated(img, 2 * MiB, 2 * MiB)
    else:
        # From 8.0 it writes zeroes (unmapping them where discards are allowed).
        assert punched.returncode == 0, punched.stderr
        assert served == b"\0" * 4096
        if discard == "unmap":
            assert not _allocated(img, 2 * MiB, 2 * MiB)
    qemu_img("check", str(img))


def test_read_only_format_is_exported_read_only_with_a_note(fde: Runner, tmp_path: Path) -> None:
    img = tmp_path / "old.bochs"
    img.write_bytes(bochs(disk=4 * MiB))
    proc = fde.start_live(str(img))
    assert img.stat().st_size == 4 * MiB
    with pytest.raises(OSError), open(img, "r+b") as f:
        f.write(b"x")
    err = fde.revert(proc)
    assert "read-only" in err


@pytest.mark.parametrize("cache", ["none", "writeback", "writethrough", "directsync", "unsafe"])
def test_cache_modes(fde: Runner, tmp_path: Path, cache: str) -> None:
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    aio = ["--aio", "native"] if cache in ("none", "directsync") else []
    proc = fde.start_live("--cache", cache, *aio, "--detect-zeroes", "unmap", str(img))
    with open(img, "r+b") as f:
        f.write(b"\x09" * 65536)
    fde.revert(proc)
    qemu_io("qcow2", img, "read -P 0x09 0 64k")


def test_io_uring_near_a_vmdk_only_where_qemu_opens_it(fde: Runner, tmp_path: Path) -> None:
    """7.2 and 10.0.2 hang for good opening a vmdk's extents with io_uring (the daemon ignores
    SIGTERM): the command line refuses the combination there, and allows it where QEMU opens it."""
    vmdk = tmp_path / "d.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(vmdk), "16M")
    if versions.io_uring_short_read_may_hang(qemu_version()):
        refused = fde.run("-r", "--aio", "io_uring", str(vmdk))
        assert refused.returncode == 2 and "vmdk" in refused.stderr, refused.stderr
    else:
        fde.revert(fde.start_live("-r", "--aio", "io_uring", str(vmdk)))
    assert not is_mounted(vmdk)


def test_the_end_of_an_odd_sized_file_is_read(fde: Runner, tmp_path: Path) -> None:
    """A raw file whose size is not a multiple of 512, read-only (where io_uring is the default):
    7.2 and 10.0.2 never complete the short read of its end through io_uring, and the reader,
    the mount and the daemon hang for good."""
    img = tmp_path / "odd.raw"
    data = os.urandom(3458752)
    img.write_bytes(data)
    proc = fde.start_live("-r", str(img))
    reader = subprocess.Popen(["dd", f"if={img}", "of=/dev/null", "bs=64k", "status=none"])
    try:
        assert reader.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        for pid in children(proc.pid):  # the hung daemon ignores SIGTERM; this frees the reader
            os.kill(pid, signal.SIGKILL)
        reader.wait()
        pytest.fail("reading the end of the export hung")
    with open(img, "rb") as f:
        seen = f.read()
    # QEMU counts a disk in whole sectors: the last one is filled up with zeroes.
    assert seen == data + bytes(-len(data) % 512)
    fde.revert(proc)
    assert not is_mounted(img)
    assert img.read_bytes() == data


def test_ctrl_c_ends_a_setup_qemu_never_answers(fde: Runner, tmp_path: Path) -> None:
    """A backing file on an NBD server that takes the connection and never says a word: QEMU
    waits for its greeting for good, before anything is mounted.  Ctrl-C must still end the
    run, and leave neither the daemon nor a mount."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fde_socket = tmp_path / "silent.sock"
    server.bind(str(fde_socket))
    server.listen(1)
    img = tmp_path / "a.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-F", "raw",
        "-b", f"nbd+unix:///?socket={fde_socket}", str(img), "16M",
    )  # fmt: skip
    try:
        proc = fde.start("-r", "--backing", "any", str(img))
        server.settimeout(30)
        connection, _ = server.accept()  # QEMU is now waiting for the greeting
        daemons = children(proc.pid)
        assert daemons, "no qemu-storage-daemon child while it negotiates"
        fde.track_pid(daemons[0])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) != 0
        assert proc.stderr is not None
        assert "interrupted by SIGINT" in proc.stderr.read()
        wait_for(lambda: pid_gone(daemons[0]), what="qemu-storage-daemon to be gone")
        connection.close()
    finally:
        server.close()
    assert not is_mounted(img)
