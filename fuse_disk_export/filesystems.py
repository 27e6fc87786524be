"""Which filesystem a partition (or a whole disk) holds, from its superblock: pure and bounded.

The bytes come from a disk a guest could write to: they are read through a bounded callable and
only compared against magic numbers at fixed places, with the few fields a driver would reject
checked for sanity, so that a mount is attempted only with the driver made for that filesystem.
"""

import struct
from collections.abc import Callable
from typing import NamedTuple

#: The most bytes `probe` reads: the ISO 9660 volume descriptor at 32 KiB is the farthest.
PROBE_BYTES = 32 * 1024 + 2048

#: Reads ``length`` bytes at ``offset`` (fewer at the end of the device).
Read = Callable[[int, int], bytes]


class Driver(NamedTuple):
    """A userspace FUSE driver for one kind of filesystem."""

    fs: str
    program: str
    package: str
    #: Whether it writes safely (fuse2fs and ntfs-3g do; the others are read-only drivers, or
    #: write only experimentally).
    writes: bool
    #: Options that keep it in the foreground, so that it stays our child.
    foreground: tuple[str, ...]


DRIVERS: dict[str, Driver] = {
    "ext": Driver("ext", "fuse2fs", "fuse2fs", True, ("-f",)),
    "ntfs": Driver("ntfs", "ntfs-3g", "ntfs-3g", True, ("-o", "no_detach")),
    # fusefat writes only with "-o rw+", which its author calls experimental.
    "vfat": Driver("vfat", "fusefat", "fusefat", False, ("-f",)),
    "iso9660": Driver("iso9660", "fuseiso", "fuseiso", False, ("-n", "-f")),
    "squashfs": Driver("squashfs", "squashfuse", "squashfuse", False, ("-f",)),
}

#: Names a user may give with --fs-type, and what they mean.
FS_TYPES = {
    "ext2": "ext",
    "ext3": "ext",
    "ext4": "ext",
    "ext": "ext",
    "ntfs": "ntfs",
    "vfat": "vfat",
    "fat": "vfat",
    "iso9660": "iso9660",
    "squashfs": "squashfs",
}


def _u16le(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<H", data, at)[0]) if len(data) >= at + 2 else -1


def _is_fat(boot: bytes) -> bool:
    if len(boot) < 512 or boot[510:512] != b"\x55\xaa":
        return False
    if boot[54:62] not in (b"FAT12   ", b"FAT16   ", b"FAT     ") and boot[82:90] != b"FAT32   ":
        return False
    sector = _u16le(boot, 11)
    per_cluster = boot[13]
    return sector in (512, 1024, 2048, 4096) and per_cluster in (1, 2, 4, 8, 16, 32, 64, 128)


def _is_ext(data: bytes) -> bool:
    # The superblock is at 1024; s_magic at 56 within it; s_log_block_size at 24 (0..6: 1-64 KiB).
    if _u16le(data, 1024 + 56) != 0xEF53:
        return False
    log_block = struct.unpack_from("<I", data, 1024 + 24)[0]
    return int(log_block) <= 6


def probe(read: Read) -> str | None:
    """The filesystem at the start of the device ``read`` reads ("ext", "ntfs", "vfat",
    "exfat", "iso9660", "squashfs"), or None when none is recognised."""
    head = read(0, 4096)
    if head[:4] == b"hsqs":
        return "squashfs"
    if head[3:11] == b"NTFS    " and head[510:512] == b"\x55\xaa":
        return "ntfs"
    if head[3:11] == b"EXFAT   ":
        return "exfat"
    if _is_fat(head):
        return "vfat"
    if len(head) >= 2048 and _is_ext(head):
        return "ext"
    iso = read(32 * 1024, 2048)
    if len(iso) >= 7 and iso[1:6] == b"CD001" and iso[0] in (0, 1, 2, 255):
        return "iso9660"
    return None
