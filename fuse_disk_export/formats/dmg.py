"""Apple DMG (QEMU's block/dmg.c), which QEMU opens read-only."""

from __future__ import annotations

import struct
from typing import Final

from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import READ_ONLY_DRIVER, SECTOR, ImageInfo, Source

_DMG: Final = struct.Struct(">4sIIIQQQQQ")  # the koly fields through the resource fork


def parse(src: Source, head: bytes) -> ImageInfo:
    """DMG (dmg_open): the koly trailer's forks must lie before it; it holds the sector count."""
    koly = src.size - SECTOR
    trailer = src.exact(koly, SECTOR, "dmg trailer")
    (_, _, _, _, _, data_off, _, rsrc_off, rsrc_len) = _DMG.unpack_from(trailer)
    xml_off, xml_len = struct.unpack_from(">QQ", trailer, 0xD8)
    sectors = int.from_bytes(trailer[0x1EC:0x1F4], "big")
    if data_off > koly:
        raise ImageError("dmg data fork lies past the trailer")
    if rsrc_off >= koly or rsrc_len > koly - rsrc_off:
        raise ImageError("dmg resource fork lies past the trailer")
    if xml_off >= koly or xml_len > koly - xml_off:
        raise ImageError("dmg property list lies past the trailer")
    if sectors >= 1 << 63:
        raise ImageError("dmg sector count is invalid")
    if rsrc_len == 0 and xml_len == 0:
        raise ImageError("dmg image has neither a resource fork nor a property list")
    return ImageInfo("dmg", sectors * SECTOR, read_only=READ_ONLY_DRIVER)
