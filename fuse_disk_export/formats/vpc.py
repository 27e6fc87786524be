"""VPC, the VHD format (QEMU's block/vpc.c): a dynamic disk, or a fixed one found by its footer."""

from __future__ import annotations

import struct
from typing import Final

from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import SECTOR, ImageInfo, Source, is_power_of_2

_VPC_FOOTER: Final = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")  # 85 of 512 bytes
_VPC_DYNAMIC: Final = struct.Struct(">8sQQIIII")  # first 40 of 1024 bytes
_VPC_SIZE_APPS: Final = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
_VHD_MAX_GEOMETRY: Final = 65535 * 16 * 255
_VHD_MAX_SECTORS: Final = 0xFF000000


def parse_head(src: Source, head: bytes) -> ImageInfo:
    """A VHD with its footer copy in the first sector: QEMU treats it as dynamic."""
    return _parse_footer(src, src.header(head, "vpc", SECTOR)[:SECTOR], dynamic=True)


def parse_tail(src: Source, head: bytes) -> ImageInfo:
    """A VHD whose only footer is the last sector: a fixed disk."""
    return _parse_footer(src, src.exact(src.size - SECTOR, SECTOR, "vpc footer"), dynamic=False)


def _parse_footer(src: Source, footer: bytes, *, dynamic: bool) -> ImageInfo:
    """The footer (vpc_open): checksum, and the size QEMU derives from geometry or current_size."""
    fields = _VPC_FOOTER.unpack_from(footer)
    data_off, app, current_size = fields[3], fields[5], fields[9]
    cyls, heads, secs, checksum = fields[10], fields[11], fields[12], fields[14]
    computed = ~(sum(footer) - sum(footer[64:68])) & 0xFFFFFFFF
    if computed != checksum:
        raise ImageError(f"vpc footer checksum is wrong (0x{checksum:08x}, not 0x{computed:08x})")
    sectors = cyls * heads * secs
    if app in _VPC_SIZE_APPS or sectors == _VHD_MAX_GEOMETRY:
        sectors = current_size // SECTOR
    if sectors > _VHD_MAX_SECTORS:
        raise ImageError(f"vpc image is too large ({sectors} sectors)")
    if dynamic:
        _check_vpc_dynamic(src, data_off, sectors)
    elif sectors * SECTOR > src.size - SECTOR:
        raise src.past_end("vpc fixed disk data")
    return ImageInfo("vpc", sectors * SECTOR)


def _check_vpc_dynamic(src: Source, offset: int, sectors: int) -> None:
    """QEMU reads the whole block allocation table at open; one cut short means lost data."""
    data = src.exact(offset, SECTOR, "vpc dynamic disk header")
    cookie, _, bat_off, _, entries, block_size, _ = _VPC_DYNAMIC.unpack_from(data)
    if cookie != b"cxsparse":
        raise ImageError("vpc dynamic disk header has no signature")
    if not is_power_of_2(block_size) or block_size < SECTOR:
        raise ImageError(f"invalid vpc block size {block_size}")
    if sectors * SECTOR // block_size > 0xFFFFFFFF:
        raise ImageError("vpc image has too many blocks")
    if entries * block_size < sectors * SECTOR:
        raise ImageError("vpc block allocation table is too small for the disk size")
    if entries > 0x7FFFFFFF // 4:
        raise ImageError(f"vpc block allocation table is too large ({entries} entries)")
    if bat_off + entries * 4 > src.size:
        raise src.past_end("vpc block allocation table")
