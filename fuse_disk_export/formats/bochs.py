"""Bochs growing images (QEMU's block/bochs.c), which QEMU opens read-only."""

from __future__ import annotations

import struct
from typing import Final

from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import (
    READ_ONLY_DRIVER,
    SECTOR,
    ImageInfo,
    Source,
    is_power_of_2,
    sectors_floor,
)

_BOCHS: Final = struct.Struct("<IIIII")  # version, header size, catalog, bitmap, extent at 64
_BOCHS_V1: Final = 0x00010000


def parse(src: Source, head: bytes) -> ImageInfo:
    """Bochs growing image (bochs_open): header and catalog."""
    data = src.header(head, "bochs", 512)
    version, header_size, catalog, _, extent = _BOCHS.unpack_from(data, 64)
    disk = int.from_bytes(data[84:92] if version == _BOCHS_V1 else data[88:96], "little")
    disk = sectors_floor(disk)
    if catalog > 0x100000:
        raise ImageError(f"bochs catalog is too large ({catalog} entries)")
    if extent < SECTOR or not is_power_of_2(extent) or extent > 0x800000:
        raise ImageError(f"invalid bochs extent size {extent}")
    if catalog < -(-disk // extent):
        raise ImageError("bochs catalog is too small for the disk size")
    if header_size + catalog * 4 > src.size:
        raise src.past_end("bochs catalog")
    return ImageInfo("bochs", disk, read_only=READ_ONLY_DRIVER)
