"""Parallels (QEMU's block/parallels.c)."""

from __future__ import annotations

import struct
from typing import Final

from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import SECTOR, ImageInfo, Source
from fuse_disk_export.formats.signatures import PARALLELS_MAGICS

_PARALLELS: Final = struct.Struct("<16sIIIIIQIIIQ")  # 64 bytes
_PARALLELS_INUSE: Final = 0x746F6E59


def parse(src: Source, head: bytes) -> ImageInfo:
    """Parallels (parallels_open): header and block allocation table.

    An image not closed cleanly ("inuse") opens read-only only.
    """
    data = src.header(head, "parallels", _PARALLELS.size)
    (magic, _, _, _, tracks, bat_entries, nb_sectors, inuse, _, _, _) = _PARALLELS.unpack(data[:64])
    if magic == PARALLELS_MAGICS[0]:
        nb_sectors &= 0xFFFFFFFF
    if tracks == 0:
        raise ImageError("parallels image has zero sectors per cluster")
    if tracks > 0x7FFFFFFF // 513:
        raise ImageError("parallels cluster size is too large")
    if bat_entries > 0x7FFFFFFF // 4:
        raise ImageError(f"parallels block allocation table is too large ({bat_entries})")
    if _PARALLELS.size + bat_entries * 4 > src.size:
        raise src.past_end("parallels block allocation table")
    return ImageInfo("parallels", nb_sectors * SECTOR, read_only=inuse == _PARALLELS_INUSE)
