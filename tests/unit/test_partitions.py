"""Unit and property tests of fuse_disk_export.partitions, on partition tables built in memory."""

from __future__ import annotations

import itertools
import struct
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fuse_disk_export.errors import PartitionError
from fuse_disk_export.partitions import (
    MAX_GPT_ENTRIES,
    MAX_LOGICAL_PARTITIONS,
    MAX_READ,
    MAX_TABLE_BYTES,
    TABLE_HEADINGS,
    Partition,
    PartitionTable,
    format_table,
    read_table,
)

S = 512
MiB = 1024 * 1024
LINUX = "0fc63daf-8483-4772-8e79-3d69d8477de4"
ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"


# --- an in-memory disk ---------------------------------------------------------------------------


class Disk:
    """A sparse disk in memory: zeros except where written; records every read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pieces: dict[int, bytearray] = {}
        self.reads: list[tuple[int, int]] = []

    def write(self, offset: int, data: bytes) -> None:
        assert offset >= 0 and offset + len(data) <= self.size
        self.pieces[offset] = bytearray(data)

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        assert offset >= 0 and length > 0 and offset + length <= self.size, (offset, length)
        out = bytearray(length)
        for start, piece in self.pieces.items():
            lo, hi = max(start, offset), min(start + len(piece), offset + length)
            if lo < hi:
                out[lo - offset : hi - offset] = piece[lo - start : hi - start]
        return bytes(out)

    def table(self, sector_size: int = S) -> PartitionTable:
        return read_table(self.read, self.size, sector_size=sector_size)


def mbr(
    entries: Sequence[tuple[int, int, int] | tuple[int, int, int, int]], *, sig: bool = True
) -> bytes:
    """An MBR/EBR sector from (type, lba, sectors[, status]) entries, at most four."""
    sector = bytearray(S)
    for slot, entry in enumerate(entries):
        type_, lba, count = entry[:3]
        status = entry[3] if len(entry) == 4 else 0
        struct.pack_into("<B3sB3sII", sector, 446 + 16 * slot, status, b"", type_, b"", lba, count)
    if sig:
        sector[510:512] = b"\x55\xaa"
    return bytes(sector)


@dataclass
class Logical:
    ebr: int  # absolute sector of its EBR
    rel: int  # start relative to its EBR
    sectors: int
    type: int = 0x83


def mbr_disk(
    size: int,
    primaries: Sequence[tuple[int, int, int]],
    logicals: Sequence[Logical] = (),
    *,
    ext_slot: int | None = None,
    links: Sequence[int | None] | None = None,
) -> Disk:
    """A disk with an MBR and, if `logicals`, an EBR chain in the extended primary `ext_slot`.

    `links` overrides each EBR's link (relative to the extended start; None = end of chain).
    """
    disk = Disk(size)
    disk.write(0, mbr(primaries))
    if logicals:
        assert ext_slot is not None
        ext_start = primaries[ext_slot][1]
        for i, log in enumerate(logicals):
            entries: list[tuple[int, int, int]] = [(log.type, log.rel, log.sectors)]
            link: int | None
            if links is not None:
                link = links[i]
            else:
                link = logicals[i + 1].ebr - ext_start if i + 1 < len(logicals) else None
            if link is not None:
                entries.append((0x05, link, 100))
            disk.write(log.ebr * S, mbr(entries))
    return disk


@dataclass
class GptPart:
    first: int
    last: int
    name: str = ""
    type: str = LINUX
    index: int | None = None


def gpt_array(parts: Iterable[GptPart], num_entries: int, entry_size: int) -> bytes:
    array = bytearray(num_entries * entry_size)
    for i, part in enumerate(parts):
        index = i if part.index is None else part.index
        struct.pack_into(
            "<16s16sQQQ72s",
            array,
            index * entry_size,
            uuid.UUID(part.type).bytes_le,
            uuid.uuid4().bytes_le,
            part.first,
            part.last,
            0,
            part.name.encode("utf-16-le"),
        )
    return bytes(array)


def gpt_header(
    *,
    my_lba: int,
    alt_lba: int,
    first_usable: int,
    last_usable: int,
    entries_lba: int,
    num_entries: int,
    entry_size: int,
    array: bytes,
    sector_size: int = S,
) -> bytes:
    fields = [
        b"EFI PART",
        0x10000,
        92,
        0,
        0,
        my_lba,
        alt_lba,
        first_usable,
        last_usable,
        uuid.uuid4().bytes_le,
        entries_lba,
        num_entries,
        entry_size,
        zlib.crc32(array),
    ]
    header = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", *fields))
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    return bytes(header) + bytes(sector_size - len(header))


def gpt_disk(
    size: int,
    parts: Sequence[GptPart],
    *,
    num_entries: int = 128,
    entry_size: int = 128,
    sector_size: int = S,
    mbr_entries: Sequence[tuple[int, int, int]] | None = None,
) -> Disk:
    """A disk with a protective MBR, a primary and a backup GPT."""
    ss = sector_size
    sectors = size // ss
    array = gpt_array(parts, num_entries, entry_size)
    array_sectors = -(-len(array) // ss)
    first_usable = 2 + array_sectors
    last_usable = sectors - 2 - array_sectors
    disk = Disk(size)
    disk.write(0, mbr(mbr_entries or [(0xEE, 1, min(sectors - 1, 0xFFFFFFFF))]))
    common = dict(
        first_usable=first_usable,
        last_usable=last_usable,
        num_entries=num_entries,
        entry_size=entry_size,
        array=array,
        sector_size=ss,
    )
    disk.write(ss, gpt_header(my_lba=1, alt_lba=sectors - 1, entries_lba=2, **common))  # type: ignore[arg-type]
    disk.write(2 * ss, array)
    backup_array_lba = sectors - 1 - array_sectors
    disk.write(backup_array_lba * ss, array)
    disk.write(
        (sectors - 1) * ss,
        gpt_header(my_lba=sectors - 1, alt_lba=1, entries_lba=backup_array_lba, **common),  # type: ignore[arg-type]
    )
    return disk


def refresh_crcs(disk: Disk, header_offset: int, sector_size: int = S) -> None:
    """Recompute the entry-array and header CRCs of the GPT header at `header_offset`, so that a
    mutated table gets past the CRC checks and exercises the checks behind them."""
    header = bytearray(disk.read(header_offset, sector_size))
    (header_size,) = struct.unpack_from("<I", header, 12)
    entries_lba, num_entries, entry_size = struct.unpack_from("<QII", header, 72)
    array_size = num_entries * entry_size
    if 0 < array_size <= 2 * MiB and (entries_lba * sector_size + array_size) <= disk.size:
        array = disk.read(entries_lba * sector_size, array_size)
        struct.pack_into("<I", header, 88, zlib.crc32(array))
    if 92 <= header_size <= sector_size:
        header[16:20] = bytes(4)
        struct.pack_into("<I", header, 16, zlib.crc32(header[:header_size]))
    disk.write(header_offset, bytes(header))
    disk.reads.clear()


def p(
    number: int, start_sector: int, sectors: int, type_: str, name: str = "", scheme: str = "mbr"
) -> Partition:
    return Partition(number, start_sector * S, sectors * S, type_, name, scheme)


# --- the standard images -------------------------------------------------------------------------

# Slot 1: primary, slot 2: extended (sectors 8192-24575) with logicals 5 and 6, slot 3 empty,
# slot 4: primary.
EXT = (0x05, 8192, 16384)
STANDARD_LOGICALS = [Logical(8192, 2048, 2048), Logical(14336, 2048, 4096, 0x82)]


def standard_mbr(ext_type: int = 0x05) -> Disk:
    return mbr_disk(
        16 * MiB,
        [(0x83, 2048, 4096), (ext_type, 8192, 16384), (0, 0, 0), (0x07, 24576, 4096)],
        STANDARD_LOGICALS,
        ext_slot=1,
    )


def standard_gpt(*, num_entries: int = 128) -> Disk:
    parts = [
        GptPart(2048, 4095, "EFI system", ESP),
        GptPart(4096, 8191, "β-zwei"),
        GptPart(8192, 16383, "", index=4),
    ]
    return gpt_disk(16 * MiB, parts, num_entries=num_entries)


# --- MBR -----------------------------------------------------------------------------------------


def test_no_signature_means_no_table() -> None:
    disk = Disk(MiB)
    disk.write(0, mbr([(0x83, 2048, 100)], sig=False))
    table = disk.table()
    assert table == PartitionTable("none", 512, ())
    with pytest.raises(
        PartitionError, match=r"^no partition 1 \(the disk has no partition table\)$"
    ):
        table.get(1)


def test_disk_smaller_than_a_sector_has_no_table() -> None:
    disk = Disk(100)
    assert disk.table().scheme == "none"
    assert disk.reads == []


def test_filesystem_boot_sector_is_not_a_table() -> None:
    # A FAT superfloppy ends in 55 AA too, but has boot code where the entries would be.
    sector = bytearray(mbr([(0x83, 2048, 100)]))
    sector[446:510] = b"This is not a bootable disk. Please insert a bootable floppy ...."[:64]
    disk = Disk(MiB)
    disk.write(0, bytes(sector))
    assert disk.table().scheme == "none"


def fat_vbr() -> bytes:
    """mkfs.fat's boot sector of a 64 MiB disk: zeros where an MBR's entries would be."""
    sector = bytearray(S)
    sector[:3] = b"\xeb\x3c\x90"
    struct.pack_into("<HBHBHHBH", sector, 11, 512, 4, 4, 2, 512, 0, 0xF8, 128)
    struct.pack_into("<I", sector, 0x20, 131072)
    sector[0x36:0x3E] = b"FAT16   "
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def test_fat_boot_sector_with_zero_entries_is_not_a_table() -> None:
    # fdisk and sfdisk see an empty "dos" table here; libblkid (and we) see FAT.
    disk = Disk(64 * MiB)
    disk.write(0, fat_vbr())
    assert disk.table() == PartitionTable("none", 512, ())
    broken = bytearray(fat_vbr())
    broken[0x10] = 0  # no FATs: not a valid BPB, so the sector is an (empty) MBR
    disk.write(0, bytes(broken))
    assert disk.table() == PartitionTable("mbr", 512, ())


def test_ntfs_boot_sector_is_not_a_table() -> None:
    disk = Disk(64 * MiB)
    sector = bytearray(S)
    sector[3:11] = b"NTFS    "
    struct.pack_into("<HB", sector, 11, 512, 8)
    sector[0x15] = 0xF8
    struct.pack_into("<QQQb", sector, 0x28, 131071, 4, 8, -10)
    sector[510:512] = b"\x55\xaa"
    disk.write(0, bytes(sector))
    # Without its MFT where the boot sector says, it is not NTFS (as libblkid decides).
    assert disk.table().scheme == "mbr"
    disk.write(4 * 4096, b"FILE")
    disk.write(4 * 4096 + 3 * 1024, b"FILE")
    assert disk.table().scheme == "none"


def test_lvm_behind_an_empty_mbr_is_not_a_table() -> None:
    disk = Disk(MiB)
    disk.write(0, mbr([]))
    label = bytearray(S)
    label[:8] = b"LABELONE"
    struct.pack_into("<Q", label, 8, 1)
    label[24:32] = b"LVM2 001"
    crc = ~zlib.crc32(bytes(label[20:]), ~0xF597A6CF & 0xFFFFFFFF) & 0xFFFFFFFF
    struct.pack_into("<I", label, 16, crc)
    disk.write(S, bytes(label))
    assert disk.table().scheme == "none"
    disk.write(0, mbr([(0x83, 8, 100)]))
    assert disk.table().scheme == "mbr", "a table with partitions is a table"


def test_a_gpt_protective_entry_wins_over_a_fat_bpb() -> None:
    # libblkid's order: a 0xEE entry means GPT before the FAT check is made.
    sector = bytearray(fat_vbr())
    sector[446:462] = struct.pack("<B3sB3sII", 0, b"", 0xEE, b"", 1, 2047)
    disk = Disk(MiB)
    disk.write(0, bytes(sector))
    with pytest.raises(PartitionError, match=r"^GPT: "):
        disk.table()


@pytest.mark.parametrize("ext_type", [0x05, 0x0F, 0x85])
def test_mbr_primary_extended_and_logicals(ext_type: int) -> None:
    table = standard_mbr(ext_type).table()
    assert table.scheme == "mbr"
    assert table.sector_size == 512
    assert table.partitions == (
        p(1, 2048, 4096, "0x83"),
        p(4, 24576, 4096, "0x07"),
        p(5, 8192 + 2048, 2048, "0x83"),
        p(6, 14336 + 2048, 4096, "0x82"),
    )
    assert table.get(6).start == 16384 * 512
    with pytest.raises(PartitionError, match=r"^no partition 2 \(the table has: 1, 4, 5, 6\)$"):
        table.get(2)  # the extended container is not a usable partition
    with pytest.raises(PartitionError, match=r"^no partition 3 \(the table has: 1, 4, 5, 6\)$"):
        table.get(3)


def test_mbr_empty_table() -> None:
    disk = Disk(MiB)
    disk.write(0, mbr([]))
    table = disk.table()
    assert table == PartitionTable("mbr", 512, ())
    with pytest.raises(PartitionError, match=r"\(the table has no partitions\)"):
        table.get(1)


def test_zero_length_entries_are_ignored() -> None:
    disk = mbr_disk(MiB, [(0x83, 100, 0), (0x83, 200, 100), (0, 300, 100)])
    assert disk.table().partitions == (p(2, 200, 100, "0x83"),)


def test_partition_may_start_at_sector_zero() -> None:
    # isohybrid images: partition 1 covers the whole ISO, MBR included.
    disk = mbr_disk(MiB, [(0x17, 0, 2048)])
    assert disk.table().partitions == (p(1, 0, 2048, "0x17"),)


def test_mbr_partition_past_end_of_disk() -> None:
    disk = mbr_disk(MiB, [(0x83, 1, 100), (0x83, 2048, 1)])
    with pytest.raises(PartitionError) as info:
        disk.table()
    assert str(info.value) == (
        "MBR: partition 2 (start 1048576, size 512) extends past the end of the disk "
        "(1048576 bytes)"
    )


def test_mbr_extended_past_end_of_disk() -> None:
    disk = mbr_disk(MiB, [(0x05, 1000, 2000)])
    with pytest.raises(PartitionError, match=r"^MBR: extended partition 1 \(start 512000"):
        disk.table()


def test_mbr_overlapping_primaries() -> None:
    disk = mbr_disk(MiB, [(0x83, 100, 100), (0x83, 300, 10), (0x83, 199, 50)])
    with pytest.raises(PartitionError, match=r"^MBR: partitions 1 and 3 overlap$"):
        disk.table()


def test_mbr_primary_overlapping_extended() -> None:
    disk = mbr_disk(16 * MiB, [(0x83, 2048, 8000), EXT], STANDARD_LOGICALS, ext_slot=1)
    with pytest.raises(PartitionError, match=r"^MBR: partitions 1 and 2 overlap$"):
        disk.table()


def test_mbr_two_extended_partitions() -> None:
    disk = mbr_disk(MiB, [(0x05, 100, 100), (0x0F, 300, 100)])
    with pytest.raises(PartitionError, match="1 and 2 are both extended"):
        disk.table()


def test_mbr_overlapping_logicals() -> None:
    logicals = [Logical(8192, 14000, 1000), Logical(20000, 1, 4000)]
    disk = mbr_disk(16 * MiB, [EXT], logicals, ext_slot=0)
    with pytest.raises(PartitionError, match=r"^MBR: partitions 5 and 6 overlap$"):
        disk.table()


def test_mbr_logical_outside_extended() -> None:
    logicals = [Logical(8192, 2048, 2048), Logical(14336, 2048, 9000)]
    disk = mbr_disk(16 * MiB, [EXT], logicals, ext_slot=0)
    with pytest.raises(
        PartitionError,
        match=r"^MBR: logical partition 6 \(start 8388608, size "
        r"4608000\) lies outside the extended partition \(sectors 8192-24575\)$",
    ):
        disk.table()


def test_mbr_logical_over_its_own_ebr() -> None:
    disk = mbr_disk(16 * MiB, [EXT], [Logical(8192, 0, 100)], ext_slot=0)
    with pytest.raises(
        PartitionError, match="logical partition 5 overlaps its own EBR at sector 8192"
    ):
        disk.table()


def test_mbr_ebr_inside_a_logical() -> None:
    logicals = [Logical(8192, 1, 10000), Logical(9000, 1, 100)]
    disk = mbr_disk(16 * MiB, [EXT], logicals, ext_slot=0)
    with pytest.raises(PartitionError, match="the EBR at sector 9000 lies inside partition 5"):
        disk.table()


@pytest.mark.parametrize(("links", "sector"), [([6144, 0], 8192), ([6144, 6144], 14336)])
def test_mbr_looping_chain(links: list[int | None], sector: int) -> None:
    disk = mbr_disk(16 * MiB, [EXT], STANDARD_LOGICALS, ext_slot=0, links=links)
    with pytest.raises(
        PartitionError, match=rf"^MBR: extended partition chain loops at sector {sector}$"
    ):
        disk.table()


def test_mbr_chain_link_outside_extended() -> None:
    disk = mbr_disk(16 * MiB, [EXT], STANDARD_LOGICALS, ext_slot=0, links=[6144, 20000])
    with pytest.raises(
        PartitionError, match=r"links to sector 28192, outside the extended partition"
    ):
        disk.table()


def test_mbr_chain_too_long() -> None:
    count = MAX_LOGICAL_PARTITIONS + 5
    logicals = [Logical(8192 + 2 * i, 1, 1) for i in range(count)]
    disk = mbr_disk(16 * MiB, [(0x05, 8192, 2 * count)], logicals, ext_slot=0)
    with pytest.raises(PartitionError, match=f"longer than {MAX_LOGICAL_PARTITIONS} links"):
        disk.table()
    assert len(disk.reads) == 1 + MAX_LOGICAL_PARTITIONS


def test_mbr_longest_chain_accepted() -> None:
    count = MAX_LOGICAL_PARTITIONS
    logicals = [Logical(8192 + 2 * i, 1, 1) for i in range(count)]
    disk = mbr_disk(16 * MiB, [(0x05, 8192, 2 * count)], logicals, ext_slot=0)
    numbers = [part.number for part in disk.table().partitions]
    assert numbers == list(range(5, 5 + count))


def test_mbr_extended_without_ebr_is_empty() -> None:
    disk = mbr_disk(16 * MiB, [(0x83, 2048, 100), EXT])
    assert disk.table().partitions == (p(1, 2048, 100, "0x83"),)


def test_mbr_chain_link_to_sector_without_ebr() -> None:
    disk = mbr_disk(16 * MiB, [EXT], STANDARD_LOGICALS[:1], ext_slot=0, links=[6144])
    with pytest.raises(PartitionError, match="links to sector 14336, which holds no EBR"):
        disk.table()


def test_ebr_without_logical_consumes_no_number() -> None:
    # Linux numbers only the logical partitions it finds.
    logicals = [Logical(8192, 1, 100, type=0), Logical(14336, 1, 100)]
    disk = mbr_disk(16 * MiB, [EXT], logicals, ext_slot=0)
    assert disk.table().partitions == (p(5, 14337, 100, "0x83"),)


def test_mbr_with_4k_sectors() -> None:
    disk = Disk(64 * MiB)
    disk.write(0, mbr([(0x83, 256, 1024), (0x05, 2048, 4096)]))
    disk.write(2048 * 4096, mbr([(0x83, 256, 256)]))
    table = disk.table(sector_size=4096)
    assert [(x.number, x.start, x.size) for x in table.partitions] == [
        (1, 256 * 4096, 1024 * 4096),
        (5, 2304 * 4096, 256 * 4096),
    ]


# --- GPT -----------------------------------------------------------------------------------------


def test_gpt_with_names() -> None:
    table = standard_gpt().table()
    assert table.scheme == "gpt"
    assert table.partitions == (
        p(1, 2048, 2048, ESP, "EFI system", "gpt"),
        p(2, 4096, 4096, LINUX, "β-zwei", "gpt"),
        p(5, 8192, 8192, LINUX, "", "gpt"),
    )
    with pytest.raises(PartitionError, match=r"^no partition 3 \(the table has: 1, 2, 5\)$"):
        table.get(3)


def test_gpt_hybrid_mbr_means_gpt() -> None:
    disk = gpt_disk(
        16 * MiB, [GptPart(2048, 4095)], mbr_entries=[(0x83, 2048, 2048), (0xEE, 1, 2047)]
    )
    table = disk.table()
    assert table.scheme == "gpt"
    assert table.partitions == (p(1, 2048, 2048, LINUX, "", "gpt"),)


def test_gpt_empty() -> None:
    table = gpt_disk(MiB, []).table()
    assert table == PartitionTable("gpt", 512, ())


def test_gpt_4k_sectors() -> None:
    parts = [GptPart(256, 511, "four-k")]
    disk = gpt_disk(64 * MiB, parts, sector_size=4096)
    table = disk.table(sector_size=4096)
    assert table.partitions == (Partition(1, 256 * 4096, 256 * 4096, LINUX, "four-k", "gpt"),)


def test_gpt_name_with_control_and_lone_surrogate() -> None:
    name_bytes = "a\x1bb".encode("utf-16-le") + b"\x00\xd8" + "c".encode("utf-16-le")
    disk = standard_gpt()
    array = bytearray(disk.read(2 * S, 128 * 128))
    array[56 : 56 + 72] = name_bytes.ljust(72, b"\0")
    for offset in (2 * S, disk.size - S - len(array)):
        disk.write(offset, bytes(array))
    refresh_crcs(disk, S)
    table = disk.table()
    assert table.get(1).name == "a\x1bb\ufffdc"
    assert format_table(table)[0] == ("1", "1048576", "1048576", ESP, "a\\x1bb\ufffdc")


def corrupt(disk: Disk, offset: int) -> None:
    data = bytearray(disk.read(offset, 1))
    data[0] ^= 0xFF
    old = bytearray(disk.read(offset - offset % S, S))
    old[offset % S] = data[0]
    disk.write(offset - offset % S, bytes(old))
    disk.reads.clear()


def test_gpt_bad_primary_header_crc_falls_back_to_backup() -> None:
    disk = standard_gpt()
    good = disk.table()
    corrupt(disk, S + 40)  # first usable LBA, under the header CRC
    assert disk.table() == good


def test_gpt_bad_primary_array_crc_falls_back_to_backup() -> None:
    disk = standard_gpt()
    good = disk.table()
    corrupt(disk, 2 * S + 33)
    assert disk.table() == good


def test_gpt_both_headers_bad() -> None:
    disk = standard_gpt()
    corrupt(disk, S + 40)
    corrupt(disk, disk.size - S + 40)
    with pytest.raises(
        PartitionError,
        match=r"^GPT: header CRC mismatch \(and the backup header: "
        r"header CRC mismatch at sector 32767\)$",
    ):
        disk.table()


def test_gpt_both_arrays_bad() -> None:
    disk = standard_gpt()
    corrupt(disk, 2 * S + 33)
    corrupt(disk, disk.size - S - 128 * 128 + 33)
    with pytest.raises(PartitionError, match=r"^GPT: partition entry array CRC mismatch"):
        disk.table()


def test_gpt_protective_mbr_without_gpt() -> None:
    disk = Disk(MiB)
    disk.write(0, mbr([(0xEE, 1, 2047)]))
    with pytest.raises(
        PartitionError,
        match=r"^GPT: no primary header at sector 1 \(and the "
        r"backup header: no backup header at sector 2047\)$",
    ):
        disk.table()


def test_gpt_disk_too_small() -> None:
    disk = Disk(1024)
    disk.write(0, mbr([(0xEE, 1, 1)]))
    with pytest.raises(PartitionError, match="too small"):
        disk.table()


def gpt_with(parts: Sequence[GptPart]) -> Disk:
    return gpt_disk(MiB, parts)


def test_gpt_partition_outside_usable_area() -> None:
    disk = gpt_with([GptPart(34, 100), GptPart(200, 300), GptPart(2000, 2047)])
    with pytest.raises(PartitionError) as info:
        disk.table()
    assert str(info.value) == (
        "GPT: partition 3 lies outside the usable area "
        "(it has sectors 2000-2047, the usable area is sectors 34-2014)"
    )


def test_gpt_partition_over_entries() -> None:
    with pytest.raises(PartitionError, match="GPT: partition 1 lies outside the usable area"):
        gpt_with([GptPart(33, 100)]).table()


def test_gpt_partition_ends_before_start() -> None:
    with pytest.raises(PartitionError, match=r"partition 1 ends \(sector 99\) before it starts"):
        gpt_with([GptPart(100, 99)]).table()


def test_gpt_overlap() -> None:
    disk = gpt_with([GptPart(34, 100), GptPart(300, 400), GptPart(100, 200)])
    with pytest.raises(PartitionError, match=r"^GPT: partitions 1 and 3 overlap$"):
        disk.table()


def test_gpt_single_sector_partitions_touching() -> None:
    disk = gpt_with([GptPart(34, 34), GptPart(35, 35)])
    assert [(x.start, x.size) for x in disk.table().partitions] == [(34 * S, S), (35 * S, S)]


def set_header_field(disk: Disk, fmt: str, offset: int, value: int) -> None:
    for header_offset in (S, disk.size - S):
        header = bytearray(disk.read(header_offset, S))
        struct.pack_into(fmt, header, offset, value)
        disk.write(header_offset, bytes(header))
        refresh_crcs(disk, header_offset)


def test_gpt_too_many_entries() -> None:
    disk = standard_gpt()
    set_header_field(disk, "<I", 80, MAX_GPT_ENTRIES + 1)
    with pytest.raises(PartitionError, match=f"declares {MAX_GPT_ENTRIES + 1} entries"):
        disk.table()


@pytest.mark.parametrize("entry_size", [0, 64, 130, 1 << 31])
def test_gpt_bad_entry_size(entry_size: int) -> None:
    disk = standard_gpt()
    set_header_field(disk, "<I", 84, entry_size)
    with pytest.raises(PartitionError, match=f"invalid entry size \\({entry_size}\\)"):
        disk.table()


def test_gpt_usable_area_past_end_of_disk() -> None:
    disk = standard_gpt()
    set_header_field(disk, "<Q", 48, disk.size // S)
    with pytest.raises(PartitionError, match="does not fit the disk"):
        disk.table()


def test_gpt_largest_array_reads_in_bounded_pieces() -> None:
    disk = gpt_disk(
        16 * MiB, [GptPart(4096, 8191, "big")], num_entries=MAX_GPT_ENTRIES, entry_size=1024
    )
    assert disk.table().get(1).name == "big"
    assert max(length for _, length in disk.reads) <= MAX_READ
    assert sum(length for _, length in disk.reads) <= MAX_TABLE_BYTES


def test_gpt_larger_entries_keep_index_numbering() -> None:
    disk = gpt_disk(16 * MiB, [GptPart(4096, 8191, "x", index=7)], num_entries=16, entry_size=256)
    assert disk.table().partitions == (p(8, 4096, 4096, LINUX, "x", "gpt"),)


# --- reading -------------------------------------------------------------------------------------


def test_read_oserror_becomes_partition_error() -> None:
    def read(offset: int, length: int) -> bytes:
        raise OSError(5, "Input/output error")

    with pytest.raises(
        PartitionError, match=r"^MBR: cannot read the MBR at byte 0: Input/output error$"
    ):
        read_table(read, MiB)


def test_short_read_becomes_partition_error() -> None:
    with pytest.raises(PartitionError, match="short read of the MBR at byte 0: 10 of 512 bytes"):
        read_table(lambda offset, length: bytes(10), MiB)


def test_bad_sector_size_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="sector size"):
        read_table(lambda offset, length: bytes(length), MiB, sector_size=500)


def test_format_table() -> None:
    rows = format_table(standard_mbr().table())
    assert len(TABLE_HEADINGS) == 5
    assert rows == [
        ("1", "1048576", "2097152", "0x83", ""),
        ("4", "12582912", "2097152", "0x07", ""),
        ("5", "5242880", "1048576", "0x83", ""),
        ("6", "8388608", "2097152", "0x82", ""),
    ]
    assert format_table(PartitionTable("none", 512, ())) == []


# --- properties ----------------------------------------------------------------------------------


def check_outcome(disk: Disk, sector_size: int = S) -> PartitionTable | None:
    """read_table returns a sound table or raises PartitionError; its reads respect the bounds."""
    disk.reads.clear()
    table: PartitionTable | None
    try:
        found = disk.table(sector_size)
    except PartitionError as exc:
        assert str(exc).startswith(("MBR: ", "GPT: ")), str(exc)
        # Digits removed so that --hypothesis-show-statistics groups the errors by kind.
        event("error: " + "".join(ch for ch in str(exc) if not ch.isdigit())[:60])
        table = None
    else:
        table = found
        assert table.scheme in ("none", "mbr", "gpt")
        numbers = [part.number for part in table.partitions]
        assert len(set(numbers)) == len(numbers)
        for part in table.partitions:
            assert part.scheme == table.scheme
            assert part.number >= 1
            assert part.size > 0 and part.start >= 0 and part.end <= disk.size
        spans = sorted((part.start, part.end) for part in table.partitions)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
        format_table(table)
        event(f"table: {table.scheme}, {len(table.partitions)} partitions")
    assert all(length <= MAX_READ for _, length in disk.reads)
    assert sum(length for _, length in disk.reads) <= MAX_TABLE_BYTES
    return table


def mutate(disk: Disk, changes: Iterable[tuple[int, int, int]]) -> None:
    """Apply (piece index, offset in piece, byte) changes to the table sectors of `disk`."""
    keys = sorted(disk.pieces)
    for which, offset, value in changes:
        piece = disk.pieces[keys[which % len(keys)]]
        piece[offset % len(piece)] = value


# Offsets weighted towards the MBR entries and the GPT header fields, where parsing decisions are.
offsets = st.one_of(st.integers(446, 511), st.integers(0, 95), st.integers(0, 2**16))
byte_changes = st.lists(st.tuples(st.integers(0, 64), offsets, st.integers(0, 255)), max_size=12)
interesting_u32 = st.one_of(
    st.sampled_from([0, 1, 2, 33, 34, 2047, 2048, 8192, 14336, 0xFFFFFFFF, 0x7FFFFFFF]),
    st.integers(0, 0xFFFFFFFF),
)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(changes=byte_changes, ext_type=st.sampled_from([0x05, 0x0F, 0x85]))
def test_mutated_mbr_bytes(changes: list[tuple[int, int, int]], ext_type: int) -> None:
    disk = standard_mbr(ext_type)
    mutate(disk, changes)
    check_outcome(disk)


@SETTINGS
@given(
    fields=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 3), st.sampled_from([8, 12]), interesting_u32),
        min_size=1,
        max_size=6,
    ),
    types=st.lists(
        st.tuples(
            st.integers(0, 2), st.integers(0, 3), st.sampled_from([0, 0x05, 0x0F, 0x85, 0xEE, 0x83])
        ),
        max_size=3,
    ),
)
def test_mutated_mbr_fields(
    fields: list[tuple[int, int, int, int]], types: list[tuple[int, int, int]]
) -> None:
    """Rewrite LBA/size/type fields of the MBR and EBRs with values near the interesting limits."""
    disk = standard_mbr()
    sectors = [0, 8192 * S, 14336 * S]
    for which, slot, field, value in fields:
        struct.pack_into("<I", disk.pieces[sectors[which]], 446 + 16 * slot + field, value)
    for which, slot, type_ in types:
        disk.pieces[sectors[which]][446 + 16 * slot + 4] = type_
    check_outcome(disk)


@SETTINGS
@given(changes=byte_changes, fix_crcs=st.booleans(), small=st.booleans())
def test_mutated_gpt_bytes(
    changes: list[tuple[int, int, int]], fix_crcs: bool, small: bool
) -> None:
    disk = standard_gpt(num_entries=8) if small else standard_gpt()
    mutate(disk, changes)
    if fix_crcs:
        refresh_crcs(disk, S)
    check_outcome(disk)


gpt_fields = st.sampled_from(
    [
        ("<I", 12),
        ("<Q", 24),
        ("<Q", 40),
        ("<Q", 48),
        ("<Q", 72),
        ("<I", 80),
        ("<I", 84),
    ]
)


@SETTINGS
@given(
    fields=st.lists(st.tuples(gpt_fields, st.integers(0, 2**64 - 1) | interesting_u32), max_size=4),
    entries=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.sampled_from([32, 40]),
            st.integers(0, 2**64 - 1) | interesting_u32,
        ),
        max_size=6,
    ),
    backup_too=st.booleans(),
)
def test_mutated_gpt_fields(
    fields: list[tuple[tuple[str, int], int]], entries: list[tuple[int, int, int]], backup_too: bool
) -> None:
    """Rewrite header fields and entry LBAs, CRCs fixed, so only the semantic checks stand guard."""
    disk = standard_gpt(num_entries=8)
    for (fmt, offset), value in fields:
        if fmt == "<I":
            value &= 0xFFFFFFFF
        struct.pack_into(fmt, disk.pieces[S], offset, value)
    array = disk.pieces[2 * S]
    for index, offset, value in entries:
        struct.pack_into("<Q", array, index * 128 + offset, value)
    refresh_crcs(disk, S)
    if backup_too:
        corrupt(disk, disk.size - S + 40)
    check_outcome(disk)


small_lba = st.one_of(st.integers(0, 64), st.integers(0, 2048), interesting_u32)
mbr_entry = st.tuples(
    st.sampled_from([0x00, 0x05, 0x0F, 0x85, 0x83, 0xEE]) | st.integers(0, 255),
    small_lba,
    small_lba,
    st.sampled_from([0x00, 0x80]),
)


@SETTINGS
@given(
    entries=st.lists(mbr_entry, max_size=4),
    ebrs=st.lists(st.tuples(st.integers(1, 1024), st.lists(mbr_entry, max_size=4)), max_size=8),
    sectors=st.integers(1, 8192),
    sector_size=st.sampled_from([512, 4096]),
)
def test_random_mbr_and_ebrs(
    entries: list[tuple[int, int, int, int]],
    ebrs: list[tuple[int, list[tuple[int, int, int, int]]]],
    sectors: int,
    sector_size: int,
) -> None:
    """Arbitrary entries in the MBR and in sectors an extended partition may point to."""
    size = sectors * sector_size
    disk = Disk(size)
    disk.write(0, mbr(entries))
    for sector, ebr_entries in ebrs:
        if (sector + 1) * sector_size <= size:
            disk.write(sector * sector_size, mbr(ebr_entries))
    check_outcome(disk, sector_size)


@SETTINGS
@given(
    sector=st.binary(min_size=510, max_size=510),
    extra=st.binary(max_size=4096),
    size=st.integers(512, 64 * MiB),
    sector_size=st.sampled_from([512, 4096]),
)
def test_random_sector_zero(sector: bytes, extra: bytes, size: int, sector_size: int) -> None:
    disk = Disk(size)
    disk.write(0, sector + b"\x55\xaa")
    if extra and 512 + len(extra) <= size:
        disk.write(512, extra)
    check_outcome(disk, sector_size)
