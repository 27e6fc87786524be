"""Images made by their own tools, not by qemu-img: QEMU's sample images (scripts/samples-fetch).

Hyper-V, Disk2VHD and Virtual PC made the vhd and vhdx files, VMware the streamOptimized vmdk,
Parallels the parallels images, macOS the dmg; two were made by a fuzzer.  Each is exported the
way a user would: read-only, its bytes must equal ``qemu-img convert -O raw``; by default, a
write through ``dd`` must either land (and the image still open, ``qemu-img check`` no worse) or
be refused with the image left byte-identical; with ``--overlay FILE``, writes go to FILE only.
"""

from __future__ import annotations

import bz2
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

import pytest

from tests.helpers.host import IN_CI
from tests.helpers.images import sha256
from tests.helpers.runner import Runner

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 1 << 20
#: Disks up to this size are compared whole; larger ones in the ranges qemu-img map says hold
#: data, and at a few places between them.
WHOLE = 300 << 20


class Sample(NamedTuple):
    format: str
    #: Why the default export is read-only ("" where a write must land).
    read_only: str = ""


SAMPLES = {
    "d2v-zerofilled.vhd": Sample("vpc"),
    "hyperv2012r2-dynamic.vhd": Sample("vpc"),
    "virtualpc-dynamic.vhd": Sample("vpc"),
    "test-disk2vhd.vhdx": Sample("vhdx"),
    "iotest-dynamic-1G.vhdx": Sample("vhdx"),
    # Its log is replayed by QEMU only when it opens it writable: -r is refused.
    "iotest-dirtylog-10G-4M.vhdx": Sample("vhdx"),
    "iotest-version3.vmdk": Sample("vmdk", "streamOptimized"),
    "parallels-v1": Sample("parallels"),
    "parallels-v2": Sample("parallels"),
    "parallels-with-bitmap": Sample("parallels", "format extension"),
    "simple-dmg.dmg": Sample("dmg", "read-only"),
    "simple-pattern.cloop": Sample("cloop", "read-only"),
    "empty.bochs": Sample("bochs", "read-only"),
    "grub_mbr.raw": Sample("raw"),
}
FUZZED = ("afl5.img", "afl9.vmdk")
DIRTY_LOG = "iotest-dirtylog-10G-4M.vhdx"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The samples, decompressed once per session (sparse) into a folder tests copy from."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "samples-fetch")], capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        message = f"scripts/samples-fetch failed: {result.stderr.strip()}"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    source = ROOT / ".cache" / "samples" / "images"
    folder = tmp_path_factory.mktemp("samples")
    for packed in source.glob("*.bz2"):
        with bz2.open(packed) as src, open(folder / packed.stem, "wb") as dst:
            _copy_sparse(src, dst)
    return folder


def _copy_sparse(src: IO[bytes], dst: IO[bytes]) -> None:
    size = 0
    while chunk := src.read(CHUNK):
        if chunk.count(0) == len(chunk):
            dst.seek(len(chunk), os.SEEK_CUR)
        else:
            dst.write(chunk)
        size += len(chunk)
    dst.truncate(size)


@pytest.fixture
def sample(corpus: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A private copy of the sample named by the test's parameter."""
    name: str = request.param
    copy = tmp_path / name
    with open(corpus / name, "rb") as src, open(copy, "wb") as dst:
        _copy_sparse(src, dst)
    yield copy


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=300)


def _data_ranges(image: Path, fmt: str, size: int) -> list[tuple[int, int]]:
    """Where the virtual disk holds data (qemu-img map), and a few places between."""
    if size <= WHOLE:
        return [(0, size)]
    segments = json.loads(_run("qemu-img", "map", "--output=json", "-f", fmt, str(image)).stdout)
    ranges = [(s["start"], s["length"]) for s in segments if s["data"]]
    ranges += [(size * i // 8 // 4096 * 4096, 4096) for i in range(8)]
    ranges.append((size - 4096, 4096))
    return ranges


def _same_bytes(export: Path, expected: Path, ranges: list[tuple[int, int]]) -> None:
    with open(export, "rb") as a, open(expected, "rb") as b:
        for start, length in ranges:
            at, end = start, start + length
            while at < end:
                n = min(CHUNK, end - at)
                got, want = os.pread(a.fileno(), n, at), os.pread(b.fileno(), n, at)
                assert got == want, f"{export}: bytes differ from qemu-img convert at {at}"
                at += n


def _one_line_error(result: subprocess.CompletedProcess[str], path: Path) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and "Traceback" not in result.stderr
    return lines[0]


def test_every_sample_is_tested(corpus: Path) -> None:
    found = {p.name for p in corpus.iterdir()}
    assert found == set(SAMPLES) | set(FUZZED), "a sample image without an expectation here"


@pytest.mark.parametrize("sample", sorted(SAMPLES), indirect=True)
def test_read_only_equals_qemu_img_convert(fde: Runner, sample: Path) -> None:
    fmt = SAMPLES[sample.name].format
    before = sha256(sample)
    if sample.name == DIRTY_LOG:
        line = _one_line_error(fde.run("-r", str(sample)), sample)
        assert "log" in line
        assert sha256(sample) == before
        return
    expected = sample.with_suffix(".expected")
    _run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(sample), str(expected))
    size = expected.stat().st_size
    ranges = _data_ranges(sample, fmt, size)
    proc = fde.start_live("-r", str(sample))
    try:
        assert sample.stat().st_size == size
        _same_bytes(sample, expected, ranges)
    finally:
        fde.revert(proc)
    assert sha256(sample) == before


def _check_status(image: Path, fmt: str) -> int:
    """qemu-img check's exit status: 0 clean, 63 no checks for this format, others worse."""
    return _run("qemu-img", "check", "-f", fmt, str(image), check=False).returncode


def _dd(pattern: Path, image: Path, offset: int, length: int) -> subprocess.CompletedProcess[str]:
    return _run(
        "dd",
        f"if={pattern}",
        f"of={image}",
        f"bs={length}",
        f"seek={offset // length}",
        "count=1",
        "conv=notrunc,fsync",
        check=False,
    )


def _write_place(image: Path) -> tuple[int, int]:
    size = image.stat().st_size
    length = min(4096, size)
    return (1 << 20 if size >= (1 << 20) + length else 0), length


@pytest.mark.parametrize("sample", sorted(SAMPLES), indirect=True)
def test_default_write_lands_or_leaves_the_image_untouched(
    fde: Runner, sample: Path, tmp_path: Path
) -> None:
    expect = SAMPLES[sample.name]
    before = sha256(sample)
    status = _check_status(sample, expect.format)
    pattern = tmp_path / "pattern"
    pattern.write_bytes(b"\x5a" * 4096)
    proc = fde.start_live(str(sample))
    try:
        offset, length = _write_place(sample)
        written = _dd(pattern, sample, offset, length)
    finally:
        err = fde.revert(proc)
    info = _run("qemu-img", "info", "-f", expect.format, str(sample), check=False)
    assert info.returncode == 0, f"the image no longer opens: {info.stderr}"
    if expect.read_only:
        assert written.returncode != 0, "a write reached an image that must stay read-only"
        assert expect.read_only in err and "exporting read-only" in err, err
        assert sha256(sample) == before
        return
    assert written.returncode == 0, written.stderr
    after = _check_status(sample, expect.format)
    assert after in (0, status), f"qemu-img check: {status} before, {after} after"
    read = _run(
        "qemu-io", "-r", "-f", expect.format, "-c", f"read -P 0x5a {offset} {length}", str(sample)
    )
    assert "Pattern verification failed" not in read.stdout, read.stdout


@pytest.mark.parametrize("sample", FUZZED, indirect=True)
def test_fuzzed_image_is_one_line_of_error(fde: Runner, sample: Path) -> None:
    before = sha256(sample)
    _one_line_error(fde.run(str(sample)), sample)
    _one_line_error(fde.run("-r", str(sample)), sample)
    assert sha256(sample) == before


def _qemu_io_reads(image: Path, fmt: str, byte: int, offset: int) -> bool:
    out = _run("qemu-io", "-r", "-f", fmt, "-c", f"read -P {byte} {offset} 4096", str(image))
    return "Pattern verification failed" not in out.stdout


@pytest.mark.parametrize(
    "sample", ["iotest-version3.vmdk", "hyperv2012r2-dynamic.vhd"], indirect=True
)
def test_overlay_keeps_writes_across_runs(fde: Runner, sample: Path, tmp_path: Path) -> None:
    fmt = SAMPLES[sample.name].format
    before = sha256(sample)
    overlay = tmp_path / "writes.qcow2"
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"\x11" * 4096)
    second.write_bytes(b"\x22" * 4096)
    proc = fde.start_live("--overlay", str(overlay), str(sample))
    try:
        assert _dd(first, sample, 0, 4096).returncode == 0
    finally:
        fde.revert(proc)
    assert sha256(sample) == before
    info = json.loads(_run("qemu-img", "info", "--output=json", str(overlay)).stdout)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(sample)
    assert info["backing-filename-format"] == fmt

    proc = fde.start_live("--overlay", str(overlay), str(sample))
    try:
        with open(sample, "rb") as f:
            assert f.read(4096) == b"\x11" * 4096, "the first run's write is not in the overlay"
        assert _dd(second, sample, 1 << 20, 4096).returncode == 0
    finally:
        fde.revert(proc)
    assert sha256(sample) == before
    assert _qemu_io_reads(overlay, "qcow2", 0x11, 0)
    assert _qemu_io_reads(overlay, "qcow2", 0x22, 1 << 20)
    if not SAMPLES[sample.name].read_only:
        _run("qemu-img", "commit", "-f", "qcow2", str(overlay))
        assert _qemu_io_reads(sample, fmt, 0x11, 0)
        assert _qemu_io_reads(sample, fmt, 0x22, 1 << 20)


@pytest.mark.parametrize("sample", ["parallels-v2"], indirect=True)
def test_overlay_of_another_image_is_refused(fde: Runner, sample: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(other), "2M")
    overlay = tmp_path / "writes.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(other), str(overlay))
    before, overlay_before = sha256(sample), sha256(overlay)
    line = _one_line_error(fde.run("--overlay", str(overlay), str(sample)), overlay)
    assert "not of" in line
    assert (sha256(sample), sha256(overlay)) == (before, overlay_before)


@pytest.mark.parametrize("sample", ["parallels-v2"], indirect=True)
def test_overlay_on_the_mount_point_is_refused(fde: Runner, sample: Path, tmp_path: Path) -> None:
    """Else the mount point's removal on revert would take the overlay and its writes along."""
    view = tmp_path / "view.raw"
    before = sha256(sample)
    line = _one_line_error(fde.run("-m", str(view), "--overlay", str(view), str(sample)), view)
    assert "different files" in line
    assert sha256(sample) == before and not view.exists()


@pytest.mark.parametrize("sample", ["parallels-v2"], indirect=True)
def test_overlay_made_for_a_failed_export_is_removed(
    fde: Runner, sample: Path, tmp_path: Path
) -> None:
    overlay = tmp_path / "writes.qcow2"
    # QEMU cannot bind a socket in a folder that does not exist: the export fails once the
    # overlay has been made, and the overlay goes with it.
    socket = tmp_path / "no-such-folder" / "nbd.sock"
    result = fde.run("--overlay", str(overlay), "--nbd-socket", str(socket), str(sample))
    _one_line_error(result, socket)
    assert not overlay.exists()


@pytest.mark.parametrize("sample", ["simple-pattern.cloop"], indirect=True)
def test_a_broken_image_of_a_read_only_driver_is_one_line(fde: Runner, sample: Path) -> None:
    """Asked writable, a cloop is exported read-only with a note; but QEMU refuses this one (an
    offset out of order): the refusal alone is said, not the note before it."""
    with open(sample, "r+b") as f:
        f.seek(253)
        f.write(b"\x08")
    before = sha256(sample)
    line = _one_line_error(fde.run(str(sample)), sample)
    assert "exporting read-only" not in line
    assert sha256(sample) == before
