"""qcow version 1 (QEMU's block/qcow.c)."""

from __future__ import annotations

import struct
from typing import Final

from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import (
    LEGACY_AES,
    NAME_MAX,
    ImageInfo,
    Source,
    sectors_floor,
    stored_name,
)

_QCOW1: Final = struct.Struct(">4sIQIIQBBHIQ")  # 48 bytes


def parse(src: Source, head: bytes) -> ImageInfo:
    """qcow version 1 (qcow_open): small header, one L1 table, optional AES."""
    data = src.header(head, "qcow", _QCOW1.size)
    (_, _, boff, bsize, _, size, cbits, l2bits, _, crypt, l1_off) = _QCOW1.unpack(data[:48])
    if size <= 1:
        raise ImageError(f"qcow image size {size} is too small")
    if not 9 <= cbits <= 16:
        raise ImageError(f"unsupported qcow cluster size 2^{cbits} (2^9 to 2^16)")
    if not 6 <= l2bits <= 13:
        raise ImageError(f"unsupported qcow L2 table size 2^{l2bits + 3} (2^9 to 2^16)")
    if crypt > 1:
        raise ImageError(f"unsupported qcow encryption method {crypt}")
    shift = cbits + l2bits
    l1_size = (size + (1 << shift) - 1) >> shift
    if l1_size * 8 > 0x7FFFFFFF:
        raise ImageError("qcow image is too large")
    if l1_off + l1_size * 8 > src.size:
        raise src.past_end("qcow L1 table")
    backing = None
    if boff:
        if bsize > NAME_MAX:
            raise ImageError(f"qcow backing file name is too long ({bsize} bytes)")
        backing = stored_name(src.exact(boff, bsize, "qcow backing file name"))
    return ImageInfo(
        "qcow",
        sectors_floor(size),
        backing_file=backing,
        encryption="aes" if crypt else "",
        read_only=LEGACY_AES if crypt else "",
    )
