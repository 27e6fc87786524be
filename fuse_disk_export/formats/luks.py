"""LUKS, versions 1 and 2 (QEMU's crypto/block-luks.c)."""

from __future__ import annotations

import struct
from typing import Final

from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import SECTOR, ImageInfo, Source, is_power_of_2

_LUKS1: Final = struct.Struct(">6sH32s32s32sII20s32sI40s")  # 208 bytes, then 8 key slots
_LUKS1_SLOT: Final = struct.Struct(">II32sII")  # 48 bytes
_LUKS1_HEADER: Final = _LUKS1.size + 8 * _LUKS1_SLOT.size  # 592
_LUKS_SLOT_ENABLED: Final = 0x00AC71F3
_LUKS_SLOT_DISABLED: Final = 0x0000DEAD
_LUKS_STRIPES: Final = 4000


def parse(src: Source, head: bytes) -> ImageInfo:
    """LUKS: the payload of version 1 starts at a sector the header names; version 2 is JSON."""
    version = int.from_bytes(head[6:8], "big") if len(head) >= 8 else 1
    if version == 2:
        return _parse_luks2(src, head)
    data = src.header(head, "luks", _LUKS1_HEADER)
    payload, key_bytes = _LUKS1.unpack_from(data)[5:7]
    if payload * SECTOR > src.size:
        raise src.past_end("luks payload offset")
    _check_luks1_slots(data, payload, key_bytes)
    return ImageInfo("luks", src.size - payload * SECTOR, encryption="luks")


def _check_luks1_slots(data: bytes, payload: int, key_bytes: int) -> None:
    """The key slot checks QEMU makes (qcrypto_block_luks_check_header)."""
    spans: list[tuple[int, int]] = []
    for i in range(8):
        active, iterations, _, start, stripes = _LUKS1_SLOT.unpack_from(
            data, _LUKS1.size + i * _LUKS1_SLOT.size
        )
        if stripes != _LUKS_STRIPES:
            raise ImageError(f"luks key slot {i} is corrupt ({stripes} stripes)")
        if active not in (_LUKS_SLOT_ENABLED, _LUKS_SLOT_DISABLED):
            raise ImageError(f"luks key slot {i} is corrupt (state 0x{active:08x})")
        if active == _LUKS_SLOT_ENABLED and iterations == 0:
            raise ImageError(f"luks key slot {i} has an iteration count of zero")
        length = -(-key_bytes * stripes // SECTOR)
        if start < -(-_LUKS1_HEADER // SECTOR):
            raise ImageError(f"luks key slot {i} overlaps the header")
        if start + length > payload:
            raise ImageError(f"luks key slot {i} overlaps the encrypted payload")
        for j, (other, other_len) in enumerate(spans):
            if start < other + other_len and other < start + length:
                raise ImageError(f"luks key slots {j} and {i} overlap")
        spans.append((start, length))


def _parse_luks2(src: Source, head: bytes) -> ImageInfo:
    """LUKS version 2: we check the binary header's size; the payload offset is in its JSON."""
    data = src.header(head, "luks", 4096)
    header_size = int.from_bytes(data[8:16], "big")
    if not (is_power_of_2(header_size) and 16 * 1024 <= header_size <= 4 * 1024 * 1024):
        raise ImageError(f"luks2 header size {header_size} is invalid")
    if header_size > src.size:
        raise src.past_end("luks2 header")
    return ImageInfo("luks", None, encryption="luks")
