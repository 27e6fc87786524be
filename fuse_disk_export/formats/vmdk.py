"""VMDK (QEMU's block/vmdk.c): sparse extents, text descriptors, and the extents they name."""

from __future__ import annotations

import os
import re
import struct
from typing import Final

from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import (
    HEAD_BYTES,
    PATH_MAX,
    SECTOR,
    ImageInfo,
    Source,
    stored_name,
)
from fuse_disk_export.formats.signatures import (
    PROBE_BUF,
    VMDK3_MAGIC,
    VMDK4_MAGIC,
    looks_like_vmdk_descriptor,
)

_DESC_LIMIT: Final = 64 * 1024  # vmdk descriptor text we read (QEMU reads up to 1 MiB)
_VMDK_DESC_SIZE: Final = 20 * SECTOR  # where QEMU looks for parentFileNameHint


#: Why a streamOptimized vmdk is never opened writable (`_sparse_read_only`).
STREAM_OPTIMIZED: Final = (
    "it is a streamOptimized vmdk: QEMU can only append to it, and a refused write "
    "leaves it unreadable"
)

_VMDK4: Final = struct.Struct("<IIQQQQIQQQc4sH")  # after the magic, 75 bytes
_VMDK_GD_AT_END: Final = 0xFFFFFFFFFFFFFFFF
_VMDK_FLAG_RGD: Final = 1 << 1
_VMDK_COMPRESSION_DEFLATE: Final = 1
_VMDK_MARKER_EOS: Final = 0
_VMDK_MARKER_FOOTER: Final = 3
_VMDK_DESC_TYPES: Final = frozenset(
    {
        "monolithicFlat",
        "vmfs",
        "vmfsSparse",
        "seSparse",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    }
)
_VMDK_EXTENT_TYPES: Final = frozenset({"FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"})
# sscanf("%10s %lld %10s \"%511[^\n\r\"]\" %lld"), one line at a time
_VMDK_EXTENT: Final = re.compile(
    rb'\s*(\S+)\s+([+-]?\d+)\s*(\S{1,10})\s*"([^\n\r"]{1,511})"(?:\s*([+-]?\d+))?'
)


def parse_sparse(src: Source, head: bytes) -> ImageInfo:
    """A sparse VMDK extent ("KDMV", or the old "COWD"), which may carry its own descriptor."""
    data = src.header(head, "vmdk", SECTOR)
    if data.startswith(VMDK3_MAGIC):
        return _parse_vmdk3(src, data)
    fields = _VMDK4.unpack_from(data, 4)
    capacity, desc_off = fields[2], fields[4]
    if capacity == 0 and desc_off:
        # A header that only points at a descriptor: the extents are elsewhere.
        size, read_only = _vmdk_descriptor_info(src, desc_off * SECTOR)
        parent = _vmdk_parent(src, 0x200)
        return ImageInfo("vmdk", size, parent, "vmdk" if parent else None, read_only=read_only)
    if fields[8] == _VMDK_GD_AT_END:
        fields = _vmdk_stream_footer(src)
    version, flags, capacity, grain, _, _, gtes, rgd_off, gd_off, grain_off, _, _, compress = fields
    compressed = compress == _VMDK_COMPRESSION_DEFLATE
    if version > 3:
        raise ImageError(f"unsupported vmdk version {version}")
    if gtes > 512:
        raise ImageError("vmdk grain table is too large")
    if gtes * grain == 0:
        raise ImageError("vmdk grain size or grain table size is zero")
    if grain > 0x200000:
        raise ImageError("vmdk grain size is too large")
    gd_entries = -(-capacity // (gtes * grain))
    if gd_entries > 32 * 1024 * 1024:
        raise ImageError("vmdk grain directory is too large")
    if grain_off * SECTOR > src.size:
        raise ImageError(f"truncated vmdk file (grains start at {grain_off * SECTOR} bytes)")
    if gd_off * SECTOR + gd_entries * 4 > src.size:
        raise src.past_end("vmdk grain directory")
    if flags & _VMDK_FLAG_RGD and rgd_off * SECTOR + gd_entries * 4 > src.size:
        raise src.past_end("vmdk redundant grain directory")
    parent = _vmdk_parent(src, 0x200)
    return ImageInfo(
        "vmdk",
        capacity * SECTOR,
        backing_file=parent,
        backing_format="vmdk" if parent else None,
        read_only=_sparse_read_only(version, compressed),
    )


def _sparse_read_only(version: int, compressed: bool) -> str:
    if compressed:
        # QEMU appends compressed grains and refuses a write to one already there; after such a
        # refused write a VMware-made image no longer opened ("Invalid footer": QEMU 7.2, 10.0
        # and 11.1), so no write may reach one.
        return STREAM_OPTIMIZED
    if version == 3:
        return "it is a version 3 sparse vmdk, which QEMU opens read-only"
    return ""


def _vmdk_stream_footer(src: Source) -> tuple[int, ...]:
    """A streamOptimized VMDK whose header says "at the end": the footer's header holds."""
    if src.size < 1536:
        raise src.truncated("vmdk", 1536)
    data = src.exact(src.size - 1536, 1536, "vmdk footer")
    _, footer_size, footer_type = struct.unpack_from("<QII", data, 0)
    eos_val, eos_size, eos_type = struct.unpack_from("<QII", data, 1024)
    if (
        data[512:516] != VMDK4_MAGIC
        or footer_size != 0
        or footer_type != _VMDK_MARKER_FOOTER
        or (eos_val, eos_size, eos_type) != (0, 0, _VMDK_MARKER_EOS)
    ):
        raise ImageError("vmdk stream footer is invalid")
    fields: tuple[int, ...] = _VMDK4.unpack_from(data, 516)
    return fields


def _parse_vmdk3(src: Source, data: bytes) -> ImageInfo:
    """The old VMware 3 sparse extent: QEMU still opens it, with the same grain limits."""
    sectors, grain, gd_off, gd_entries = struct.unpack_from("<IIII", data, 12)
    if grain > 0x200000:
        raise ImageError("vmdk grain size is too large")
    if gd_entries > 32 * 1024 * 1024:
        raise ImageError("vmdk grain directory is too large")
    if gd_off * SECTOR + gd_entries * 4 > src.size:
        raise src.past_end("vmdk grain directory")
    parent = _vmdk_parent(src, 0x200)
    return ImageInfo("vmdk", sectors * SECTOR, parent, "vmdk" if parent else None)


def parse_text(src: Source, head: bytes) -> ImageInfo:
    """A VMDK descriptor file (monolithicFlat, twoGbMaxExtent*, vmfs...).

    Whether its extents can be written is told by probing each of them (`extent_files`).
    """
    size, read_only = _vmdk_descriptor_info(src, 0)
    parent = _vmdk_parent(src, 0)
    return ImageInfo("vmdk", size, parent, "vmdk" if parent else None, read_only=read_only)


def _vmdk_descriptor_info(src: Source, offset: int) -> tuple[int | None, str]:
    """The virtual size a descriptor's extents add up to (QEMU's vmdk_open_desc_file), and why
    it must stay read-only (an seSparse extent, which QEMU cannot write), or "".

    Only the first `_DESC_LIMIT` bytes are read; for a longer descriptor the size is unknown.
    """
    raw = src.read(offset, _DESC_LIMIT)
    cut = len(raw) == _DESC_LIMIT and offset + _DESC_LIMIT < src.size
    desc = raw.split(b"\0", 1)[0]
    create_type = _vmdk_value(desc, b"createType")
    if create_type is None:
        raise ImageError("vmdk descriptor has no createType")
    if create_type not in _VMDK_DESC_TYPES:
        raise ImageError(f"unsupported vmdk createType {create_type!r}")
    sectors = 0
    se_sparse = create_type == "seSparse"
    for line in desc.split(b"\n"):
        added = _vmdk_extent_sectors(line)
        sectors += added
        m = _VMDK_EXTENT.match(line) if added else None
        se_sparse = se_sparse or (m is not None and m.group(3) == b"SESPARSE")
    read_only = "it has seSparse extents, which QEMU opens read-only" if se_sparse else ""
    return (None if cut else sectors * SECTOR), read_only


def _vmdk_extent_sectors(line: bytes) -> int:
    """The sectors one extent line adds, 0 for lines QEMU skips."""
    m = _VMDK_EXTENT.match(line)
    if m is None or m.group(1) != b"RW":
        return 0
    kind, sectors, offset = m.group(3), int(m.group(2)), m.group(5)
    if kind == b"FLAT" and (offset is None or int(offset) < 0):
        raise ImageError(f"invalid vmdk extent line: {line.strip().decode(errors='replace')}")
    if kind != b"FLAT" and offset is not None:
        raise ImageError(f"invalid vmdk extent line: {line.strip().decode(errors='replace')}")
    if sectors <= 0 or kind.decode(errors="replace") not in _VMDK_EXTENT_TYPES:
        return 0
    return sectors


def _vmdk_value(desc: bytes, key: bytes) -> str | None:
    """``key="value"`` found QEMU's way: first occurrence, two characters on, up to a quote."""
    at = desc.find(key)
    if at < 0:
        return None
    start = at + len(key) + 2
    end = desc.find(b'"', start)
    if start >= len(desc) or end < 0:
        return None
    return desc[start:end].decode(errors="replace")


def _vmdk_parent(src: Source, offset: int) -> str | None:
    """parentFileNameHint, looked for where and how QEMU looks (vmdk_parent_open)."""
    desc = src.read(offset, _VMDK_DESC_SIZE).split(b"\0", 1)[0]
    key = b"parentFileNameHint"
    at = desc.find(key)
    if at < 0:
        return None
    start = at + len(key) + 2
    end = desc.find(b'"', start)
    if end < 0:
        raise ImageError("vmdk parentFileNameHint is not terminated")
    if end - start > PATH_MAX:
        raise ImageError(f"vmdk parentFileNameHint is too long ({end - start} bytes)")
    return stored_name(desc[start:end])


def extent_files(src: Source) -> tuple[str, ...]:
    """The files a VMDK's descriptor makes QEMU open (see `detect.vmdk_extent_files_reader`).

    :raise ImageError: not a VMDK, a malformed extent line, or a descriptor that goes on past the
        `_DESC_LIMIT` bytes we read (QEMU would read further: we cannot vouch for the rest).
    """
    head = src.read(0, HEAD_BYTES)
    if head.startswith(VMDK4_MAGIC) and len(head) >= SECTOR:
        fields = _VMDK4.unpack_from(head, 4)
        capacity, desc_off = fields[2], fields[4]
        if capacity != 0 or not desc_off:
            return ()
        offset = desc_off * SECTOR
    elif head.startswith(VMDK3_MAGIC):
        return ()
    elif looks_like_vmdk_descriptor(head[:PROBE_BUF]):
        offset = 0
    else:
        raise ImageError("is not a vmdk image")
    raw = src.read(offset, _DESC_LIMIT)
    desc, nul, _ = raw.partition(b"\0")
    if not nul and len(raw) == _DESC_LIMIT and offset + _DESC_LIMIT < src.size:
        raise ImageError(f"vmdk descriptor is longer than {_DESC_LIMIT} bytes; refused")
    names: list[str] = []
    for line in desc.split(b"\n"):
        m = _VMDK_EXTENT.match(line)
        if m is not None and _vmdk_extent_sectors(line) > 0:
            names.append(os.fsdecode(m.group(4)))
    return tuple(names)
