"""detect: every format from hand-built headers, and the ways a header can lie.

The builders here make small but complete images (the tables the header points at exist) so that a
test can break exactly one thing.  test_detect_fuzz.py mutates the same images.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from fuse_disk_export import detect
from fuse_disk_export.detect import MAX_PROBE_BYTES, ImageInfo, probe, probe_reader
from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import LEGACY_AES, READ_ONLY_DRIVER, Source
from fuse_disk_export.formats.vmdk import STREAM_OPTIMIZED

MiB = 1024 * 1024
KiB = 1024


# ------------------------------------------------------------------------------------------------
# Reading helpers


class CountingReader:
    """A read function over bytes that records how much was asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.requested = 0
        self.calls = 0

    def __call__(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and length >= 0
        self.requested += length
        self.calls += 1
        return self.data[offset : offset + length]


def run(data: bytes) -> ImageInfo:
    reader = CountingReader(data)
    info = probe_reader(reader, len(data))
    assert reader.requested <= MAX_PROBE_BYTES
    return info


def fails(data: bytes, match: str) -> ImageError:
    with pytest.raises(ImageError, match=match) as exc:
        run(data)
    assert exc.value.path is None
    assert "\n" not in str(exc.value)
    return exc.value


def put(data: bytes, offset: int, fmt: str, *values: object) -> bytes:
    """A copy of ``data`` with ``values`` packed at ``offset``."""
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


# ------------------------------------------------------------------------------------------------
# Image builders (valid unless told otherwise)


def _ext(kind: int, payload: bytes) -> bytes:
    pad = -len(payload) % 8
    return struct.pack(">II", kind, len(payload)) + payload + bytes(pad)


def qcow2(
    *,
    size: int = 64 * MiB,
    version: int = 3,
    cluster_bits: int = 16,
    backing: bytes | None = None,
    backing_fmt: bytes | None = None,
    data_file: bytes | None = None,
    crypt: int = 0,
    incompat: int = 0,
    extensions: bytes = b"",
) -> bytes:
    """Header cluster, refcount table, refcount block, L1 table (and a LUKS header cluster)."""
    c = 1 << cluster_bits
    l2_bits = cluster_bits - 3
    l1_size = max(1, -(-size // (1 << (cluster_bits + l2_bits))))
    header_len = 72 if version == 2 else 112
    exts = extensions
    if backing_fmt is not None:
        exts += _ext(0xE2792ACA, backing_fmt)
    if data_file is not None:
        exts += _ext(0x44415441, data_file)
        incompat |= 1 << 2
    if crypt == 2:
        exts += _ext(0x0537BE77, struct.pack(">QQ", 4 * c, 4096))
    exts += _ext(0, b"")
    backing_off = header_len + len(exts) if backing is not None else 0
    header = struct.pack(
        ">4sIQIIQIIQQIIQ",
        b"QFI\xfb",
        version,
        backing_off,
        len(backing or b""),
        cluster_bits,
        size,
        crypt,
        l1_size,
        3 * c,
        1 * c,
        1,
        0,
        0,
    )
    if version == 3:
        header += struct.pack(">QQQII", incompat, 0, 0, 4, header_len) + bytes(8)
    first = header + exts + (backing or b"")
    assert len(first) <= c
    img = bytearray(5 * c if crypt == 2 else 3 * c + l1_size * 8)
    img[: len(first)] = first
    struct.pack_into(">Q", img, c, 2 * c)  # refcount table -> refcount block
    return bytes(img)


def qcow(*, size: int = 64 * MiB, backing: bytes | None = None, crypt: int = 0) -> bytes:
    cluster_bits, l2_bits = 12, 9
    name = backing or b""
    l1_off = (48 + len(name) + 7) & ~7
    l1_size = -(-size // (1 << (cluster_bits + l2_bits)))
    header = struct.pack(
        ">4sIQIIQBBHIQ",
        b"QFI\xfb",
        1,
        48 if backing else 0,
        len(name),
        0,
        size,
        cluster_bits,
        l2_bits,
        0,
        crypt,
        l1_off,
    )
    end = l1_off + l1_size * 8
    img = bytearray(-(-end // 512) * 512)
    img[: 48 + len(name)] = header + name
    return bytes(img)


def qed(*, size: int = 64 * MiB, backing: bytes | None = None, raw_backing: bool = False) -> bytes:
    cluster, table = 64 * KiB, 4
    features = (1 if backing else 0) | (4 if raw_backing else 0)
    name = backing or b""
    header = struct.pack(
        "<4sIIIQQQQQII",
        b"QED\0",
        cluster,
        table,
        1,
        features,
        0,
        0,
        cluster,
        size,
        64 if backing else 0,
        len(name),
    )
    img = bytearray(cluster * (1 + table))
    img[: 64 + len(name)] = header + name
    return bytes(img)


def vdi(*, size: int = 64 * MiB, allocated: int = 0) -> bytes:
    blocks = -(-size // MiB)
    bmap_len = -(-blocks * 4 // 512) * 512
    data_off = 512 + bmap_len
    header = bytearray(512)
    header[:40] = b"<<< QEMU VM Virtual Disk Image >>>\n".ljust(40, b"\0")
    struct.pack_into("<IIIII", header, 0x40, 0xBEDA107F, 0x00010001, 0x190, 1, 0)
    struct.pack_into("<IIIIIII", header, 0x154, 512, data_off, 0, 0, 0, 512, 0)
    struct.pack_into("<QIIII", header, 0x170, size, MiB, 0, blocks, allocated)
    header[0x188:0x198] = uuid.uuid4().bytes
    return bytes(header) + b"\xff" * bmap_len + bytes(allocated * MiB)


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


VHDX_BAT = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
VHDX_META = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
VHDX_PARAMS = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VHDX_SIZE = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VHDX_SECTOR = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
VHDX_META_AT = 5 * 64 * KiB
VHDX_ITEMS_AT = VHDX_META_AT + 0x8000


def vhdx(*, size: int = 64 * MiB, has_parent: bool = False) -> bytes:
    """File identifier, two headers, two region tables, metadata region, BAT region."""
    img = bytearray(7 * 64 * KiB)
    img[:8] = b"vhdxfile"
    for i, at in enumerate((64 * KiB, 128 * KiB)):
        struct.pack_into("<4sIQ", img, at, b"head", 0, i + 1)
        struct.pack_into("<HHIQ", img, at + 64, 0, 1, MiB, MiB)
    for at in (192 * KiB, 256 * KiB):
        struct.pack_into("<4sIII", img, at, b"regi", 0, 2, 0)
        struct.pack_into("<16sQII", img, at + 16, VHDX_BAT, 6 * 64 * KiB, 64 * KiB, 1)
        struct.pack_into("<16sQII", img, at + 48, VHDX_META, VHDX_META_AT, 64 * KiB, 1)
    struct.pack_into("<8sHH", img, VHDX_META_AT, b"metadata", 0, 3)
    items = [(VHDX_PARAMS, 0x8000, 8), (VHDX_SIZE, 0x8008, 8), (VHDX_SECTOR, 0x8010, 4)]
    for i, (guid, off, length) in enumerate(items):
        struct.pack_into("<16sIIII", img, VHDX_META_AT + 32 + 32 * i, guid, off, length, 4, 0)
    struct.pack_into("<II", img, VHDX_ITEMS_AT, 32 * MiB, 2 if has_parent else 0)
    struct.pack_into("<Q", img, VHDX_ITEMS_AT + 8, size)
    struct.pack_into("<I", img, VHDX_ITEMS_AT + 16, 512)
    return bytes(img)


def vpc_footer(
    *,
    size: int,
    geometry: tuple[int, int, int],
    app: bytes = b"qemu",
    disk_type: int = 3,
    data_offset: int = 512,
) -> bytes:
    footer = bytearray(512)
    cyls, heads, secs = geometry
    struct.pack_into(
        ">8sIIQI4sI4sQQHBBI",
        footer,
        0,
        b"conectix",
        2,
        0x10000,
        data_offset,
        0,
        app,
        0x50003,
        b"Wi2k",
        size,
        size,
        cyls,
        heads,
        secs,
        disk_type,
    )
    struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)
    return bytes(footer)


def vpc(
    *,
    geometry: tuple[int, int, int] = (964, 8, 17),
    app: bytes = b"qemu",
    current_size: int | None = None,
) -> bytes:
    """A dynamic VHD: footer copy, dynamic header, BAT, footer."""
    cyls, heads, secs = geometry
    size = current_size or cyls * heads * secs * 512
    block = 2 * MiB
    entries = -(-max(size, cyls * heads * secs * 512) // block)
    bat_len = -(-entries * 4 // 512) * 512
    footer = vpc_footer(size=size, geometry=geometry, app=app)
    dyn = bytearray(1024)
    struct.pack_into(">8sQQIII", dyn, 0, b"cxsparse", 2**64 - 1, 1536, 0x10000, entries, block)
    return footer + bytes(dyn) + b"\xff" * bat_len + footer


def vpc_fixed(*, size: int = MiB) -> bytes:
    footer = vpc_footer(size=size, geometry=(16, 4, 32), disk_type=2, data_offset=2**64 - 1)
    return bytes(size) + footer


def parallels(
    *,
    sectors: int = 128 * KiB,
    magic: bytes = b"WithouFreSpacExt",
    inuse: int = 0,
    ext_off: int = 0,
) -> bytes:
    tracks = 2048
    entries = -(-sectors // tracks)
    data_off = -(-(64 + entries * 4) // 512)
    header = struct.pack(
        "<16sIIIIIQIIIQ", magic, 2, 16, 1, tracks, entries, sectors, inuse, data_off, 0, ext_off
    )
    return header + bytes(data_off * 512 - 64)


LUKS_KEY_BYTES = 16
LUKS_SLOT_SECTORS = 128  # 16 * 4000 / 512, rounded up to 4 KiB


def luks1(*, data: int = 64 * KiB) -> bytes:
    payload = 8 + 8 * LUKS_SLOT_SECTORS
    header = bytearray(
        struct.pack(
            ">6sH32s32s32sII20s32sI40s",
            b"LUKS\xba\xbe",
            1,
            b"aes",
            b"xts-plain64",
            b"sha256",
            payload,
            LUKS_KEY_BYTES,
            bytes(20),
            bytes(32),
            1000,
            str(uuid.uuid4()).encode(),
        )
    )
    for i in range(8):
        state, iterations = (0x00AC71F3, 1000) if i == 0 else (0x0000DEAD, 0)
        start = 8 + i * LUKS_SLOT_SECTORS
        header += struct.pack(">II32sII", state, iterations, bytes(32), start, 4000)
    return bytes(header) + bytes(payload * 512 - len(header) + data)


def luks2(*, header_size: int = 16 * KiB) -> bytes:
    img = bytearray(2 * header_size + 64 * KiB)
    struct.pack_into(">6sHQ", img, 0, b"LUKS\xba\xbe", 2, header_size)
    struct.pack_into(">6sHQ", img, header_size, b"SKUL\xba\xbe", 2, header_size)
    return bytes(img)


def bochs(*, disk: int = 16 * MiB, version: int = 0x20000) -> bytes:
    extent = 32 * KiB
    catalog = -(-disk // extent)
    header = bytearray(512)
    header[:23] = b"Bochs Virtual HD Image\0"
    header[32:40] = b"Redolog\0"
    header[48:56] = b"Growing\0"
    struct.pack_into("<IIIII", header, 64, version, 512, catalog, 512, extent)
    struct.pack_into("<Q", header, 84 if version == 0x10000 else 88, disk)
    return bytes(header) + b"\xff" * (catalog * 4)


CLOOP_MAGIC = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)


def cloop(*, blocks: int = 4, block_size: int = 64 * KiB) -> bytes:
    first = 136 + (blocks + 1) * 8
    offsets = [first + 100 * i for i in range(blocks + 1)]
    body = CLOOP_MAGIC.ljust(128, b"\0") + struct.pack(">II", block_size, blocks)
    body += b"".join(struct.pack(">Q", o) for o in offsets)
    return body + b"\x78" * (offsets[-1] - first)


def dmg(*, sectors: int = 2048) -> bytes:
    data = b"\x01" * 4096
    plist = b"<plist><dict><data>bWlzaA==</data></dict></plist>"
    koly = bytearray(512)
    struct.pack_into(">4sIIIQQQQQ", koly, 0, b"koly", 4, 512, 1, 0, 0, len(data), 0, 0)
    struct.pack_into(">QQ", koly, 0xD8, len(data), len(plist))
    struct.pack_into(">Q", koly, 0x1EC, sectors)
    return data + plist + bytes(koly)


VMDK_DESC = (
    b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
    b'createType="{create}"\n{parent}\n# Extent description\n{extents}\n\n'
    b'# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = "4"\n'
)


def vmdk_descriptor(
    create: bytes = b"monolithicFlat",
    extents: bytes = b'RW 131072 FLAT "disk-flat.vmdk" 0',
    parent: bytes | None = None,
) -> bytes:
    hint = b'parentFileNameHint="' + parent + b'"' if parent is not None else b""
    return (
        VMDK_DESC.replace(b"{create}", create)
        .replace(b"{extents}", extents)
        .replace(b"{parent}", hint)
    )


def vmdk_sparse(
    *,
    capacity: int = 131072,
    version: int = 1,
    compress: int = 0,
    parent: bytes | None = None,
    gd_at_end: bool = False,
) -> bytes:
    """A monolithicSparse (or streamOptimized) extent with its embedded descriptor."""
    grain, gtes = 128, 512
    gd_entries = -(-capacity // (grain * gtes))
    gd_sectors = -(-gd_entries * 4 // 512)
    rgd, gd = 21, 21 + gd_sectors
    grain_off = 128
    flags = 1 | 2 | ((1 << 16 | 1 << 17) if compress else 0)
    create = b"streamOptimized" if compress else b"monolithicSparse"
    desc = vmdk_descriptor(create, b'RW %d SPARSE "x.vmdk"' % capacity, parent)

    def header(gd_offset: int) -> bytes:
        return b"KDMV" + struct.pack(
            "<IIQQQQIQQQc4sH",
            version,
            flags,
            capacity,
            grain,
            1,
            20,
            gtes,
            rgd,
            gd_offset,
            grain_off,
            b"\0",
            b"\n \r\n",
            compress,
        )

    img = bytearray(grain_off * 512)
    head = header(2**64 - 1 if gd_at_end else gd)
    img[: len(head)] = head
    img[512 : 512 + len(desc)] = desc
    if gd_at_end:
        footer = bytearray(1536)
        struct.pack_into("<QII", footer, 0, 1, 0, 3)
        tail = header(gd)
        footer[512 : 512 + len(tail)] = tail
        img += footer
    return bytes(img)


def raw(size: int = 4 * MiB) -> bytes:
    return bytes(range(256)) * (size // 256)


#: Every valid image a builder makes, by name, with what probing it must report.
VALID: dict[str, tuple[Callable[[], bytes], ImageInfo]] = {
    "qcow2": (qcow2, ImageInfo("qcow2", 64 * MiB)),
    "qcow2-v2": (lambda: qcow2(version=2), ImageInfo("qcow2", 64 * MiB)),
    "qcow2-backing": (
        lambda: qcow2(backing=b"base.qcow2", backing_fmt=b"qcow2", data_file=b"data.raw"),
        ImageInfo("qcow2", 64 * MiB, "base.qcow2", "qcow2", data_file="data.raw"),
    ),
    "qcow2-luks": (lambda: qcow2(crypt=2), ImageInfo("qcow2", 64 * MiB, encryption="luks")),
    "qcow": (lambda: qcow(backing=b"base.img"), ImageInfo("qcow", 64 * MiB, "base.img")),
    "qed": (
        lambda: qed(backing=b"base.raw", raw_backing=True),
        ImageInfo("qed", 64 * MiB, "base.raw", "raw"),
    ),
    "vdi": (vdi, ImageInfo("vdi", 64 * MiB)),
    "vhdx": (vhdx, ImageInfo("vhdx", 64 * MiB)),
    "vpc": (vpc, ImageInfo("vpc", 964 * 8 * 17 * 512)),
    "vpc-fixed": (vpc_fixed, ImageInfo("vpc", 16 * 4 * 32 * 512)),
    "parallels": (parallels, ImageInfo("parallels", 64 * MiB)),
    "luks": (luks1, ImageInfo("luks", 64 * KiB, encryption="luks")),
    "luks2": (luks2, ImageInfo("luks", None, encryption="luks")),
    "bochs": (bochs, ImageInfo("bochs", 16 * MiB, read_only=READ_ONLY_DRIVER)),
    "cloop": (cloop, ImageInfo("cloop", 256 * KiB, read_only=READ_ONLY_DRIVER)),
    "dmg": (dmg, ImageInfo("dmg", MiB, read_only=READ_ONLY_DRIVER)),
    "vmdk": (vmdk_sparse, ImageInfo("vmdk", 64 * MiB)),
    "vmdk-stream": (
        lambda: vmdk_sparse(version=3, compress=1, gd_at_end=True),
        ImageInfo("vmdk", 64 * MiB, read_only=STREAM_OPTIMIZED),
    ),
    "vmdk-parent": (
        lambda: vmdk_sparse(parent=b"base.vmdk"),
        ImageInfo("vmdk", 64 * MiB, "base.vmdk", "vmdk"),
    ),
    "vmdk-descriptor": (vmdk_descriptor, ImageInfo("vmdk", 64 * MiB)),
    "raw": (raw, ImageInfo("raw", 4 * MiB)),
}


# ------------------------------------------------------------------------------------------------
# Valid images


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_image(name: str) -> None:
    build, expected = VALID[name]
    assert run(build()) == expected


@pytest.mark.parametrize("name", sorted(VALID))
def test_reads_stay_small(name: str) -> None:
    reader = CountingReader(VALID[name][0]())
    probe_reader(reader, len(reader.data))
    assert reader.requested <= MAX_PROBE_BYTES
    assert reader.calls <= 16


def test_empty_is_raw_of_size_zero() -> None:
    assert probe_reader(CountingReader(b""), 0) == ImageInfo("raw", 0)


def test_short_random_file_is_raw() -> None:
    assert run(b"hello") == ImageInfo("raw", 5)


def test_qcow_magic_with_version_zero_is_raw() -> None:
    data = b"QFI\xfb" + bytes(508)
    assert run(data) == ImageInfo("raw", 512)


def test_qcow2_corrupt_bit_opens_read_only() -> None:
    assert run(put(qcow2(), 72, ">Q", 1 << 1)).read_only


def test_qcow2_data_file_extension_without_the_feature_bit_is_ignored() -> None:
    img = qcow2(extensions=_ext(0x44415441, b"ignored.raw"))
    assert run(img).data_file is None


def test_qcow2_extensions_beyond_the_first_read() -> None:
    img = qcow2(extensions=_ext(0x1234, bytes(6000)), data_file=b"far.raw")
    assert run(img).data_file == "far.raw"


def test_qcow2_extension_walk_is_bounded() -> None:
    img = qcow2(cluster_bits=17, extensions=_ext(0x1234, bytes(70000)))
    fails(img, "qcow2 header extensions run past 65536 bytes")


def test_qcow2_size_counts_whole_sectors() -> None:
    assert run(qcow2(size=64 * MiB + 100)).virtual_size == 64 * MiB


def test_qcow2_backing_name_keeps_every_byte() -> None:
    name = b"dir/b\xe4se \xff.qcow2"
    info = run(qcow2(backing=name))
    assert info.backing_file is not None
    assert os.fsencode(info.backing_file) == name
    assert info.backing_format is None


def test_qcow2_empty_backing_name_means_none() -> None:
    assert run(qcow2(backing=b"")).backing_file is None


def test_qcow_encrypted() -> None:
    info = run(qcow(crypt=1))
    assert info.encrypted and info.encryption == "aes" and info.read_only == LEGACY_AES


def test_qcow2_legacy_aes_is_read_only_and_luks_is_not() -> None:
    aes, luks = run(qcow2(crypt=1)), run(qcow2(crypt=2))
    assert (aes.encryption, aes.read_only) == ("aes", LEGACY_AES)
    assert (luks.encryption, luks.read_only) == ("luks", "")


def test_qed_backing_without_raw_flag_has_no_format() -> None:
    assert run(qed(backing=b"base.qcow2")) == ImageInfo("qed", 64 * MiB, "base.qcow2")


def test_vpc_size_from_current_size_for_hyper_v() -> None:
    assert run(vpc(app=b"win ", current_size=64 * MiB)).virtual_size == 64 * MiB
    assert run(vpc(app=b"qemu", current_size=64 * MiB)).virtual_size == 964 * 8 * 17 * 512
    max_chs = vpc(geometry=(65535, 16, 255), current_size=200 * 1024 * MiB)
    assert run(max_chs).virtual_size == 200 * 1024 * MiB


def test_parallels_old_magic_keeps_low_32_bits_of_size() -> None:
    img = parallels(magic=b"WithoutFreeSpace")
    assert run(img).virtual_size == 64 * MiB
    wide = put(img, 36, "<Q", (1 << 32) | 2048)
    assert run(wide).virtual_size == 2048 * 512


def test_parallels_not_closed_cleanly_is_read_only() -> None:
    assert run(parallels(inuse=0x746F6E59)).read_only


def test_parallels_with_format_extension_is_not_written() -> None:
    # QEMU ignores the extension when writing and truncated it away (parallels-with-bitmap).
    assert "format extension" in run(parallels(ext_off=1)).read_only
    assert not run(parallels()).read_only


def test_parallels_wrong_version_is_raw() -> None:
    assert run(put(parallels(), 16, "<I", 3)).format == "raw"


def test_bochs_version_1() -> None:
    assert run(bochs(version=0x10000)) == ImageInfo("bochs", 16 * MiB, read_only=READ_ONLY_DRIVER)


def test_bochs_wrong_subtype_is_raw() -> None:
    img = bytearray(bochs())
    img[48:56] = b"Undoable"
    assert run(bytes(img)).format == "raw"


def test_luks_unknown_version_is_raw() -> None:
    assert run(put(luks1(), 6, ">H", 3)).format == "raw"


def test_vmdk_version_3_uncompressed_is_read_only() -> None:
    assert "version 3" in run(vmdk_sparse(version=3)).read_only


def test_vmdk_stream_optimized_is_never_written() -> None:
    # QEMU opens it writable, but a refused write to a VMware-made one leaves it unreadable.
    assert run(vmdk_sparse(compress=1)).read_only == STREAM_OPTIMIZED
    assert run(vmdk_sparse(version=3, compress=1)).read_only == STREAM_OPTIMIZED
    assert not run(vmdk_sparse()).read_only


def test_vmdk_se_sparse_descriptor_is_read_only() -> None:
    desc = (
        b'# Disk DescriptorFile\nversion=1\ncreateType="seSparse"\n'
        b'RW 131072 SESPARSE "d-sesparse.vmdk"\n'
    )
    assert "seSparse" in run(desc).read_only


def test_vmdk_descriptor_sums_rw_extents_only() -> None:
    extents = (
        b'RW 1000 FLAT "a.vmdk" 0\n'
        b'RDONLY 5000 FLAT "b.vmdk" 0\n'
        b'RW 2000 SPARSE "c.vmdk"\n'
        b'RW 3000 ZERO "d.vmdk"\n'
        b'RW 500 VMFS "e.vmdk"'
    )
    desc = vmdk_descriptor(b"twoGbMaxExtentSparse", extents)
    assert run(desc).virtual_size == 3500 * 512


def test_vmdk_descriptor_lines_qemu_skips() -> None:
    extents = (
        b'RW5 FLAT "a.vmdk" 0\n'
        b'RW 0 FLAT "b.vmdk" 0\n'
        b'RW 100 FLAT ""\n'
        b'   RW   7   VMFS   "c.vmdk"\n'
        b'RW 9 FLATTENEDFLAT "d.vmdk" 0'
    )
    assert run(vmdk_descriptor(b"vmfs", extents)).virtual_size == 7 * 512


def test_vmdk_descriptor_with_parent_and_crlf() -> None:
    desc = vmdk_descriptor(parent=b"../base.vmdk").replace(b"\n", b"\r\n")
    assert run(desc) == ImageInfo("vmdk", 64 * MiB, "../base.vmdk", "vmdk")


def test_vmdk_descriptor_needs_version_line_first() -> None:
    text = b'# comment\n   \nversion=2\ncreateType="vmfs"\nRW 8 VMFS "x"\n'
    assert run(text).virtual_size == 4096
    assert run(b'createType="vmfs"\nversion=1\n').format == "raw"
    assert run(b"\nversion=1\n").format == "raw"


def test_vmdk_header_pointing_at_descriptor_only() -> None:
    img = bytearray(vmdk_sparse())
    struct.pack_into("<Q", img, 12, 0)  # capacity 0: the extents are in the descriptor
    desc = vmdk_descriptor(b"monolithicFlat", b'RW 2048 FLAT "x-flat.vmdk" 0')
    img[512 : 512 + 512] = desc[:512].ljust(512, b"\0")
    assert run(bytes(img)) == ImageInfo("vmdk", MiB)


def test_cloop_needs_the_whole_magic() -> None:
    assert run(CLOOP_MAGIC[:40]).format == "raw"


def test_fixed_vpc_with_bad_checksum_is_refused() -> None:
    img = bytearray(vpc_fixed())
    img[-1] ^= 1
    fails(bytes(img), "vpc footer checksum is wrong")


def test_tail_without_signature_is_raw() -> None:
    img = bytearray(vpc_fixed())
    img[-512:-504] = b"conectiX"
    assert run(bytes(img)).format == "raw"
    koly = bytearray(dmg())
    struct.pack_into(">I", koly, len(koly) - 508, 3)  # koly version 3: not a UDIF trailer
    assert run(bytes(koly)).format == "raw"


# ------------------------------------------------------------------------------------------------
# Truncated headers


@pytest.mark.parametrize(
    ("name", "keep", "message"),
    [
        ("qcow2", 40, r"truncated qcow2 header \(file is 40 bytes, header needs 104\)"),
        ("qcow2", 6, r"truncated qcow2 header \(file is 6 bytes, header needs 104\)"),
        ("qcow2-v2", 70, r"truncated qcow2 header \(file is 70 bytes, header needs 72\)"),
        ("qcow2", 108, r"truncated qcow2 header \(file is 108 bytes, header needs 112\)"),
        ("qcow2", 200, r"qcow2 refcount table lies past the end of the file"),
        ("qcow2", 3 * 65536 + 4, r"qcow2 L1 table lies past the end of the file"),
        ("qcow", 47, r"truncated qcow header \(file is 47 bytes, header needs 48\)"),
        ("qcow", 60, r"qcow L1 table lies past the end of the file"),
        ("qed", 63, r"truncated qed header"),
        ("qed", 4 * 65536, r"qed L1 table lies past the end of the file"),
        ("vdi", 511, r"truncated vdi header \(file is 511 bytes, header needs 512\)"),
        ("vdi", 600, r"vdi block map lies past the end of the file"),
        ("vhdx", 100_000, r"truncated vhdx header \(file is 100000 bytes, header needs 262144\)"),
        ("vhdx", 6 * 65536, r"vhdx region lies past the end of the file"),
        ("vpc", 300, r"truncated vpc header"),
        ("vpc", 1000, r"vpc dynamic disk header lies past the end of the file"),
        ("vpc", 1600, r"vpc block allocation table lies past the end of the file"),
        ("parallels", 63, r"truncated parallels header"),
        ("parallels", 100, r"parallels block allocation table lies past the end of the file"),
        ("luks", 591, r"truncated luks header \(file is 591 bytes, header needs 592\)"),
        ("luks", 100_000, r"luks payload offset lies past the end of the file"),
        ("luks", 7, r"truncated luks header"),
        ("luks2", 4000, r"truncated luks header"),
        ("luks2", 10_000, r"luks2 header lies past the end of the file"),
        ("bochs", 300, r"truncated bochs header"),
        ("bochs", 600, r"bochs catalog lies past the end of the file"),
        ("cloop", 130, r"truncated cloop header"),
        ("cloop", 150, r"cloop offsets table lies past the end of the file"),
        ("cloop", 300, r"cloop compressed data lies past the end of the file"),
        ("vmdk", 100, r"truncated vmdk header"),
        ("vmdk", 30 * 512, r"truncated vmdk file \(grains start at 65536 bytes\)"),
    ],
)
def test_truncated(name: str, keep: int, message: str) -> None:
    fails(VALID[name][0]()[:keep], message)


def test_truncated_qcow2_with_only_its_magic() -> None:
    fails(b"QFI\xfb", r"truncated qcow2 header \(file is 4 bytes")


def test_truncated_dmg_trailer_is_raw_or_refused() -> None:
    img = dmg()
    # Cut the forks away: the trailer now says they lie past it.
    fails(img[:100] + img[-512:], "dmg property list lies past the trailer")


def test_vmdk_stream_footer_missing() -> None:
    img = vmdk_sparse(compress=1, gd_at_end=True)
    fails(img[:-1536] + bytes(1536), "vmdk stream footer is invalid")


def test_vhdx_metadata_region_past_end() -> None:
    img = put(vhdx(), 192 * KiB + 48 + 16, "<Q", 100 * MiB)
    fails(img, "vhdx metadata region lies past the end of the file")


# ------------------------------------------------------------------------------------------------
# Inconsistent headers


def _qcow2_v3_field(offset: int, fmt: str, value: int) -> bytes:
    return put(qcow2(), offset, fmt, value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: put(qcow2(), 4, ">I", 4), "unsupported qcow2 version 4"),
        (lambda: put(qcow2(), 20, ">I", 8), r"unsupported qcow2 cluster size 2\^8"),
        (lambda: put(qcow2(), 20, ">I", 22), r"unsupported qcow2 cluster size 2\^22"),
        (lambda: put(qcow2(), 100, ">I", 96), r"qcow2 header is too short"),
        (lambda: put(qcow2(cluster_bits=9), 100, ">I", 600), r"exceeds the cluster size"),
        (lambda: put(qcow2(), 8, ">Q", 65537), "offset lies beyond the first cluster"),
        (lambda: put(qcow2(), 72, ">Q", 1 << 7), r"unsupported incompatible features \(0x80\)"),
        (lambda: put(qcow2(), 104, ">B", 1), "compression type and its incompatible feature bit"),
        (lambda: put(qcow2(), 104, ">B", 9), "unsupported qcow2 compression type 9"),
        (lambda: put(qcow2(), 96, ">I", 7), r"refcount width 2\^7 bits is too large"),
        (lambda: put(qcow2(), 32, ">I", 3), "unsupported qcow2 encryption method 3"),
        (lambda: put(qcow2(), 56, ">I", 0), "qcow2 image has no refcount table"),
        (lambda: put(qcow2(), 40, ">Q", 100 * MiB), "qcow2 L1 table lies past the end of the file"),
        (lambda: put(qcow2(), 40, ">Q", 3 * 65536 + 8), "L1 table offset is not aligned"),
        (lambda: put(qcow2(), 36, ">I", 0), "qcow2 L1 table is too small for the virtual size"),
        (lambda: put(qcow2(), 36, ">I", 1 << 23), "qcow2 L1 table is too large"),
        (
            lambda: put(qcow2(), 48, ">Q", 100 * MiB),
            "qcow2 refcount table lies past the end of the file",
        ),
        (lambda: put(qcow2(), 56, ">I", 100), "qcow2 refcount table lies past the end"),
        (lambda: put(qcow2(), 56, ">I", 1000), "qcow2 refcount table is too large"),
        (lambda: put(qcow2(), 60, ">IQ", 3, 100 * MiB), "qcow2 snapshot table lies past the end"),
        (lambda: put(qcow2(), 60, ">I", 70000), "qcow2 snapshot table is too large"),
        (lambda: put(qcow2(), 64, ">Q", 512), "qcow2 snapshot table offset is not aligned"),
        (
            lambda: qcow2(backing=b"x" * 1024),
            r"qcow2 backing file name is too long \(1024 bytes, at most 1023\)",
        ),
        (
            lambda: put(put(qcow2(backing=b"base"), 8, ">Q", 65530), 16, ">I", 10),
            r"qcow2 backing file name is too long \(10 bytes, at most 6\)",
        ),
        (
            lambda: qcow2(backing_fmt=b"a-very-long-format-name"),
            "qcow2 backing format name is too long",
        ),
        (lambda: qcow2(incompat=1 << 2), "external file but does not name it"),
        (
            lambda: qcow2(extensions=struct.pack(">II", 0x1234, 0xFFFF)),
            "qcow2 header extension 0x00001234 is too large",
        ),
        (
            lambda: qcow2(extensions=_ext(0x0537BE77, bytes(16))),
            "encryption header extension without LUKS",
        ),
        (lambda: put(qcow2(), 32, ">I", 2), "LUKS-encrypted but has no encryption header"),
        (lambda: put(qcow(), 24, ">Q", 1), "qcow image size 1 is too small"),
        (lambda: put(qcow(), 32, ">B", 17), r"unsupported qcow cluster size 2\^17"),
        (lambda: put(qcow(), 33, ">B", 14), "unsupported qcow L2 table size"),
        (lambda: put(qcow(), 36, ">I", 2), "unsupported qcow encryption method 2"),
        (lambda: qcow(backing=b"y" * 1024), "qcow backing file name is too long"),
        (lambda: put(qcow(backing=b"b"), 16, ">I", 10**6), "qcow backing file name is too long"),
        (lambda: put(qed(), 16, "<Q", 8), r"unsupported features \(0x8\)"),
        (lambda: put(qed(), 4, "<I", 1000), "qed cluster size 1000 is invalid"),
        (lambda: put(qed(), 8, "<I", 32), "qed table size 32 is invalid"),
        (lambda: put(qed(), 48, "<Q", 1000), "qed image size 1000 is invalid"),
        (lambda: put(qed(), 40, "<Q", 0), "qed L1 table offset is invalid"),
        (lambda: put(qed(), 40, "<Q", 4096), "qed L1 table offset is invalid"),
        (lambda: put(qed(backing=b"b"), 56, "<I", 65536), "qed backing file name lies outside"),
        (lambda: put(vdi(), 0x44, "<I", 0x00010000), r"unsupported vdi version 1\.0"),
        (lambda: put(vdi(), 0x154, "<I", 100), "not aligned to a sector"),
        (lambda: put(vdi(), 0x168, "<I", 4096), "unsupported vdi sector size 4096"),
        (lambda: put(vdi(), 0x178, "<I", 4096), "unsupported vdi block size 4096"),
        (lambda: put(vdi(), 0x180, "<I", 8), "vdi block map is too small for the disk size"),
        (lambda: put(vdi(), 0x1B8, "<I", 7), "vdi differencing images are not supported"),
        (lambda: put(vdi(), 0x170, "<Q", 1 << 60), "unsupported vdi image size"),
        (lambda: put(vdi(), 0x154, "<I", 10 * MiB), "vdi block map lies past the end"),
        (lambda: vdi(allocated=2)[:-1], "vdi data area lies past the end"),
        (lambda: put(vhdx(), 64 * KiB, "4s", b"xxxx"), None),
        (
            lambda: put(put(vhdx(), 64 * KiB, "4s", b"xxxx"), 128 * KiB, "4s", b"xxxx"),
            "vhdx has no valid header",
        ),
        (lambda: put(vhdx(), 128 * KiB + 66, "<H", 2), "unsupported vhdx version 2"),
        (lambda: put(vhdx(), 192 * KiB, "4s", b"xxxx"), "vhdx region table has no signature"),
        (lambda: put(vhdx(), 192 * KiB + 8, "<I", 5000), "region table has too many entries"),
        (lambda: put(vhdx(), 192 * KiB + 16, "16s", bytes(16)), "requires a region QEMU"),
        (
            lambda: put(put(vhdx(), 192 * KiB + 16, "16s", bytes(16)), 192 * KiB + 44, "<I", 0),
            "lacks the metadata or block allocation",
        ),
        (lambda: put(vhdx(), VHDX_META_AT, "8s", b"metadatX"), "metadata table has no signature"),
        (lambda: put(vhdx(), VHDX_META_AT + 10, "<H", 3000), "metadata table has too many"),
        (lambda: put(vhdx(), VHDX_META_AT + 32, "16s", bytes(16)), "lacks the file parameters"),
        (lambda: put(vhdx(), VHDX_META_AT + 48, "<I", 0xFFFFF), "item lies outside the metadata"),
        (lambda: put(vhdx(), VHDX_META_AT + 84, "<I", 4), "virtual disk size item is too short"),
        (lambda: vhdx(has_parent=True), "vhdx differencing images are not supported"),
        (lambda: put(vhdx(), VHDX_ITEMS_AT, "<I", 3 * MiB), "unsupported vhdx block size"),
        (lambda: put(vhdx(), VHDX_ITEMS_AT + 16, "<I", 1024), "unsupported vhdx logical sector"),
        (lambda: put(vhdx(), VHDX_ITEMS_AT + 8, "<Q", 1 << 50), "virtual disk size .* too large"),
        (lambda: put(vpc(), 100, "B", 1), "vpc footer checksum is wrong"),
        (lambda: put(vpc(), 512, "8s", b"cxsparsX"), "dynamic disk header has no signature"),
        (lambda: put(vpc(), 512 + 32, ">I", 1000), "invalid vpc block size 1000"),
        (lambda: put(vpc(), 512 + 28, ">I", 1), "allocation table is too small for the disk"),
        (lambda: put(vpc(), 512 + 16, ">Q", 10**9), "allocation table lies past the end"),
        (lambda: put(parallels(), 28, "<I", 0), "parallels image has zero sectors per cluster"),
        (lambda: put(parallels(), 28, "<I", 1 << 30), "parallels cluster size is too large"),
        (lambda: put(parallels(), 32, "<I", 1 << 30), "allocation table is too large"),
        (lambda: put(luks1(), 208 + 44, ">I", 3999), r"luks key slot 0 is corrupt \(3999"),
        (lambda: put(luks1(), 208 + 48, ">I", 1), "luks key slot 1 is corrupt"),
        (lambda: put(luks1(), 208, ">II", 0x00AC71F3, 0), "iteration count of zero"),
        (lambda: put(luks1(), 208 + 40, ">I", 1), "luks key slot 0 overlaps the header"),
        (lambda: put(luks1(), 208 + 48 + 40, ">I", 8), "luks key slots 0 and 1 overlap"),
        (lambda: put(luks1(), 104, ">I", 100), "overlaps the encrypted payload"),
        (lambda: put(luks2(), 8, ">Q", 5000), "luks2 header size 5000 is invalid"),
        (lambda: put(bochs(), 72, "<I", 0x100001), "bochs catalog is too large"),
        (lambda: put(bochs(), 80, "<I", 100), "invalid bochs extent size 100"),
        (lambda: put(bochs(), 80, "<I", 3 * 4096), "invalid bochs extent size"),
        (lambda: put(bochs(), 72, "<I", 1), "bochs catalog is too small for the disk size"),
        (lambda: put(cloop(), 128, ">I", 1000), "invalid cloop block size 1000"),
        (lambda: put(cloop(), 128, ">I", 0), "invalid cloop block size 0"),
        (lambda: put(cloop(), 132, ">I", 0x20000000), "cloop image has too many blocks"),
        (lambda: put(dmg(), len(dmg()) - 512 + 24, ">Q", 10**6), "dmg data fork lies past"),
        (lambda: put(dmg(), len(dmg()) - 512 + 40, ">Q", 10**6), "dmg resource fork lies past"),
        (lambda: put(dmg(), len(dmg()) - 512 + 0xE0, ">Q", 0), "neither a resource fork nor"),
        (lambda: put(dmg(), len(dmg()) - 512 + 0x1EC, ">Q", 1 << 63), "dmg sector count"),
        (lambda: put(vmdk_sparse(), 4, "<I", 4), "unsupported vmdk version 4"),
        (lambda: put(vmdk_sparse(), 44, "<I", 513), "vmdk grain table is too large"),
        (lambda: put(vmdk_sparse(), 44, "<I", 0), "grain size or grain table size is zero"),
        (lambda: put(vmdk_sparse(), 20, "<Q", 0x200001), "vmdk grain size is too large"),
        (lambda: put(vmdk_sparse(), 56, "<Q", 10**6), "vmdk grain directory lies past the end"),
        (lambda: put(vmdk_sparse(), 48, "<Q", 10**6), "redundant grain directory lies past"),
        (lambda: vmdk_descriptor(b"monolithicSparse"), "unsupported vmdk createType"),
        (lambda: vmdk_descriptor().replace(b"createType", b"kind"), "no createType"),
        (lambda: vmdk_descriptor(extents=b'RW 100 FLAT "x.vmdk"'), "invalid vmdk extent line"),
        (lambda: vmdk_descriptor(extents=b'RW 100 FLAT "x.vmdk" -1'), "invalid vmdk extent"),
        (lambda: vmdk_descriptor(extents=b'RW 100 SPARSE "x.vmdk" 5'), "invalid vmdk extent"),
        (
            lambda: vmdk_descriptor() + b'parentFileNameHint="x',
            "parentFileNameHint is not terminated",
        ),
        (lambda: vmdk_descriptor(parent=b"x" * 5000), "parentFileNameHint is too long"),
    ],
)
def test_inconsistent(data: Callable[[], bytes], message: str | None) -> None:
    if message is None:
        run(data())
    else:
        fails(data(), message)


def test_reader_os_error_becomes_image_error() -> None:
    def broken(offset: int, length: int) -> bytes:
        raise OSError(5, "Input/output error")

    with pytest.raises(ImageError, match="cannot read the image: Input/output error"):
        probe_reader(broken, 4096)


def test_negative_size_is_refused() -> None:
    with pytest.raises(ImageError, match="invalid image size"):
        probe_reader(CountingReader(b""), -1)


def test_budget_is_enforced_by_the_reader() -> None:
    """A parser that asks for more than the budget is stopped before the read is made."""
    src = Source(CountingReader(bytes(1024)), 10 * MAX_PROBE_BYTES)
    src.read(0, MAX_PROBE_BYTES - 10)
    with pytest.raises(detect.ProbeLimitError):
        src.read(0, 11)
    assert src.used == MAX_PROBE_BYTES - 10


# ------------------------------------------------------------------------------------------------
# probe() on real files


def test_probe_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    path.write_bytes(qcow2(backing=b"base.qcow2", backing_fmt=b"qcow2"))
    assert probe(str(path)) == ImageInfo("qcow2", 64 * MiB, "base.qcow2", "qcow2")


def test_probe_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.img"
    path.write_bytes(b"")
    assert probe(str(path)) == ImageInfo("raw", 0)


def test_probe_raw_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(raw(MiB))
    assert probe(str(path)) == ImageInfo("raw", MiB)


def test_probe_missing(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.img")
    with pytest.raises(ImageError) as exc:
        probe(path)
    assert exc.value.reason == "no such file"
    assert exc.value.path == path
    assert str(exc.value) == f"{path}: no such file"


def test_probe_missing_parent(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ImageError, match="no such file"):
        probe(str(tmp_path / "file" / "child"))


def test_probe_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as exc:
        probe(str(tmp_path))
    assert exc.value.reason == "is a directory"
    assert exc.value.path == str(tmp_path)


def test_probe_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageError) as exc:
        probe(str(fifo))
    assert exc.value.reason == "not a regular file"


def test_probe_device() -> None:
    with pytest.raises(ImageError, match="not a regular file"):
        probe("/dev/null")


def test_probe_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root reads anything, so the refusal is simulated where the kernel would give it."""

    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(detect.os, "open", refuse)
    with pytest.raises(ImageError) as exc:
        probe(str(tmp_path / "secret.img"))
    assert exc.value.reason == "permission denied"
    assert exc.value.path == str(tmp_path / "secret.img")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_probe_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "secret.img"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(ImageError) as exc:
        probe(str(path))
    assert exc.value.reason == "permission denied"


def test_probe_malformed_header_carries_the_path(tmp_path: Path) -> None:
    path = tmp_path / "short.qcow2"
    path.write_bytes(qcow2()[:40])
    with pytest.raises(ImageError) as exc:
        probe(str(path))
    assert exc.value.path == str(path)
    assert str(exc.value) == (
        f"{path}: truncated qcow2 header (file is 40 bytes, header needs 104)"
    )


def test_probe_follows_symlink(tmp_path: Path) -> None:
    target = tmp_path / "disk.vdi"
    target.write_bytes(vdi())
    link = tmp_path / "link"
    link.symlink_to(target)
    assert probe(str(link)).format == "vdi"
