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

    An image not closed cleanly ("inuse") opens read-only only.  One with a format extension
    (Parallels keeps dirty bitmaps there) is not written either: QEMU ignores the extension when
    it opens an image writable, and a write then truncated the file to its last data cluster,
    extension and all ("Wrong parallels Format Extension magic" on the next open; 7.2 and 10.0).
    """
    data = src.header(head, "parallels", _PARALLELS.size)
    (magic, _, _, _, tracks, bat_entries, nb_sectors, inuse, _, _, ext_off) = _PARALLELS.unpack(
        data[:64]
    )
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
    read_only = ""
    if inuse == _PARALLELS_INUSE:
        read_only = "it was not closed cleanly, and QEMU opens it read-only"
    elif ext_off:
        read_only = "QEMU drops its format extension (dirty bitmaps) when it writes to it"
    return ImageInfo("parallels", nb_sectors * SECTOR, read_only=read_only)
