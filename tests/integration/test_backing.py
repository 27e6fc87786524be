"""References inside an image: backing files, external data files, vmdk extents.

By default (--backing=safe) the tool follows a backing chain only through plain paths to regular
files and opens each file itself, so QEMU never follows a name we have not looked at; a
``json:`` specification, a protocol prefix, a device, a directory, and data files or vmdk extents
outside the image's folder are refused with a message that says "backing" (or names the data
file or extent) and shows the reference.  --backing=none exports the top image alone;
--backing=any lets QEMU follow whatever the image names.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers.checks import assert_all_clean, one_line
from tests.helpers.images import make_qcow2, qemu_img, qemu_io, sha256
from tests.helpers.runner import Runner
from tests.helpers.units import KiB, MiB

BACKING_HINT = "--backing=none exports the image alone"


def overlay(path: Path, backing: str, backing_fmt: str, size: str = "16M") -> Path:
    """A qcow2 naming ``backing`` exactly as given (-u: not opened, not checked)."""
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", backing_fmt, str(path), size)
    return path


def refused(fde: Runner, *args: str, image: Path, holder: Path | None = None) -> str:
    """Refused in one line that names ``holder``: the file holding the bad reference (the image
    itself, or the file of its chain whose header names it)."""
    digest = sha256(image)
    result = fde.run(*args, str(image))
    assert result.returncode != 0, result.stdout
    line = one_line(result.stderr)
    assert line.startswith(f"fuse-disk-export: {holder or image}: "), line
    assert_all_clean(fde.root)
    assert sha256(image) == digest
    return line


def serve(fde: Runner, *args: str) -> tuple[str, str]:
    """Export, let ``check`` run via the caller, then revert: returns (stdout, stderr)."""
    proc = fde.start_live(*args)
    err = fde.revert(proc)
    assert proc.stdout is not None
    return proc.stdout.read(), err


# --------------------------------------------------------------------------------------------
# Unsafe backing references are refused, and the policy switches work


JSON_BACKING = "json:" + json.dumps(
    {"driver": "raw", "file": {"driver": "file", "filename": "{base}"}}
)

UNSAFE = {
    "json": (JSON_BACKING, "is a json: specification"),
    "nbd-uri": ("nbd://localhost:10809/x", "has a protocol prefix"),
    "nbd": ("nbd:localhost:10809", "has a protocol prefix"),
    "http": ("http://example.com/disk.img", "has a protocol prefix"),
    "ssh": ("ssh://host/disk.img", "has a protocol prefix"),
    "file-prefix": ("file:base.raw", "has a protocol prefix"),
    "device": ("/dev/null", "is not a regular file"),
    "directory": ("folder", "is a directory"),
    "missing": ("gone.raw", "no such file"),
}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\x3c" * MiB + bytes(15 * MiB))
    (tmp_path / "folder").mkdir()
    return raw


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_unsafe_backing_is_refused(fde: Runner, tmp_path: Path, base: Path, kind: str) -> None:
    reference, reason = UNSAFE[kind]
    reference = reference.replace("{base}", str(base))
    top = overlay(tmp_path / "top.qcow2", reference, "raw")
    line = refused(fde, "-r", image=top)
    assert "backing" in line and repr(reference) in line and reason in line, line
    if kind not in ("device", "directory", "missing"):
        assert BACKING_HINT in line


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_backing_none_exports_the_top_alone(
    fde: Runner, tmp_path: Path, base: Path, kind: str
) -> None:
    reference = UNSAFE[kind][0].replace("{base}", str(base))
    top = make_qcow2(tmp_path / "top.qcow2", "16M", (0x77, "4M", "64k"))
    qemu_img("rebase", "-u", "-b", reference, "-F", "raw", str(top))
    proc = fde.start_live("-r", "--backing=none", str(top))
    with open(top, "rb") as f:
        assert f.read(4096) == bytes(4096)  # the base's 0x3c is not seen
        f.seek(4 * MiB)
        assert f.read(65536) == b"\x77" * 65536
    fde.revert(proc)
    assert_all_clean(tmp_path)


def test_backing_any_lets_qemu_follow_json(fde: Runner, tmp_path: Path, base: Path) -> None:
    top = overlay(tmp_path / "top.qcow2", JSON_BACKING.replace("{base}", str(base)), "raw")
    proc = fde.start_live("-r", "--backing=any", str(top))
    with open(top, "rb") as f:
        assert f.read(4096) == b"\x3c" * 4096  # through the json: backing
    fde.revert(proc)
    assert_all_clean(tmp_path)


def test_backing_chain_loop(fde: Runner, tmp_path: Path) -> None:
    a = tmp_path / "a.qcow2"
    overlay(a, "b.qcow2", "qcow2")
    overlay(tmp_path / "b.qcow2", "a.qcow2", "qcow2")
    line = refused(fde, "-r", image=a, holder=tmp_path / "b.qcow2")
    assert "backing file 'a.qcow2' makes the chain loop" in line, line


def test_header_forced_raw_format_is_not_walked(fde: Runner, tmp_path: Path) -> None:
    """A backing file the header says is raw is opened as raw: what its own content names is
    never followed, so it is no reason to refuse."""
    lower = overlay(tmp_path / "lower.qcow2", "nbd://localhost/x", "raw")
    top = overlay(tmp_path / "top.qcow2", lower.name, "raw")
    proc = fde.start_live("-r", "-v", str(top))
    with open(top, "rb") as f:
        assert f.read(4) == b"QFI\xfb"  # lower.qcow2's own bytes, as raw
    err = fde.revert(proc)
    assert f"backing file 'lower.qcow2' -> {lower} (raw)" in err
    assert_all_clean(tmp_path)


def test_relative_backing_is_relative_to_the_image(fde: Runner, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    make_qcow2(images / "base.qcow2", "16M", (0x21, "0", "64k"))
    top = overlay(images / "top.qcow2", "base.qcow2", "qcow2")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = fde.start_live("-r", "../images/top.qcow2", cwd=elsewhere)
    with open(top, "rb") as f:
        assert f.read(65536) == b"\x21" * 65536
    fde.revert(proc)
    assert_all_clean(tmp_path)


# --------------------------------------------------------------------------------------------
# A real chain: the merged view, -v, and writes that land in the top only


def test_merged_view_and_writes_land_in_the_top(fde: Runner, tmp_path: Path) -> None:
    base = make_qcow2(tmp_path / "base.qcow2", "16M", (0xA1, "0", "1M"), (0xB2, "2M", "1M"))
    mid = overlay(tmp_path / "mid.qcow2", "base.qcow2", "qcow2")
    qemu_io("qcow2", mid, "write -P 0xc3 2M 512k")  # hides half of base's 0xb2
    top = overlay(tmp_path / "top.qcow2", "mid.qcow2", "qcow2")
    qemu_io("qcow2", top, "write -P 0xd4 4M 64k")
    below = {p: sha256(p) for p in (base, mid)}

    proc = fde.start_live("-v", str(top))
    with open(top, "r+b") as f:
        view = f.read(8 * MiB)
        f.seek(6 * MiB)
        f.write(b"\xe5" * 65536)
        f.flush()
        os.fsync(f.fileno())
    err = fde.revert(proc)
    log = err

    expected = bytearray(8 * MiB)
    expected[0 : 1 * MiB] = b"\xa1" * MiB
    expected[2 * MiB : 3 * MiB] = b"\xb2" * MiB
    expected[2 * MiB : 2 * MiB + 512 * KiB] = b"\xc3" * (512 * KiB)
    expected[4 * MiB : 4 * MiB + 65536] = b"\xd4" * 65536
    assert view == bytes(expected), "the merged view is wrong"
    # -v shows the whole chain, top first.
    assert f"{top}: backing file 'mid.qcow2' -> {mid} (qcow2)" in log, log
    assert f"{mid}: backing file 'base.qcow2' -> {base} (qcow2)" in log, log
    # The write is in the top only; the files below are untouched.
    assert {p: sha256(p) for p in (base, mid)} == below
    qemu_io("qcow2", top, "read -P 0xe5 6M 64k")
    qemu_io("qcow2", mid, "read -P 0 6M 64k")
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(top)],
        capture_output=True,
        text=True,
        check=True,
    )
    top_extents = [e for e in json.loads(out.stdout) if e["depth"] == 0 and e["data"]]
    assert {(e["start"], e["length"]) for e in top_extents} == {
        (4 * MiB, 65536),
        (6 * MiB, 65536),
    }
    assert_all_clean(tmp_path)


# --------------------------------------------------------------------------------------------
# External data files


def test_data_file_outside_the_folder_is_refused(fde: Runner, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    data = tmp_path / "other" / "data.raw"
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(img), "16M")
    line = refused(fde, image=img)
    assert f"external data file {str(data)!r} lies outside the image's folder" in line, line
    # Not a backing file: --backing=none checks it just the same; --backing=any follows it.
    refused(fde, "--backing=none", image=img)
    proc = fde.start_live("--backing=any", str(img))
    fde.revert(proc)
    assert_all_clean(tmp_path)


def test_data_file_beside_the_image_holds_the_writes(fde: Runner, tmp_path: Path) -> None:
    img = tmp_path / "disk.qcow2"
    data = tmp_path / "disk.data"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(img), "16M")
    proc = fde.start_live(str(img))
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(b"\x9e" * 65536)
        f.flush()
        os.fsync(f.fileno())
    fde.revert(proc)
    assert_all_clean(tmp_path)
    with open(data, "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\x9e" * 65536


def test_data_file_that_is_a_device(fde: Runner, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    img = tmp_path / "disk.qcow2"
    data = tmp_path / "disk.data"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(img), "16M")
    data.unlink()
    os.mknod(data, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    line = refused(fde, image=img)
    assert f"external data file {str(data)!r}" in line and "not a regular file" in line, line


# --------------------------------------------------------------------------------------------
# vmdk descriptors: every extent is a file QEMU opens


DESCRIPTOR = """# Disk DescriptorFile
version=1
CID=12345678
parentCID=ffffffff
createType="{create_type}"

RW 32768 {kind} "{extent}" 0
"""


def descriptor(
    path: Path, extent: str, create_type: str = "monolithicFlat", kind: str = "FLAT"
) -> Path:
    text = DESCRIPTOR.format(extent=extent, create_type=create_type, kind=kind)
    path.write_text(text if kind == "FLAT" else text.replace(" 0\n", "\n"))
    return path


@pytest.mark.parametrize(
    "extent",
    ["/dev/zero", "../outside/secret.raw", "link-out.raw"],
    ids=["device", "parent-folder", "symlink-out"],
)
# A descriptor whose type QEMU opens read-only is checked all the same: it reads the extent.
@pytest.mark.parametrize("create_type", ["monolithicFlat", "seSparse"])
def test_vmdk_extent_outside_the_folder_is_refused(
    fde: Runner, tmp_path: Path, extent: str, create_type: str
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.raw"
    secret.write_bytes(b"SECRET!!" * (2 * MiB))
    (images / "link-out.raw").symlink_to(secret)
    vmdk = descriptor(images / "disk.vmdk", extent, create_type)
    line = refused(fde, "-r", image=vmdk)
    assert f"vmdk extent {extent!r} lies outside the image's folder" in line, line
    if extent != "/dev/zero" and create_type == "monolithicFlat":
        # What the refusal protects from: with --backing=any, QEMU reads the file named.
        proc = fde.start_live("-r", "--backing=any", str(vmdk))
        with open(vmdk, "rb") as f:
            assert f.read(8) == b"SECRET!!"
        fde.revert(proc)
        assert_all_clean(tmp_path)


@pytest.mark.parametrize("backing", ["safe", "any"])
def test_a_descriptor_that_is_its_own_extent_is_refused(
    fde: Runner, tmp_path: Path, backing: str
) -> None:
    vmdk = descriptor(tmp_path / "self.vmdk", "self.vmdk")
    line = refused(fde, f"--backing={backing}", image=vmdk)
    assert "its extent 'self.vmdk' is the descriptor itself" in line, line


@pytest.mark.parametrize(
    "subformat", ["monolithicFlat", "twoGbMaxExtentFlat", "twoGbMaxExtentSparse"]
)
def test_vmdk_with_extents_beside_it_is_exported(
    fde: Runner, tmp_path: Path, subformat: str
) -> None:
    vmdk = tmp_path / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(vmdk), "16M")
    qemu_io("vmdk", vmdk, "write -P 0x5c 1M 64k")
    proc = fde.start_live(str(vmdk))
    with open(vmdk, "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\x5c" * 65536
    fde.revert(proc)
    assert_all_clean(tmp_path)


@pytest.mark.parametrize("backing", ["safe", "any"])
def test_a_stream_optimized_extent_is_never_written(
    fde: Runner, tmp_path: Path, backing: str
) -> None:
    """QEMU cannot write a streamOptimized extent safely, also when a descriptor names it and
    whatever the backing policy: the export is read-only, the extent untouched."""
    extent = tmp_path / "disk-s001.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", str(extent), "16M")
    vmdk = descriptor(tmp_path / "disk.vmdk", extent.name, "twoGbMaxExtentSparse", "SPARSE")
    before = sha256(extent)
    proc = fde.start_live(f"--backing={backing}", str(vmdk))
    try:
        with pytest.raises(OSError) as raised, open(vmdk, "r+b") as f:
            f.write(b"x" * 4096)
        assert raised.value.errno in (errno.EROFS, errno.EACCES)  # a read-only file
    finally:
        fde.revert(proc)
    assert sha256(extent) == before
    assert_all_clean(tmp_path)


def test_vmdk_backing_with_an_extent_outside(fde: Runner, tmp_path: Path) -> None:
    """A backing file is checked like the top: its extents too."""
    descriptor(tmp_path / "base.vmdk", "/dev/zero")
    top = overlay(tmp_path / "top.qcow2", "base.vmdk", "vmdk", size="16M")
    line = refused(fde, "-r", image=tmp_path / "base.vmdk")
    assert "vmdk extent '/dev/zero'" in line
    line = refused(fde, "-r", image=top, holder=tmp_path / "base.vmdk")
    assert "vmdk extent '/dev/zero'" in line, line


@pytest.mark.parametrize("target", ["/proc/self/environ", "/sys/kernel/notes"])
def test_a_backing_file_of_the_kernel_is_refused(fde: Runner, tmp_path: Path, target: str) -> None:
    """A regular file, but the kernel's: /proc/self/environ would show the daemon's (our)
    environment through the export."""
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", target, "-F", "raw", str(top), "1M")
    line = refused(fde, "-r", image=top)
    assert target in line and "filesystem, not an image" in line, line


@pytest.mark.parametrize("how", ["absolute", "relative", "symlink beside", "probed"])
def test_a_raw_backing_file_outside_the_folder_is_refused(
    fde: Runner, tmp_path: Path, how: str
) -> None:
    """A raw backing file is any file's bytes: a hostile image naming /etc/shadow would show it
    to whoever reads the export.  Confined to the image's folder, as data files and extents are."""
    secret = tmp_path / "etc" / "shadow"
    secret.parent.mkdir()
    secret.write_bytes(b"root:$y$secret:19000:0:99999:7:::\n" * 64)
    images = tmp_path / "images"
    images.mkdir()
    ref = {"absolute": str(secret), "relative": "../etc/shadow", "probed": str(secret)}.get(
        how, "shadow"
    )
    if how == "symlink beside":
        (images / "shadow").symlink_to(secret)
    top = images / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", ref, "-F", "raw", str(top), "1M")
    if how == "probed":  # no backing format in the header: an unknown extension instead
        header = top.read_bytes()[:4096]
        at = header.index(b"\xe2\x79\x2a\xca")
        with open(top, "r+b") as f:
            f.seek(at)
            f.write(b"\x12\x34\x56\x78")
        assert "backing file format" not in qemu_img("info", str(top))
    line = refused(fde, "-r", image=top)
    assert "is a raw file outside the image's folder" in line and "--backing=any" in line, line


def test_a_raw_backing_file_beside_the_image_is_followed(fde: Runner, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x42" * MiB)
    top = overlay(tmp_path / "top.qcow2", "base.raw", "raw", size="1M")
    proc = fde.start_live("-r", str(top))
    assert top.read_bytes()[:4096] == b"\x42" * 4096
    fde.revert(proc)
    assert_all_clean(tmp_path)


def test_a_backing_format_that_does_not_match_names_the_image(
    fde: Runner, tmp_path: Path
) -> None:
    make_qcow2(tmp_path / "base.qcow2", "16M")
    top = overlay(tmp_path / "top.qcow2", str(tmp_path / "base.qcow2"), "vmdk")
    line = refused(fde, "-r", image=top)
    assert "is a qcow2 image, but the header names it vmdk" in line, line


def test_hard_links_in_one_invocation(fde: Runner, tmp_path: Path) -> None:
    """Two names of one file: exported once writable would be twice QEMU's lock."""
    one = make_qcow2(tmp_path / "one.qcow2", "64M")
    two = tmp_path / "two.qcow2"
    os.link(one, two)
    result = fde.run(str(one), str(two))
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert f"{two}: is the same file as {one} (a hard link)" in line, line
    assert_all_clean(tmp_path)
    fde.revert(fde.start_live("-r", str(one), str(two)))
    assert_all_clean(tmp_path)


def test_an_image_and_its_backing_file_in_one_invocation(fde: Runner, tmp_path: Path) -> None:
    """Writable, the backing file is refused in one line (QEMU said "locked by another process",
    its own lock); read-only, both are exported."""
    base = make_qcow2(tmp_path / "base.qcow2", "16M", (0x3C, "0", "1M"))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    line = refused(fde, str(top), image=base)
    assert f"is the backing file of {top}" in line, line
    proc = fde.start_live("-r", str(top), str(base))
    for path in (top, base):
        with open(path, "rb") as f:
            assert f.read(4096) == b"\x3c" * 4096
    fde.revert(proc)
    assert_all_clean(tmp_path)


def test_an_exported_backing_file_is_named_by_the_image_that_uses_it(
    fde: Runner, tmp_path: Path
) -> None:
    base = make_qcow2(tmp_path / "base.qcow2", "16M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    proc = fde.start_live("-r", str(base))
    result = fde.run(str(top))
    line = one_line(result.stderr)
    assert line.startswith(f"fuse-disk-export: {top}: backing file '{base}'"), line
    assert "already a mount point" in line, line
    fde.revert(proc)
    assert_all_clean(tmp_path)
