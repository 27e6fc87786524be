"""VHDX (QEMU's block/vhdx.c)."""

from __future__ import annotations

import struct
from typing import Final

from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import ImageInfo, Source, is_power_of_2, sectors_floor

_KIB64: Final = 64 * 1024
_VHDX_HEADERS: Final = (1 * _KIB64, 2 * _KIB64)
_VHDX_REGION_TABLE: Final = 3 * _KIB64
_VHDX_NEED: Final = 4 * _KIB64  # through the end of the first region table
_VHDX_MAX_ENTRIES: Final = 2047
_VHDX_ENTRY: Final = struct.Struct("<16sQII")  # region table entry
_VHDX_ITEM: Final = struct.Struct("<16sIIII")  # metadata table entry
# GUIDs as stored (little-endian fields): literal bytes spare importing uuid.
_VHDX_BAT: Final = bytes.fromhex(
    "6677c22d23f600429d64115e9bfd4a08"
)  # 2DC27766-F623-4200-9D64-115E9BFD4A08
_VHDX_METADATA: Final = bytes.fromhex(
    "06a27c8b90479a4bb8fe575f050f886e"
)  # 8B7CA206-4790-4B9A-B8FE-575F050F886E
_VHDX_FILE_PARAMETERS: Final = bytes.fromhex(
    "3767a1ca36fa434db3b633f0aa44e76b"
)  # CAA16737-FA36-4D43-B3B6-33F0AA44E76B
_VHDX_DISK_SIZE: Final = bytes.fromhex(
    "2442a52f1bcd7648b2115dbed83bf4b8"
)  # 2FA54224-CD1B-4876-B211-5DBED83BF4B8
_VHDX_SECTOR_SIZE: Final = bytes.fromhex(
    "1dbf41816fa90947ba47f233a8faab5f"
)  # 8141BF1D-A96F-4709-BA47-F233A8FAAB5F
_VHDX_HAS_PARENT: Final = 0x2
_VHDX_MAX_SIZE: Final = 64 * 1024**4


def parse(src: Source, head: bytes) -> ImageInfo:
    """VHDX: headers, region table, metadata table, and the virtual disk size item.

    Checksums (CRC-32C) are not verified; signatures, counts and offsets are.
    """
    if src.size < _VHDX_NEED:
        raise src.truncated("vhdx", _VHDX_NEED)
    _vhdx_check_headers(src)
    regions = _vhdx_regions(src)
    if _VHDX_METADATA not in regions or _VHDX_BAT not in regions:
        raise ImageError("vhdx region table lacks the metadata or block allocation region")
    for name, (offset, length) in regions.items():
        if offset + length > src.size:
            what = "metadata region" if name == _VHDX_METADATA else "region"
            raise src.past_end(f"vhdx {what}")
    meta_off, meta_len = regions[_VHDX_METADATA]
    items = _vhdx_metadata(src, meta_off, meta_len)
    params = _vhdx_item(src, items, meta_off, _VHDX_FILE_PARAMETERS, "file parameters", 8)
    block_size, flags = params & 0xFFFFFFFF, params >> 32
    size = _vhdx_item(src, items, meta_off, _VHDX_DISK_SIZE, "virtual disk size", 8)
    sector = _vhdx_item(src, items, meta_off, _VHDX_SECTOR_SIZE, "logical sector size", 4)
    if not (is_power_of_2(block_size) and 1 << 20 <= block_size <= 256 << 20):
        raise ImageError(f"unsupported vhdx block size {block_size}")
    if sector not in (512, 4096):
        raise ImageError(f"unsupported vhdx logical sector size {sector}")
    if size > _VHDX_MAX_SIZE:
        raise ImageError(f"vhdx virtual disk size {size} is too large")
    if flags & _VHDX_HAS_PARENT:
        raise ImageError("vhdx differencing images are not supported")
    return ImageInfo("vhdx", sectors_floor(size))


def _vhdx_check_headers(src: Source) -> None:
    """The newer of the two headers must be version 1; an update torn halfway leaves the other."""
    newest: tuple[int, int] | None = None  # (sequence number, version)
    for offset in _VHDX_HEADERS:
        data = src.exact(offset, 80, "vhdx header")
        if data[:4] == b"head":
            sequence, version = struct.unpack_from("<Q", data, 8)[0], data[66] | data[67] << 8
            if newest is None or sequence > newest[0]:
                newest = (sequence, version)
    if newest is None:
        raise ImageError("vhdx has no valid header")
    if newest[1] != 1:
        raise ImageError(f"unsupported vhdx version {newest[1]}")


def _vhdx_regions(src: Source) -> dict[bytes, tuple[int, int]]:
    """The regions QEMU knows, by GUID; a required region it does not know makes it refuse."""
    data = src.exact(_VHDX_REGION_TABLE, 16, "vhdx region table")
    signature, _, count = struct.unpack_from("<4sII", data)
    if signature != b"regi":
        raise ImageError("vhdx region table has no signature")
    if count > _VHDX_MAX_ENTRIES:
        raise ImageError(f"vhdx region table has too many entries ({count})")
    table = src.exact(_VHDX_REGION_TABLE + 16, count * _VHDX_ENTRY.size, "vhdx region table")
    regions: dict[bytes, tuple[int, int]] = {}
    for guid, offset, length, required in _VHDX_ENTRY.iter_unpack(table):
        if guid not in (_VHDX_BAT, _VHDX_METADATA):
            if required & 1:
                raise ImageError("vhdx image requires a region QEMU does not know")
            continue
        if guid in regions:
            raise ImageError("vhdx region table lists a region twice")
        regions[guid] = (offset, length)
    return regions


def _vhdx_metadata(src: Source, offset: int, length: int) -> dict[bytes, tuple[int, int]]:
    """The metadata items by GUID, each (offset in the region, length), all inside the region."""
    data = src.exact(offset, 32, "vhdx metadata table")
    signature, _, count = struct.unpack_from("<8sHH", data)
    if signature != b"metadata":
        raise ImageError("vhdx metadata table has no signature")
    if count > _VHDX_MAX_ENTRIES or 32 + count * _VHDX_ITEM.size > length:
        raise ImageError(f"vhdx metadata table has too many entries ({count})")
    table = src.exact(offset + 32, count * _VHDX_ITEM.size, "vhdx metadata table")
    items: dict[bytes, tuple[int, int]] = {}
    for guid, item_off, item_len, _, _ in _VHDX_ITEM.iter_unpack(table):
        if item_off + item_len > length:
            raise ImageError("vhdx metadata item lies outside the metadata region")
        items.setdefault(guid, (item_off, item_len))
    return items


def _vhdx_item(
    src: Source, items: dict[bytes, tuple[int, int]], base: int, guid: bytes, what: str, width: int
) -> int:
    """One little-endian integer item of the metadata region that starts at ``base``."""
    if guid not in items:
        raise ImageError(f"vhdx metadata lacks the {what}")
    offset, length = items[guid]
    if length < width:
        raise ImageError(f"vhdx {what} item is too short")
    return int.from_bytes(src.exact(base + offset, width, f"vhdx {what}"), "little")
