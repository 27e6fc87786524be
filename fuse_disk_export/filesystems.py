"""Which filesystem a partition (or a whole disk) holds, from its superblock: pure and bounded.

The bytes come from a disk a guest could write to: they are read through a `BoundedReader` (a
few small reads, `MAX_PROBE_BYTES` in all) and only compared against magic numbers at fixed
places, with the fields checked that libblkid checks, so that we name what ``blkid -p`` names
(its TYPE values: ``vfat``, ``ntfs``, ``ext4``, ``crypto_LUKS``, ...) and a mount is attempted
only with the driver made for that filesystem.

`is_fat_boot_sector` and `is_ntfs_boot_sector` are what the MBR parser asks, as libblkid's does,
before it takes a sector that ends in 55 AA for a partition table: a FAT or NTFS volume boot
record (a USB stick formatted whole) ends in 55 AA too.
"""

import struct
import zlib
from collections.abc import Callable

from fuse_disk_export.bounded import BoundedReader, ReadFailed, ReadRefused

#: Most bytes `identify` reads from one device, all reads together.
MAX_PROBE_BYTES = 64 * 1024

#: Reads ``length`` bytes at ``offset`` (fewer at the end of the device).
Read = Callable[[int, int], bytes]


class _Device:
    """The bounded reads of one probe; a refused read reads as nothing."""

    def __init__(self, read: Read, size: int) -> None:
        self._reader = BoundedReader(read, size, MAX_PROBE_BYTES, clip=True)
        self._cache: dict[tuple[int, int], bytes] = {}

    @property
    def size(self) -> int:
        return self._reader.size

    def read(self, offset: int, length: int) -> bytes:
        key = (offset, length)
        if key not in self._cache:
            try:
                self._cache[key] = self._reader.read(offset, length)
            except ReadFailed as e:
                raise e.error from None
            except ReadRefused:
                self._cache[key] = b""
        return self._cache[key]


def _u8(data: bytes, at: int) -> int:
    return data[at] if len(data) > at else -1


def _u16(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<H", data, at)[0]) if len(data) >= at + 2 else -1


def _u32(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", data, at)[0]) if len(data) >= at + 4 else -1


def _u64(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<Q", data, at)[0]) if len(data) >= at + 8 else -1


def _power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- FAT (libblkid's superblocks/vfat.c) -------------------------------------------------------

_FAT12_MAX, _FAT16_MAX, _FAT32_MAX = 0xFF4, 0xFFF4, 0x0FFFFFF6


def _fat_magic(boot: bytes) -> str | None:
    """Which of libblkid's FAT magics the sector has: "string", "weak" (a jump or 55 AA only)."""
    if boot[0x52:0x57] == b"MSWIN" or boot[0x52:0x5A] == b"FAT32   ":
        return "string"
    if boot[0x36:0x3B] == b"MSDOS" or boot[0x36:0x3E] in (b"FAT16   ", b"FAT12   ", b"FAT     "):
        return "string"
    if boot[:1] in (b"\xeb", b"\xe9") or boot[510:512] == b"\x55\xaa":
        return "weak"
    return None


def is_fat_boot_sector(boot: bytes) -> bool:
    """Whether a 512-byte sector 0 is a valid FAT boot sector, as libblkid's
    ``fat_valid_superblock`` decides (the BPB's counts, sizes and cluster count)."""
    if len(boot) < 512:
        return False
    magic = _fat_magic(boot)
    if magic is None:
        return False
    # Old floppies have no magic string, but do have the signature; OS/2 puts a FAT-like
    # pseudo-header in front of JFS and HPFS.
    if magic == "weak" and (
        boot[510:512] != b"\x55\xaa" or boot[0x36:0x3E] in (b"JFS     ", b"HPFS    ")
    ):
        return False
    fats, reserved, media, per_cluster = boot[0x10], _u16(boot, 0x0E), boot[0x15], boot[0x0D]
    if not fats or not reserved or not (media >= 0xF8 or media == 0xF0):
        return False
    if not _power_of_2(per_cluster):
        return False
    sector_size = _u16(boot, 0x0B)
    if not _power_of_2(sector_size) or not 512 <= sector_size <= 4096:
        return False
    return _fat_clusters(boot) is not None


def _fat_clusters(boot: bytes) -> int | None:
    sector_size, per_cluster = _u16(boot, 0x0B), boot[0x0D]
    sectors = _u16(boot, 0x13) or _u32(boot, 0x20)
    fat_length = _u16(boot, 0x16) or _u32(boot, 0x24)
    dir_sectors = (_u16(boot, 0x11) * 32 + sector_size - 1) // sector_size
    used = _u16(boot, 0x0E) + fat_length * boot[0x10] + dir_sectors
    # libblkid computes this in 32-bit unsigned arithmetic: an underflow wraps.
    clusters = ((sectors - used) & 0xFFFFFFFF) // per_cluster
    if _u16(boot, 0x16) == 0 and _u32(boot, 0x24):
        limit = _FAT32_MAX
    else:
        limit = _FAT16_MAX if clusters > _FAT12_MAX else _FAT12_MAX
    return clusters if clusters <= limit else None


def _is_fat(device: _Device, boot: bytes) -> bool:
    if not is_fat_boot_sector(boot):
        return False
    if _u16(boot, 0x16) == 0 and _u32(boot, 0x24):
        # FAT32: the FSInfo sector, when there is one, has its signatures or is all zeros.
        fsinfo = _u16(boot, 0x30)
        if fsinfo:
            info = device.read(fsinfo * _u16(boot, 0x0B), 512)
            if len(info) < 488:
                return False
            if info[:4] not in (b"RRaA", b"RRdA", bytes(4)) or info[484:488] not in (
                b"rrAa",
                bytes(4),
            ):
                return False
    return True


# --- NTFS (libblkid's superblocks/ntfs.c) -------------------------------------------------------


def _ntfs(device: _Device, boot: bytes) -> bool:
    if boot[3:11] != b"NTFS    ":
        return False
    sector_size = _u16(boot, 0x0B)
    if not 256 <= sector_size <= 4096 or not _power_of_2(sector_size):
        return False
    spc = boot[0x0D]
    if spc in (1, 2, 4, 8, 16, 32, 64, 128):
        per_cluster = spc
    elif 240 <= spc <= 249:
        per_cluster = 1 << (256 - spc)
    else:
        return False
    if sector_size * per_cluster > 2 * 1024 * 1024:
        return False
    # reserved sectors, root entries, sectors, sectors per FAT, large sectors and FATs are 0
    if _u16(boot, 0x0E) or _u16(boot, 0x11) or _u16(boot, 0x13) or _u16(boot, 0x16):
        return False
    if _u32(boot, 0x20) or boot[0x10]:
        return False
    per_record = struct.unpack_from("<b", boot, 0x40)[0]
    if not 0xE1 <= boot[0x40] <= 0xF7 and per_record not in (1, 2, 4, 8, 16, 32, 64):
        return False
    if per_record > 0:
        record = per_record * per_cluster * sector_size
    else:
        shift = -per_record
        if not 0 <= shift < 31:
            return False
        record = 1 << shift
    clusters = _u64(boot, 0x28) // per_cluster
    mft, mirror = _u64(boot, 0x30), _u64(boot, 0x38)
    if mft > clusters or mirror > clusters or record < 4:
        return False
    # The MFT's first record and that of $Volume (number 3) both begin with "FILE".
    at = mft * sector_size * per_cluster
    return device.read(at, 4) == b"FILE" and device.read(at + 3 * record, 4) == b"FILE"


def is_ntfs_boot_sector(boot: bytes, read: Read, size: int) -> bool:
    """Whether ``boot``, sector 0 of the device ``read`` reads, is an NTFS boot sector whose MFT
    is where it says, as libblkid's ``blkid_probe_is_ntfs`` decides (the MFT is read only when
    the boot sector passes)."""
    return _ntfs(_Device(read, size), boot)


# --- exFAT (libblkid's superblocks/exfat.c) ----------------------------------------------------


def _exfat(boot: bytes) -> bool:
    if boot[3:11] != b"EXFAT   " or boot[:3] != b"\xeb\x76\x90" or boot[510:512] != b"\x55\xaa":
        return False
    if any(boot[0x0B:0x40]):  # MustBeZero, where FAT keeps its BPB
        return False
    sector_shift, cluster_shift, fats = _u8(boot, 0x6C), _u8(boot, 0x6D), _u8(boot, 0x6E)
    return 9 <= sector_shift <= 12 and 0 <= cluster_shift <= 25 - sector_shift and fats in (1, 2)


# --- ext2/3/4 (libblkid's superblocks/ext.c) ---------------------------------------------------

_HAS_JOURNAL = 0x4
_JOURNAL_DEV = 0x8
_EXT2_RO_COMPAT = 0x1 | 0x2 | 0x4  # sparse_super, large_file, btree_dir
_EXT2_INCOMPAT = 0x2 | 0x10  # filetype, meta_bg
_EXT3_INCOMPAT = _EXT2_INCOMPAT | 0x4  # + recover
_TEST_FILESYS = 0x4


def _ext(device: _Device) -> str | None:
    sb = device.read(1024, 1024)
    if _u16(sb, 0x38) != 0xEF53:
        return None
    compat, incompat, ro_compat = _u32(sb, 0x5C), _u32(sb, 0x60), _u32(sb, 0x64)
    if incompat & _JOURNAL_DEV:
        return "jbd"
    beyond_ext3 = ro_compat & ~_EXT2_RO_COMPAT or incompat & ~_EXT3_INCOMPAT
    if compat & _HAS_JOURNAL:
        if not beyond_ext3:
            return "ext3"
    elif not (ro_compat & ~_EXT2_RO_COMPAT or incompat & ~_EXT2_INCOMPAT):
        return "ext2"
    if not beyond_ext3:
        return None  # no journal, but a feature ext2 lacks and ext3 has: libblkid names none
    return "ext4dev" if _u32(sb, 0x160) & _TEST_FILESYS else "ext4"


# --- the others ---------------------------------------------------------------------------------


def _xfs(head: bytes) -> bool:
    if head[:4] != b"XFSB" or len(head) < 8:
        return False
    block, sector, inode = struct.unpack(">I", head[4:8])[0], _be16(head, 102), _be16(head, 104)
    return (
        _power_of_2(block)
        and 512 <= block <= 65536
        and _power_of_2(sector)
        and 512 <= sector <= 32768
        and _power_of_2(inode)
        and 256 <= inode <= 2048
    )


def _be16(data: bytes, at: int) -> int:
    return int(struct.unpack_from(">H", data, at)[0]) if len(data) >= at + 2 else -1


def _squashfs(head: bytes) -> str | None:
    if head[:4] == b"hsqs":
        major = _u16(head, 28)
    elif head[:4] == b"sqsh":
        major = _be16(head, 28)
    else:
        return None
    if major == 4 and head[:4] == b"hsqs":
        return "squashfs"
    return "squashfs3" if 1 <= major <= 3 else None


def _swap(device: _Device) -> bool:
    for page in (4096, 8192, 16384, 32768, 65536):
        magic = device.read(page - 10, 10)
        if magic == b"SWAP-SPACE":
            return True
        if magic == b"SWAPSPACE2":
            # version 1, and a last page that lies past the header
            header = device.read(1024, 8)
            return _u32(header, 0) == 1 and _u32(header, 4) > 0
    return False


def _lvm_crc(data: bytes) -> int:
    # LVM's own CRC: the CRC-32 polynomial from 0xf597a6cf, with no final inversion.
    return ~zlib.crc32(data, ~0xF597A6CF & 0xFFFFFFFF) & 0xFFFFFFFF


def lvm2_label(read: Read, size: int) -> bool:
    """Whether an LVM2 physical volume label is in one of the first four sectors."""
    return _lvm2(_Device(read, size))


def _lvm2(device: _Device) -> bool:
    head = device.read(0, 2048)
    for sector in range(4):
        label = head[sector * 512 : sector * 512 + 512]
        if label[:8] != b"LABELONE" or label[24:32] != b"LVM2 001":
            continue
        if _u64(label, 8) != sector:
            continue
        if _lvm_crc(label[20:]) == _u32(label, 16):
            return True
    return False


def _iso9660(device: _Device) -> bool:
    descriptor = device.read(32 * 1024, 8)
    return descriptor[1:6] == b"CD001" and _u8(descriptor, 0) in (0, 1, 2, 255)


def _btrfs(device: _Device) -> bool:
    return device.read(64 * 1024 + 0x40, 8) == b"_BHRfS_M"


def identify(read: Read, size: int) -> str | None:
    """What ``blkid -p`` would name the content at the start of a ``size``-byte device that
    ``read`` reads (its TYPE: ``"vfat"``, ``"ext4"``, ``"crypto_LUKS"``, ... — the keys of
    `mountfs.drivers.FAMILIES`), or None.

    Reads at most `MAX_PROBE_BYTES`, never past ``size``.

    :raise OSError: what ``read`` raises.
    """
    device = _Device(read, size)
    head = device.read(0, 4096)
    if head[:6] == b"LUKS\xba\xbe" and head[6:8] in (b"\0\x01", b"\0\x02"):
        return "crypto_LUKS"
    if _lvm2(device):
        return "LVM2_member"
    if _xfs(head):
        return "xfs"
    squashfs = _squashfs(head)
    if squashfs:
        return squashfs
    ext = _ext(device)
    if ext:
        return ext
    if _btrfs(device):
        return "btrfs"
    if _iso9660(device):
        return "iso9660"
    boot = head[:512]
    if _exfat(boot):
        return "exfat"
    if _ntfs(device, boot):
        return "ntfs"
    if _is_fat(device, boot):
        return "vfat"
    if _swap(device):
        return "swap"
    return None
