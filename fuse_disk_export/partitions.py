"""Read the partition table of a raw disk, so one partition can be exported on its own.

The table comes from a disk image we have not vetted, so it is treated as hostile input: every
read is small and the total is bounded (`MAX_TABLE_BYTES`), every count and link is bounded, and
every partition must lie inside the disk and not overlap another one. Whatever is wrong with a table
is reported as a `PartitionError` naming the table ("MBR: ...", "GPT: ..."); nothing else escapes
except what the caller's own ``read`` raises other than `OSError`.

The module does no I/O of its own: `read_table` takes a ``read(offset, length) -> bytes`` callable,
which keeps it pure and lets tests and fuzzers feed it bytes from memory.

Partition numbers are the ones Linux gives (``/dev/sdaN``): MBR primary slots are 1-4 whether or
not the slots before them are used, logical partitions are 5, 6, ... in the order of the EBR chain,
and a GPT entry at index i is partition i + 1.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fuse_disk_export.bounded import BoundedReader, OverBudget, PastEnd, ReadFailed, ShortRead
from fuse_disk_export.errors import PartitionError
from fuse_disk_export.filesystems import is_fat_boot_sector, is_ntfs_boot_sector, lvm2_label

__all__ = [
    "MAX_GPT_ENTRIES",
    "MAX_GPT_ENTRY_SIZE",
    "MAX_LOGICAL_PARTITIONS",
    "MAX_READ",
    "MAX_TABLE_BYTES",
    "TABLE_HEADINGS",
    "Partition",
    "PartitionTable",
    "format_table",
    "read_table",
]

#: Most bytes `read_table` reads from one disk, all reads together. The worst legitimate case is a
#: GPT whose primary entry array is damaged: MBR + 2 headers + 2 arrays of at most 1 MiB each.
MAX_TABLE_BYTES = 4 * 1024 * 1024
#: Most bytes asked of ``read`` at once; large entry arrays are read in pieces of this size.
MAX_READ = 64 * 1024
#: Most entries a GPT header may declare (the usual value is 128).
MAX_GPT_ENTRIES = 1024
#: Largest GPT entry size accepted (the usual value is 128).
MAX_GPT_ENTRY_SIZE = 1024
#: Most EBRs followed in an extended partition; Linux itself stops well below 256 partitions.
MAX_LOGICAL_PARTITIONS = 128

#: Column headings matching the rows `format_table` returns.
TABLE_HEADINGS = ("#", "start", "size", "type", "name")

_MBR_SIZE = 512
_MBR_SIGNATURE = b"\x55\xaa"
_MBR_ENTRIES_OFFSET = 446
# status, CHS first, type, CHS last, first LBA, number of sectors
_MBR_ENTRY = struct.Struct("<B3sB3sII")
_PROTECTIVE = 0xEE
_AIX_MAGIC = b"\xc9\xc2\xd4\xc1"
_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})

_GPT_SIGNATURE = b"EFI PART"
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
_SECTOR_SIZES = frozenset({512, 1024, 2048, 4096})


@dataclass(frozen=True)
class Partition:
    """One usable partition (never an MBR extended container).

    :param number: the number Linux gives it (see the module docstring).
    :param start: offset of its first byte from the start of the disk.
    :param size: its length in bytes, always > 0.
    :param type: ``"0x83"``-style hex of the MBR type byte, or the GPT type GUID in lowercase.
    :param name: the GPT partition name; ``""`` for MBR.
    :param scheme: ``"mbr"`` or ``"gpt"``.
    """

    number: int
    start: int
    size: int
    type: str
    name: str
    scheme: str

    @property
    def end(self) -> int:
        """Offset one past its last byte."""
        return self.start + self.size


@dataclass(frozen=True)
class PartitionTable:
    """The partitions of one disk, in number order.

    :param scheme: ``"mbr"``, ``"gpt"``, or ``"none"`` when the disk has no partition table.
    :param sector_size: the logical sector size the table was read with.
    """

    scheme: str
    sector_size: int
    partitions: tuple[Partition, ...]

    def get(self, number: int) -> Partition:
        """The partition numbered `number`.

        :raises PartitionError: there is no such partition; the message lists the ones there are.
        """
        for partition in self.partitions:
            if partition.number == number:
                return partition
        if self.scheme == "none":
            present = "the disk has no partition table"
        elif not self.partitions:
            present = "the table has no partitions"
        else:
            present = "the table has: " + ", ".join(str(p.number) for p in self.partitions)
        raise PartitionError(f"no partition {number} ({present})")


def read_table(
    read: Callable[[int, int], bytes], disk_size: int, *, sector_size: int = 512
) -> PartitionTable:
    """Parse the MBR or GPT partition table of a disk of `disk_size` bytes.

    :param read: ``read(offset, length)`` returns `length` bytes of the disk from `offset`. It is
        never asked for more than `MAX_READ` bytes at once, nor past `disk_size`, nor for more than
        `MAX_TABLE_BYTES` in all. An `OSError` it raises becomes a `PartitionError`.
    :param disk_size: size of the disk in bytes.
    :param sector_size: logical sector size the table's LBAs count in.
    :returns: the table; scheme ``"none"`` with no partitions when there is no MBR signature, or
        when sector 0 is a FAT or NTFS volume boot record rather than an MBR (see
        `_not_a_table`).
    :raises PartitionError: the table is malformed, inconsistent, or cannot be read.
    :raises ValueError: `sector_size` or `disk_size` is not a sensible value (a caller bug).
    """
    if sector_size not in _SECTOR_SIZES:
        raise ValueError(f"unsupported sector size {sector_size}")
    if disk_size < 0:
        raise ValueError(f"negative disk size {disk_size}")
    none = PartitionTable(scheme="none", sector_size=sector_size, partitions=())
    if disk_size < _MBR_SIZE:
        return none
    reader = BoundedReader(read, disk_size, MAX_TABLE_BYTES, clip=False, max_read=MAX_READ)
    mbr = _read(reader, 0, _MBR_SIZE, "MBR", "the MBR")
    entries = _mbr_entries(mbr)
    if entries is None:
        return none
    if any(entry.type == _PROTECTIVE for entry in entries):
        partitions = _read_gpt(reader, disk_size, sector_size)
        scheme = "gpt"
    elif _not_a_table(read, disk_size, mbr, entries):
        return none
    else:
        partitions = _read_mbr(reader, entries, disk_size, sector_size)
        scheme = "mbr"
    return PartitionTable(scheme=scheme, sector_size=sector_size, partitions=partitions)


def format_table(table: PartitionTable) -> list[tuple[str, str, str, str, str]]:
    """Rows ``(number, start, size, type, name)`` as text, one per partition, for a listing.

    Offsets and sizes are in bytes, as QEMU's ``raw`` driver takes them. Control characters in GPT
    names are escaped, since the names come from the disk and end up on a terminal. Headings are in
    `TABLE_HEADINGS`.
    """
    return [
        (str(p.number), str(p.start), str(p.size), p.type, _printable(p.name))
        for p in table.partitions
    ]


# --- reading ------------------------------------------------------------------------------------


def _read(reader: BoundedReader, offset: int, length: int, table: str, what: str) -> bytes:
    """Every one of ``length`` bytes at ``offset``, or an error naming ``table`` and ``what``."""
    try:
        return reader.read(offset, length)
    except PastEnd:
        reason = f"{what} at byte {offset} lies past the end of the disk ({reader.size} bytes)"
    except OverBudget:
        reason = f"reading {what} would take the table past {MAX_TABLE_BYTES} bytes"
    except ShortRead as e:
        reason = f"short read of {what} at byte {e.offset}: {e.got} of {e.wanted} bytes"
    except ReadFailed as e:
        raise PartitionError(
            f"{table}: cannot read {what} at byte {e.offset}: {e.error.strerror or e.error}"
        ) from e.error
    raise PartitionError(f"{table}: {reason}")


# --- MBR ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MbrEntry:
    status: int
    type: int
    lba: int
    sectors: int

    @property
    def used(self) -> bool:
        # Linux ignores zero-length entries whatever their type; so do we, for the same numbering.
        return self.type != 0 and self.sectors != 0


def _mbr_entries(sector: bytes) -> list[_MbrEntry] | None:
    """The four entries of an MBR or EBR sector, or None if it holds no partition table."""
    if sector[510:512] != _MBR_SIGNATURE:
        return None
    entries = []
    for slot in range(4):
        status, _, type_, _, lba, sectors = _MBR_ENTRY.unpack_from(
            sector, _MBR_ENTRIES_OFFSET + slot * _MBR_ENTRY.size
        )
        entries.append(_MbrEntry(status, type_, lba, sectors))
    # A filesystem boot sector (a FAT "superfloppy") also ends in 55 AA, but has code or text where
    # the entries would be; like Linux, take a status byte other than 0x00/0x80 to mean "no table".
    # Those with zeros there (mkfs.fat's, mkntfs's) are told apart by `_not_a_table`.
    if any(entry.status not in (0x00, 0x80) for entry in entries):
        return None
    return entries


def _not_a_table(
    read: Callable[[int, int], bytes], disk_size: int, sector: bytes, entries: list[_MbrEntry]
) -> bool:
    """Whether sector 0, which passed the status byte test, is something else ending in 55 AA.

    The same exceptions, in the same order, as libblkid's MBR prober (``blkid -p`` is the
    reference; fdisk and sfdisk take such a sector for an empty "dos" table): an AIX disk, a FAT
    or NTFS volume boot record (a disk formatted whole, without a table), and an LVM physical
    volume behind an MBR with no partitions.  Each reads a few bytes more, within its own bound.
    """
    if sector[:4] == _AIX_MAGIC:
        return True
    try:
        if is_fat_boot_sector(sector) or is_ntfs_boot_sector(sector, read, disk_size):
            return True
        return not any(entry.used for entry in entries) and lvm2_label(read, disk_size)
    except OSError as e:
        raise PartitionError(f"MBR: cannot read the disk: {e.strerror or e}") from e


def _read_mbr(
    reader: BoundedReader, entries: list[_MbrEntry], disk_size: int, sector_size: int
) -> tuple[Partition, ...]:
    primaries: list[Partition] = []
    # The extended container takes part in the range and overlap checks, but is not listed.
    extended: Partition | None = None
    for slot, entry in enumerate(entries, start=1):
        if not entry.used:
            continue
        part = _mbr_partition(slot, entry.lba * sector_size, entry.sectors * sector_size, entry)
        if part.end > disk_size:
            kind = "extended partition" if entry.type in _EXTENDED_TYPES else "partition"
            raise PartitionError(
                f"MBR: {kind} {slot} (start {part.start}, size {part.size}) "
                f"extends past the end of the disk ({disk_size} bytes)"
            )
        if entry.type in _EXTENDED_TYPES:
            if extended is not None:
                raise PartitionError(
                    f"MBR: partitions {extended.number} and {slot} are both extended partitions"
                )
            extended = part
        else:
            primaries.append(part)
    _check_overlaps("MBR", [*primaries, *([extended] if extended else [])])
    logicals = _read_ebr_chain(reader, extended, sector_size) if extended else []
    # Logical partitions lie inside the extended one, which overlaps no primary; only they can
    # overlap each other.
    _check_overlaps("MBR", logicals)
    return (*primaries, *logicals)


def _mbr_partition(number: int, start: int, size: int, entry: _MbrEntry) -> Partition:
    return Partition(
        number=number, start=start, size=size, type=f"0x{entry.type:02x}", name="", scheme="mbr"
    )


def _read_ebr_chain(
    reader: BoundedReader, extended: Partition, sector_size: int
) -> list[Partition]:
    ext_first = extended.start // sector_size
    ext_end = extended.end // sector_size  # one past the last sector
    span = f"sectors {ext_first}-{ext_end - 1}"
    logicals: list[Partition] = []
    ebrs: list[int] = []
    ebr = ext_first
    while True:
        if ebr in ebrs:
            raise PartitionError(f"MBR: extended partition chain loops at sector {ebr}")
        if len(ebrs) >= MAX_LOGICAL_PARTITIONS:
            raise PartitionError(
                f"MBR: extended partition chain is longer than {MAX_LOGICAL_PARTITIONS} links"
            )
        ebrs.append(ebr)
        sector = _read(reader, ebr * sector_size, _MBR_SIZE, "MBR", f"the EBR at sector {ebr}")
        entries = _mbr_entries(sector)
        if entries is None:
            if ebr == ext_first:
                # An extended partition nobody has put a logical partition in yet may hold no EBR.
                break
            raise PartitionError(
                f"MBR: extended partition chain links to sector {ebr}, which holds no EBR"
            )
        # Entry 0 is the logical partition, relative to its own EBR; entry 1 links to the next EBR,
        # relative to the extended partition. Entries 2 and 3 are unused and sometimes garbage.
        logical, link = entries[0], entries[1]
        if logical.used and logical.type not in _EXTENDED_TYPES:
            number = 5 + len(logicals)
            first = ebr + logical.lba
            part = _mbr_partition(
                number, first * sector_size, logical.sectors * sector_size, logical
            )
            if logical.lba == 0:
                raise PartitionError(
                    f"MBR: logical partition {number} overlaps its own EBR at sector {ebr}"
                )
            if part.start < extended.start or part.end > extended.end:
                raise PartitionError(
                    f"MBR: logical partition {number} (start {part.start}, size {part.size}) "
                    f"lies outside the extended partition ({span})"
                )
            logicals.append(part)
        if not (link.used and link.type in _EXTENDED_TYPES):
            break
        ebr = ext_first + link.lba
        if not ext_first <= ebr < ext_end:
            raise PartitionError(
                f"MBR: extended partition chain links to sector {ebr}, "
                f"outside the extended partition ({span})"
            )
    # An EBR inside a logical partition would be overwritten by whatever uses that partition.
    for ebr in ebrs:
        for part in logicals:
            if part.start <= ebr * sector_size < part.end:
                raise PartitionError(
                    f"MBR: the EBR at sector {ebr} lies inside partition {part.number}"
                )
    return logicals


# --- GPT ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GptHeader:
    lba: int
    first_usable: int
    last_usable: int
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc: int


def _read_gpt(reader: BoundedReader, disk_size: int, sector_size: int) -> tuple[Partition, ...]:
    sectors = disk_size // sector_size
    if sectors < 3:
        raise PartitionError(
            f"GPT: the disk ({disk_size} bytes) is too small for the GPT its protective MBR "
            "announces"
        )
    try:
        header, array = _read_gpt_copy(reader, 1, sectors, sector_size)
    except PartitionError as primary_error:
        # The backup copy exists for exactly this case; but a damaged primary is still worth naming,
        # since it is what the user will want to repair.
        try:
            header, array = _read_gpt_copy(reader, sectors - 1, sectors, sector_size)
        except PartitionError as backup_error:
            raise PartitionError(
                f"{primary_error.reason} (and the backup header: "
                f"{backup_error.reason.removeprefix('GPT: ')})"
            ) from None
    return _gpt_partitions(header, array, sector_size)


def _read_gpt_copy(
    reader: BoundedReader, lba: int, sectors: int, sector_size: int
) -> tuple[_GptHeader, bytes]:
    """Read and verify the header at `lba` and its entry array; any fault is a PartitionError."""
    where = "primary" if lba == 1 else "backup"
    raw = _read(reader, lba * sector_size, sector_size, "GPT", f"the {where} header")
    (
        signature, _revision, header_size, header_crc, _reserved, my_lba, _alternate_lba,
        first_usable, last_usable, _disk_guid, entries_lba, num_entries, entry_size, entries_crc,
    ) = _GPT_HEADER.unpack_from(raw)  # fmt: skip
    if signature != _GPT_SIGNATURE:
        raise PartitionError(f"GPT: no {where} header at sector {lba}")
    if not _GPT_HEADER.size <= header_size <= sector_size:
        raise PartitionError(f"GPT: {where} header has an invalid size ({header_size} bytes)")
    check = bytearray(raw[:header_size])
    check[16:20] = b"\0\0\0\0"  # the CRC covers the header with its own CRC field zeroed
    if zlib.crc32(check) != header_crc:
        raise PartitionError("GPT: header CRC mismatch" + ("" if lba == 1 else f" at sector {lba}"))
    if my_lba != lba:
        raise PartitionError(f"GPT: {where} header at sector {lba} says it is at sector {my_lba}")
    if num_entries > MAX_GPT_ENTRIES:
        raise PartitionError(
            f"GPT: {where} header declares {num_entries} entries (at most {MAX_GPT_ENTRIES})"
        )
    if not (128 <= entry_size <= MAX_GPT_ENTRY_SIZE and entry_size % 8 == 0):
        raise PartitionError(f"GPT: {where} header declares an invalid entry size ({entry_size})")
    if not 2 <= first_usable <= last_usable < sectors:
        raise PartitionError(
            f"GPT: {where} header's usable area (sectors {first_usable}-{last_usable}) "
            f"does not fit the disk ({sectors} sectors)"
        )
    array_size = num_entries * entry_size
    array_end = entries_lba + -(-array_size // sector_size)  # one past its last sector
    # The array must not overlap its own header, the usable area, or the protective MBR.
    if lba == 1:
        fits = entries_lba >= 2 and array_end <= first_usable
    else:
        fits = last_usable < entries_lba and array_end <= lba
    if not fits:
        raise PartitionError(
            f"GPT: {where} entry array (sectors {entries_lba}-{array_end - 1}) "
            f"overlaps the header or the usable area"
        )
    array = b""
    if array_size:
        array = _read(
            reader, entries_lba * sector_size, array_size, "GPT", f"the {where} entry array"
        )
    if zlib.crc32(array) != entries_crc:
        raise PartitionError(
            "GPT: partition entry array CRC mismatch" + ("" if lba == 1 else f" at sector {lba}")
        )
    header = _GptHeader(
        lba=lba,
        first_usable=first_usable,
        last_usable=last_usable,
        entries_lba=entries_lba,
        num_entries=num_entries,
        entry_size=entry_size,
        entries_crc=entries_crc,
    )
    return header, array


def _gpt_partitions(header: _GptHeader, array: bytes, sector_size: int) -> tuple[Partition, ...]:
    # The header checks keep the usable area inside the disk, so within it is within the disk.
    usable = f"sectors {header.first_usable}-{header.last_usable}"
    partitions = []
    for index in range(header.num_entries):
        type_guid, _unique, first, last, _attrs, raw_name = _GPT_ENTRY.unpack_from(
            array, index * header.entry_size
        )
        if type_guid == bytes(16):
            continue
        number = index + 1
        if first > last:
            raise PartitionError(
                f"GPT: partition {number} ends (sector {last}) before it starts (sector {first})"
            )
        if first < header.first_usable or last > header.last_usable:
            raise PartitionError(
                f"GPT: partition {number} lies outside the usable area "
                f"(it has sectors {first}-{last}, the usable area is {usable})"
            )
        part = Partition(
            number=number,
            start=first * sector_size,
            size=(last - first + 1) * sector_size,
            type=str(uuid.UUID(bytes_le=type_guid)),
            name=_gpt_name(raw_name),
            scheme="gpt",
        )
        partitions.append(part)
    _check_overlaps("GPT", partitions)
    return tuple(partitions)


def _gpt_name(raw: bytes) -> str:
    # Unpaired surrogates are replaced, so the name can always be encoded and printed.
    name = raw.decode("utf-16-le", errors="replace")
    nul = name.find("\0")
    return name if nul < 0 else name[:nul]


# --- shared -------------------------------------------------------------------------------------


def _check_overlaps(table: str, partitions: Iterable[Partition]) -> None:
    # Sorted by start, a partition can only overlap one that starts before it; the furthest-reaching
    # such one is enough to compare against.
    reach: Partition | None = None
    for part in sorted(partitions, key=lambda p: (p.start, p.number)):
        if reach is not None and part.start < reach.end:
            low, high = sorted((reach.number, part.number))
            raise PartitionError(f"{table}: partitions {low} and {high} overlap")
        if reach is None or part.end > reach.end:
            reach = part


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
