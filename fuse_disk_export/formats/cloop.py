"""cloop version 2 (QEMU's block/cloop.c), which QEMU opens read-only."""

from __future__ import annotations

import struct

from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import READ_ONLY_DRIVER, SECTOR, ImageInfo, Source


def parse(src: Source, head: bytes) -> ImageInfo:
    """cloop version 2 (cloop_open): block size, block count, and the offsets table."""
    data = src.header(head, "cloop", 136)
    block_size, blocks = struct.unpack_from(">II", data, 128)
    if block_size == 0 or block_size % SECTOR or block_size > 64 * 1024 * 1024:
        raise ImageError(f"invalid cloop block size {block_size}")
    if blocks > (0xFFFFFFFF - 1) // 8 or (blocks + 1) * 8 > 512 * 1024 * 1024:
        raise ImageError(f"cloop image has too many blocks ({blocks})")
    end = int.from_bytes(src.exact(136 + blocks * 8, 8, "cloop offsets table"), "big")
    if end > src.size:
        raise src.past_end("cloop compressed data")
    return ImageInfo("cloop", blocks * block_size, read_only=READ_ONLY_DRIVER)
