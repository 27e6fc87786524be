"""QED (QEMU's block/qed.c)."""

from __future__ import annotations

import struct
from typing import Final

from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import (
    PATH_MAX,
    SECTOR,
    ImageInfo,
    Source,
    is_power_of_2,
    stored_name,
)

_QED: Final = struct.Struct("<4sIIIQQQQQII")  # 64 bytes
_QED_F_BACKING_FILE: Final = 0x01
_QED_F_BACKING_FORMAT_NO_PROBE: Final = 0x04
_QED_FEATURES: Final = 0x07


def parse(src: Source, head: bytes) -> ImageInfo:
    """QED (bdrv_qed_do_open): the header, its L1 table, its backing name."""
    data = src.header(head, "qed", _QED.size)
    cluster, table, header_clusters, features = _QED.unpack_from(data)[1:5]
    l1_off, image_size, boff, bsize = _QED.unpack_from(data)[7:]
    if features & ~_QED_FEATURES:
        raise ImageError(f"qed image uses unsupported features (0x{features & ~_QED_FEATURES:x})")
    if not (is_power_of_2(cluster) and 4096 <= cluster <= 64 * 1024 * 1024):
        raise ImageError(f"qed cluster size {cluster} is invalid")
    if not (is_power_of_2(table) and table <= 16):
        raise ImageError(f"qed table size {table} is invalid")
    entries = cluster * table // 8
    if image_size % SECTOR or image_size > entries * entries * cluster:
        raise ImageError(f"qed image size {image_size} is invalid")
    if header_clusters > 0xFFFFFFFF // cluster:
        raise ImageError("qed header size is too large")
    header_bytes = header_clusters * cluster
    if l1_off % cluster or l1_off < header_bytes:
        raise ImageError("qed L1 table offset is invalid")
    if l1_off + table * cluster > src.size:
        raise src.past_end("qed L1 table")
    backing = None
    if features & _QED_F_BACKING_FILE:
        if boff + bsize > header_bytes:
            raise ImageError("qed backing file name lies outside the header")
        if bsize > PATH_MAX:
            raise ImageError(f"qed backing file name is too long ({bsize} bytes)")
        backing = stored_name(src.exact(boff, bsize, "qed backing file name"))
    no_probe = bool(features & _QED_F_BACKING_FORMAT_NO_PROBE)
    return ImageInfo(
        "qed",
        image_size,
        backing_file=backing,
        backing_format="raw" if backing and no_probe else None,
    )
