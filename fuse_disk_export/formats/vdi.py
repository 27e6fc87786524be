"""VirtualBox VDI (QEMU's block/vdi.c)."""

from __future__ import annotations

import struct
from typing import Final

from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import SECTOR, ImageInfo, Source
from fuse_disk_export.formats.signatures import VDI_SIGNATURE_AT

_VDI: Final = struct.Struct("<IIIII256sIIIIIIIQIIII16s16s16s16s")  # from offset 0x40
_VDI_VERSION_1_1: Final = 0x00010001
_VDI_BLOCK_SIZE: Final = 1024 * 1024
_VDI_BLOCKS_MAX: Final = (0x80000000 - SECTOR) // 4
_NULL_UUID: Final = bytes(16)


def parse(src: Source, head: bytes) -> ImageInfo:
    """VirtualBox VDI (vdi_open), plus the block map and data area inside the file.

    QEMU opens a VDI whose block map lies past the end of the file and would write into it.
    """
    data = src.header(head, "vdi", 512)
    fields = _VDI.unpack_from(data, VDI_SIGNATURE_AT)
    version, bmap_off, data_off, sector_size = fields[1], fields[6], fields[7], fields[11]
    disk_size, block_size, blocks, allocated = fields[13], fields[14], fields[16], fields[17]
    link, parent = fields[20], fields[21]
    if disk_size > _VDI_BLOCKS_MAX * _VDI_BLOCK_SIZE:
        raise ImageError(f"unsupported vdi image size {disk_size}")
    disk_size = -(-disk_size // SECTOR) * SECTOR
    if version != _VDI_VERSION_1_1:
        raise ImageError(f"unsupported vdi version {version >> 16}.{version & 0xFFFF}")
    if bmap_off % SECTOR or data_off % SECTOR:
        raise ImageError("vdi block map or data offset is not aligned to a sector")
    if sector_size != SECTOR:
        raise ImageError(f"unsupported vdi sector size {sector_size}")
    if block_size != _VDI_BLOCK_SIZE:
        raise ImageError(f"unsupported vdi block size {block_size}")
    if disk_size > blocks * block_size:
        raise ImageError("vdi block map is too small for the disk size")
    if link != _NULL_UUID or parent != _NULL_UUID:
        raise ImageError("vdi differencing images are not supported (non-null link/parent UUID)")
    if blocks > _VDI_BLOCKS_MAX:
        raise ImageError(f"vdi image has too many blocks ({blocks})")
    if bmap_off + blocks * 4 > src.size:
        raise src.past_end("vdi block map")
    if data_off + allocated * block_size > src.size:
        raise src.past_end("vdi data area")
    return ImageInfo("vdi", disk_size)
