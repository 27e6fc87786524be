"""Tell a disk image's format from its own bytes, the way QEMU's block drivers would.

We probe in Python instead of asking ``qemu-img info`` for three reasons: it is the first thing that
touches a file a user named, so it must not start a process or follow anything the header names; it
must be cheap enough to run on every file of a backing chain; and it must be fuzzable, because a
header is untrusted input.  Every probe therefore reads at most `MAX_PROBE_BYTES`, in a handful of
small reads, and every format parser checks what it read before believing it.

The signatures are QEMU's (its ``block/*.c`` probe functions), so that the format we report is the
one QEMU would pick; a file whose magic matches nothing is raw, as in QEMU.  Where QEMU would refuse
to open an image, or would open a truncated one and read zeros or write past the end, we raise
`ImageError` with a one-line reason instead, so that the user hears about it before anything is
mounted.  Three formats QEMU never picks by content are recognised too, because a user exporting
them expects their format and not raw: a fixed VHD (its only footer is the last sector), a DMG (its
"koly" trailer is the last sector; QEMU goes by the ``.dmg`` suffix) and LUKS version 2.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Callable
from typing import Final, NamedTuple, TypeVar

from fuse_disk_export.errors import ImageError

__all__ = [
    "MAX_PROBE_BYTES",
    "ImageInfo",
    "ProbeLimitError",
    "probe",
    "probe_reader",
    "vmdk_extent_files",
    "vmdk_extent_files_reader",
]

#: The most bytes one probe reads, all reads together.  Headers are small; what is large (tables,
#: descriptors, extension areas) is bounded below so that the worst case, vhdx, stays well under it.
MAX_PROBE_BYTES: Final = 256 * 1024

Reader = Callable[[int, int], bytes]
_T = TypeVar("_T")

_SECTOR: Final = 512
_HEAD_BYTES: Final = 4096  # every header we parse fits in the first 4 KiB
_PROBE_BUF: Final = 2048  # QEMU's probe buffer; the vmdk text signature must show within it
_DESC_LIMIT: Final = 64 * 1024  # vmdk descriptor text we read (QEMU reads up to 1 MiB)
_VMDK_DESC_SIZE: Final = 20 * _SECTOR  # where QEMU looks for parentFileNameHint
_QCOW2_EXT_LIMIT: Final = 64 * 1024  # qcow2 header extensions we walk (QEMU's are < 1 KiB)
_NAME_MAX: Final = 1023  # longest backing name qcow/qcow2 accept
_PATH_MAX: Final = 4095  # longest name QED and vmdk read (a PATH_MAX buffer)


class ImageInfo(NamedTuple):
    """What the header of one image says, as much as the caller needs to plan an export.

    ``format`` is a QEMU driver name.  ``virtual_size`` is in bytes, the size QEMU will expose
    (whole sectors where QEMU counts sectors), or None where the header alone cannot tell.
    ``backing_file`` and ``data_file`` are the names exactly as stored (decoded losslessly with
    `os.fsdecode`), not resolved.  ``read_only`` is True where QEMU can only open the image
    read-only.
    """

    format: str
    virtual_size: int | None
    backing_file: str | None = None
    backing_format: str | None = None
    encrypted: bool = False
    data_file: str | None = None
    read_only: bool = False


class ProbeLimitError(ImageError):
    """A probe would have read more than `MAX_PROBE_BYTES`.

    Every parser bounds its own reads well below the limit, so this means a parser lost its bound:
    it is an `ImageError` so that callers need nothing special, and a class of its own so that the
    fuzz tests can tell it from an honest refusal.
    """


# --------------------------------------------------------------------------------------------
# Public API


def probe(path: str) -> ImageInfo:
    """Open ``path`` and probe it.

    The caller has already resolved the path; we only refuse what cannot be an image file.

    :raise ImageError: missing, unreadable, not a regular file, or a malformed header; the error
        carries ``path``.
    """
    return _on_file(path, probe_reader)


def _on_file(path: str, parse: Callable[[Reader, int], _T]) -> _T:
    """Run ``parse`` on the regular file at ``path``; errors carry ``path``.

    The open is non-blocking so that a FIFO put in place of an image cannot hang us.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError("no such file", path=path) from None
    except PermissionError:
        raise ImageError("permission denied", path=path) from None
    except OSError as e:
        raise ImageError(e.strerror or str(e), path=path) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a directory", path=path)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file", path=path)
        return parse(lambda offset, length: _pread_fully(fd, offset, length), st.st_size)
    except ImageError as e:
        if e.path is None:
            e.path = path
        raise
    finally:
        os.close(fd)


def probe_reader(read: Reader, size: int) -> ImageInfo:
    """Probe an image given as a read function and its size in bytes.

    ``read(offset, length)`` returns up to ``length`` bytes (fewer only at the end of the data).
    At most `MAX_PROBE_BYTES` are asked for in total.  Pure: no file system, no process.

    :raise ImageError: the header is recognised but truncated or inconsistent (no path attached),
        or ``read`` raised `OSError`.
    """
    if size < 0:
        raise ImageError(f"invalid image size {size}")
    if size == 0:
        return ImageInfo("raw", 0)
    src = _Source(read, size)
    head = src.read(0, _HEAD_BYTES)
    parser = _match_head(head)
    if parser is None and size >= _SECTOR:
        parser = _match_tail(src.read(size - _SECTOR, _SECTOR))
    if parser is None:
        return ImageInfo("raw", size)
    return parser(src, head)


# --------------------------------------------------------------------------------------------
# Reading


def _pread_fully(fd: int, offset: int, length: int) -> bytes:
    """pread until ``length`` bytes or end of file: a short read is not the end of a file."""
    chunks: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


class _Source:
    """The image as the parsers see it: its size, and one read budget shared by all of them."""

    def __init__(self, read: Reader, size: int) -> None:
        self._read = read
        self.size = size
        self.used = 0

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``, fewer at the end of the file.

        Reads are clipped to the file first, so that a header pointing far past the end costs
        nothing; what is left is charged to the budget before the read is made.
        """
        if offset < 0 or offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        if self.used + length > MAX_PROBE_BYTES:
            raise ProbeLimitError(f"probing would read more than {MAX_PROBE_BYTES} bytes")
        self.used += length
        try:
            data = self._read(offset, length)
        except OSError as e:
            raise ImageError(f"cannot read the image: {e.strerror or e}") from None
        return bytes(data[:length])

    def exact(self, offset: int, length: int, what: str) -> bytes:
        """Exactly ``length`` bytes, or an error saying that ``what`` lies past the end."""
        data = self.read(offset, length)
        if len(data) < length:
            raise _past_end(what)
        return data


# --------------------------------------------------------------------------------------------
# Shared helpers


def _truncated(fmt: str, size: int, need: int) -> ImageError:
    return ImageError(f"truncated {fmt} header (file is {size} bytes, header needs {need})")


def _past_end(what: str) -> ImageError:
    return ImageError(f"{what} lies past the end of the file")


def _header(src: _Source, head: bytes, fmt: str, need: int) -> bytes:
    """The first ``need`` bytes, or the error a user should see when the file is shorter."""
    if src.size < need:
        raise _truncated(fmt, src.size, need)
    return head if len(head) >= need else src.exact(0, need, f"{fmt} header")


def _cstring(raw: bytes) -> str:
    """A name from a header as QEMU sees it: up to the first NUL, every byte kept (fsdecode)."""
    return os.fsdecode(raw.split(b"\0", 1)[0])


def _name(raw: bytes) -> str | None:
    return _cstring(raw) or None


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _sectors_floor(n: int) -> int:
    """QEMU keeps sizes in whole sectors, rounding a byte count down."""
    return n - n % _SECTOR


def _u32be(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "big")


# --------------------------------------------------------------------------------------------
# Recognising a format


_Parser = Callable[[_Source, bytes], ImageInfo]

_QCOW_MAGIC: Final = b"QFI\xfb"
_VMDK4_MAGIC: Final = b"KDMV"
_VMDK3_MAGIC: Final = b"COWD"
_VDI_SIGNATURE: Final = (0xBEDA107F).to_bytes(4, "little")
_VDI_SIGNATURE_AT: Final = 0x40
_VHDX_MAGIC: Final = b"vhdxfile"
_VPC_COOKIE: Final = b"conectix"
_QED_MAGIC: Final = b"QED\0"
_PARALLELS_MAGICS: Final = (b"WithoutFreeSpace", b"WithouFreSpacExt")
_LUKS_MAGIC: Final = b"LUKS\xba\xbe"
_BOCHS_MAGIC: Final = b"Bochs Virtual HD Image"
_CLOOP_MAGIC: Final = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)
_DMG_TRAILER: Final = b"koly" + (4).to_bytes(4, "big") + (512).to_bytes(4, "big")


def _field_is(head: bytes, offset: int, expected: bytes) -> bool:
    """A field matches, or is cut off by the end of the file (then the parser says truncated)."""
    present = head[offset : offset + len(expected)]
    return len(present) < len(expected) or present == expected


def _field_in(head: bytes, offset: int, expected: tuple[bytes, ...]) -> bool:
    return any(_field_is(head, offset, value) for value in expected)


def _c_field_is(head: bytes, offset: int, width: int, expected: bytes) -> bool:
    """A NUL-terminated text field matches (as strcmp would say), or is cut off mid-text."""
    field = head[offset : offset + width]
    if b"\0" in field:
        return field.split(b"\0", 1)[0] == expected
    return len(field) < width and expected.startswith(field)


def _match_head(head: bytes) -> _Parser | None:
    """The parser for a signature at the start of the file, or None.

    A full magic with a version field cut off by the end of the file still counts: that file is a
    truncated image, not raw data.
    """
    if head.startswith(_QCOW_MAGIC):
        if len(head) < 8:
            return _parse_qcow2
        version = _u32be(head, 4)
        if version == 1:
            return _parse_qcow
        if version >= 2:
            return _parse_qcow2
    if head.startswith((_VMDK4_MAGIC, _VMDK3_MAGIC)):
        return _parse_vmdk_sparse
    if head.startswith(_VHDX_MAGIC):
        return _parse_vhdx
    if head.startswith(_VPC_COOKIE):
        return _parse_vpc_head
    if head.startswith(_QED_MAGIC):
        return _parse_qed
    if head.startswith(_PARALLELS_MAGICS) and _field_is(head, 16, (2).to_bytes(4, "little")):
        return _parse_parallels
    if head.startswith(_LUKS_MAGIC) and _field_in(head, 6, (b"\0\1", b"\0\2")):
        return _parse_luks
    if (
        _c_field_is(head, 0, 32, _BOCHS_MAGIC)
        and len(head) > len(_BOCHS_MAGIC)
        and _c_field_is(head, 32, 16, b"Redolog")
        and _c_field_is(head, 48, 16, b"Growing")
        and _field_in(head, 64, (b"\0\0\2\0", b"\0\0\1\0"))
    ):
        return _parse_bochs
    if head[_VDI_SIGNATURE_AT : _VDI_SIGNATURE_AT + 4] == _VDI_SIGNATURE:
        return _parse_vdi
    if _looks_like_vmdk_descriptor(head[:_PROBE_BUF]):
        return _parse_vmdk_text
    if head.startswith(_CLOOP_MAGIC):
        return _parse_cloop
    return None


def _match_tail(tail: bytes) -> _Parser | None:
    """The parser for a signature in the last sector (fixed VHD footer, DMG trailer), or None."""
    if tail.startswith(_VPC_COOKIE):
        return _parse_vpc_tail
    if tail.startswith(_DMG_TRAILER):
        return _parse_dmg
    return None


# --------------------------------------------------------------------------------------------
# qcow2

_QCOW2_V2: Final = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72-byte version 2 header
_QCOW2_V3: Final = struct.Struct(">QQQII")  # version 3 fields at 72, up to 104
_QCOW2_INCOMPAT_CORRUPT: Final = 1 << 1
_QCOW2_INCOMPAT_DATA_FILE: Final = 1 << 2
_QCOW2_INCOMPAT_COMPRESSION: Final = 1 << 3
_QCOW2_INCOMPAT_EXTL2: Final = 1 << 4
_QCOW2_INCOMPAT_KNOWN: Final = 0x1F
_QCOW2_EXT_BACKING_FORMAT: Final = 0xE2792ACA
_QCOW2_EXT_DATA_FILE: Final = 0x44415441
_QCOW2_EXT_CRYPTO: Final = 0x0537BE77
_QCOW2_CRYPT_LUKS: Final = 2


class _Qcow2Header(NamedTuple):
    version: int
    backing_offset: int
    backing_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_offset: int
    refcount_offset: int
    refcount_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int
    refcount_order: int
    header_length: int
    compression_type: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


class _Qcow2Extensions:
    """What the header extensions add, filled in as they are read."""

    def __init__(self) -> None:
        self.backing_format: str | None = None
        self.data_file: str | None = None
        self.crypto_header = False


def _parse_qcow2(src: _Source, head: bytes) -> ImageInfo:
    """qcow2: the header, its extensions, its backing name, and where its tables lie."""
    version = _u32be(head, 4) if len(head) >= 8 else 3
    if version > 3:
        raise ImageError(f"unsupported qcow2 version {version}")
    h = _qcow2_header(src, head, version)
    _check_qcow2_header(src, h)
    _check_qcow2_tables(src, h)
    ext = _qcow2_extensions(src, head, h)
    if h.crypt_method == _QCOW2_CRYPT_LUKS and not ext.crypto_header:
        raise ImageError("qcow2 image is LUKS-encrypted but has no encryption header extension")
    data_file = None
    if h.incompatible & _QCOW2_INCOMPAT_DATA_FILE:
        if ext.data_file is None:
            raise ImageError("qcow2 image keeps its data in an external file but does not name it")
        data_file = ext.data_file
    backing = None
    if h.backing_offset:
        limit = min(_NAME_MAX, h.cluster_size - h.backing_offset)
        if h.backing_size > limit:
            raise ImageError(
                f"qcow2 backing file name is too long ({h.backing_size} bytes, at most {limit})"
            )
        backing = _name(src.exact(h.backing_offset, h.backing_size, "qcow2 backing file name"))
    return ImageInfo(
        "qcow2",
        _sectors_floor(h.size),
        backing_file=backing,
        backing_format=ext.backing_format if backing else None,
        encrypted=h.crypt_method != 0,
        data_file=data_file,
        read_only=bool(h.incompatible & _QCOW2_INCOMPAT_CORRUPT),
    )


def _qcow2_header(src: _Source, head: bytes, version: int) -> _Qcow2Header:
    need = _QCOW2_V2.size if version == 2 else _QCOW2_V2.size + _QCOW2_V3.size
    data = _header(src, head, "qcow2", need)
    _, _, boff, bsize, cbits, size, crypt, *tables = _QCOW2_V2.unpack_from(data)
    l1_size, l1_off, rt_off, rt_clusters, nb_snap, snap_off = tables
    incompat, refcount_order, header_length, compression = 0, 4, _QCOW2_V2.size, 0
    if version == 3:
        incompat, _, _, refcount_order, header_length = _QCOW2_V3.unpack_from(data, _QCOW2_V2.size)
        if header_length < 104:
            raise ImageError(f"qcow2 header is too short (header_length {header_length} < 104)")
        if header_length > src.size:
            raise _truncated("qcow2", src.size, header_length)
        if header_length > 104:
            compression = src.exact(104, 1, "qcow2 header")[0]
    return _Qcow2Header(
        version=version,
        backing_offset=boff,
        backing_size=bsize,
        cluster_bits=cbits,
        size=size,
        crypt_method=crypt,
        l1_size=l1_size,
        l1_offset=l1_off,
        refcount_offset=rt_off,
        refcount_clusters=rt_clusters,
        nb_snapshots=nb_snap,
        snapshots_offset=snap_off,
        incompatible=incompat,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression,
    )


def _check_qcow2_header(src: _Source, h: _Qcow2Header) -> None:
    """The header checks QEMU makes before it trusts any offset (qcow2_do_open)."""
    if not 9 <= h.cluster_bits <= 21:
        raise ImageError(f"unsupported qcow2 cluster size 2^{h.cluster_bits} (2^9 to 2^21)")
    if h.header_length > h.cluster_size:
        raise ImageError(f"qcow2 header ({h.header_length} bytes) exceeds the cluster size")
    if h.backing_offset > h.cluster_size:
        raise ImageError("qcow2 backing file name offset lies beyond the first cluster")
    unknown = h.incompatible & ~_QCOW2_INCOMPAT_KNOWN
    if unknown:
        raise ImageError(f"qcow2 image uses unsupported incompatible features (0x{unknown:x})")
    if h.compression_type not in (0, 1):
        raise ImageError(f"unsupported qcow2 compression type {h.compression_type}")
    if bool(h.compression_type) != bool(h.incompatible & _QCOW2_INCOMPAT_COMPRESSION):
        raise ImageError("qcow2 compression type and its incompatible feature bit disagree")
    if h.incompatible & _QCOW2_INCOMPAT_EXTL2 and h.cluster_bits < 14:
        raise ImageError("qcow2 extended L2 entries need a cluster size of at least 16 KiB")
    if h.refcount_order > 6:
        raise ImageError(f"qcow2 refcount width 2^{h.refcount_order} bits is too large")
    if h.crypt_method > _QCOW2_CRYPT_LUKS:
        raise ImageError(f"unsupported qcow2 encryption method {h.crypt_method}")
    if h.refcount_clusters == 0:
        raise ImageError("qcow2 image has no refcount table")


def _check_qcow2_tables(src: _Source, h: _Qcow2Header) -> None:
    """Where the refcount table, snapshot table and L1 table lie: sane, aligned, inside the file.

    QEMU checks size and alignment; it would read a table past the end of the file as zeros and
    later write there, so we also refuse any table that does not fit in the file.
    """
    l2_bits = h.cluster_bits - (4 if h.incompatible & _QCOW2_INCOMPAT_EXTL2 else 3)
    shift = h.cluster_bits + l2_bits
    if (h.size + (1 << shift) - 1) >> shift > h.l1_size:
        raise ImageError("qcow2 L1 table is too small for the virtual size")
    _check_table(
        src, h, "refcount", h.refcount_offset, h.refcount_clusters, h.cluster_size, 8 << 20
    )
    _check_table(src, h, "snapshot", h.snapshots_offset, h.nb_snapshots, 40, 40 * 65536)
    _check_table(src, h, "L1", h.l1_offset, h.l1_size, 8, 32 * 1024 * 1024)


def _check_table(
    src: _Source, h: _Qcow2Header, name: str, offset: int, entries: int, width: int, limit: int
) -> None:
    if entries > limit // width:
        raise ImageError(f"qcow2 {name} table is too large")
    if offset % h.cluster_size:
        raise ImageError(f"qcow2 {name} table offset is not aligned to a cluster")
    if entries and offset + entries * width > src.size:
        raise _past_end(f"qcow2 {name} table")


def _qcow2_extensions(src: _Source, head: bytes, h: _Qcow2Header) -> _Qcow2Extensions:
    """Walk the header extensions between the header and the backing name (or the cluster end).

    They nearly always fit in the bytes already read; the rest of the area is read only when the
    walk gets there, and no further than `_QCOW2_EXT_LIMIT`.
    """
    end = h.backing_offset or h.cluster_size
    start = h.header_length
    want = min(end - start, _QCOW2_EXT_LIMIT)
    area = head[start : start + want]
    found = _Qcow2Extensions()
    pos = 0
    while start + pos < end:
        if pos + 8 > len(area):
            area += src.read(start + len(area), want - len(area))
            if pos + 8 > len(area):
                raise _qcow2_extensions_cut(src, start + pos + 8)
        kind, length = struct.unpack_from(">II", area, pos)
        pos += 8
        if start + pos > end or length > end - start - pos:
            raise ImageError(f"qcow2 header extension 0x{kind:08x} is too large")
        if kind == 0:
            break
        if kind in (_QCOW2_EXT_BACKING_FORMAT, _QCOW2_EXT_DATA_FILE, _QCOW2_EXT_CRYPTO):
            if pos + length > len(area):
                area += src.read(start + len(area), want - len(area))
                if pos + length > len(area):
                    raise _qcow2_extensions_cut(src, start + pos + length)
            _qcow2_extension(src, h, kind, area[pos : pos + length], found)
        pos += (length + 7) & ~7
    return found


def _qcow2_extensions_cut(src: _Source, needed_end: int) -> ImageError:
    if needed_end > src.size:
        return _past_end("qcow2 header extension")
    return ImageError(f"qcow2 header extensions run past {_QCOW2_EXT_LIMIT} bytes")


def _qcow2_extension(
    src: _Source, h: _Qcow2Header, kind: int, data: bytes, found: _Qcow2Extensions
) -> None:
    if kind == _QCOW2_EXT_BACKING_FORMAT:
        if len(data) >= 16:
            raise ImageError(f"qcow2 backing format name is too long ({len(data)} bytes)")
        found.backing_format = _name(data)
    elif kind == _QCOW2_EXT_DATA_FILE:
        found.data_file = _name(data)
    else:
        if h.crypt_method != _QCOW2_CRYPT_LUKS:
            raise ImageError("qcow2 encryption header extension without LUKS encryption")
        if len(data) != 16:
            raise ImageError(f"qcow2 encryption header extension has size {len(data)}, not 16")
        offset, length = struct.unpack(">QQ", data)
        if offset % h.cluster_size:
            raise ImageError("qcow2 encryption header offset is not aligned to a cluster")
        if offset + length > src.size:
            raise _past_end("qcow2 encryption header")
        found.crypto_header = True


# --------------------------------------------------------------------------------------------
# qcow (version 1)

_QCOW1: Final = struct.Struct(">4sIQIIQBBHIQ")  # 48 bytes


def _parse_qcow(src: _Source, head: bytes) -> ImageInfo:
    """qcow version 1 (qcow_open): small header, one L1 table, optional AES."""
    data = _header(src, head, "qcow", _QCOW1.size)
    (_, _, boff, bsize, _, size, cbits, l2bits, _, crypt, l1_off) = _QCOW1.unpack(data[:48])
    if size <= 1:
        raise ImageError(f"qcow image size {size} is too small")
    if not 9 <= cbits <= 16:
        raise ImageError(f"unsupported qcow cluster size 2^{cbits} (2^9 to 2^16)")
    if not 6 <= l2bits <= 13:
        raise ImageError(f"unsupported qcow L2 table size 2^{l2bits + 3} (2^9 to 2^16)")
    if crypt > 1:
        raise ImageError(f"unsupported qcow encryption method {crypt}")
    shift = cbits + l2bits
    l1_size = (size + (1 << shift) - 1) >> shift
    if l1_size * 8 > 0x7FFFFFFF:
        raise ImageError("qcow image is too large")
    if l1_off + l1_size * 8 > src.size:
        raise _past_end("qcow L1 table")
    backing = None
    if boff:
        if bsize > _NAME_MAX:
            raise ImageError(f"qcow backing file name is too long ({bsize} bytes)")
        backing = _name(src.exact(boff, bsize, "qcow backing file name"))
    return ImageInfo("qcow", _sectors_floor(size), backing_file=backing, encrypted=crypt != 0)


# --------------------------------------------------------------------------------------------
# QED

_QED: Final = struct.Struct("<4sIIIQQQQQII")  # 64 bytes
_QED_F_BACKING_FILE: Final = 0x01
_QED_F_BACKING_FORMAT_NO_PROBE: Final = 0x04
_QED_FEATURES: Final = 0x07


def _parse_qed(src: _Source, head: bytes) -> ImageInfo:
    """QED (bdrv_qed_do_open): the header, its L1 table, its backing name."""
    data = _header(src, head, "qed", _QED.size)
    cluster, table, header_clusters, features = _QED.unpack_from(data)[1:5]
    l1_off, image_size, boff, bsize = _QED.unpack_from(data)[7:]
    if features & ~_QED_FEATURES:
        raise ImageError(f"qed image uses unsupported features (0x{features & ~_QED_FEATURES:x})")
    if not (_is_power_of_2(cluster) and 4096 <= cluster <= 64 * 1024 * 1024):
        raise ImageError(f"qed cluster size {cluster} is invalid")
    if not (_is_power_of_2(table) and table <= 16):
        raise ImageError(f"qed table size {table} is invalid")
    entries = cluster * table // 8
    if image_size % _SECTOR or image_size > entries * entries * cluster:
        raise ImageError(f"qed image size {image_size} is invalid")
    if header_clusters > 0xFFFFFFFF // cluster:
        raise ImageError("qed header size is too large")
    header_bytes = header_clusters * cluster
    if l1_off % cluster or l1_off < header_bytes:
        raise ImageError("qed L1 table offset is invalid")
    if l1_off + table * cluster > src.size:
        raise _past_end("qed L1 table")
    backing = None
    if features & _QED_F_BACKING_FILE:
        if boff + bsize > header_bytes:
            raise ImageError("qed backing file name lies outside the header")
        if bsize > _PATH_MAX:
            raise ImageError(f"qed backing file name is too long ({bsize} bytes)")
        backing = _name(src.exact(boff, bsize, "qed backing file name"))
    no_probe = bool(features & _QED_F_BACKING_FORMAT_NO_PROBE)
    return ImageInfo(
        "qed",
        image_size,
        backing_file=backing,
        backing_format="raw" if backing and no_probe else None,
    )


# --------------------------------------------------------------------------------------------
# VDI

_VDI: Final = struct.Struct("<IIIII256sIIIIIIIQIIII16s16s16s16s")  # from offset 0x40
_VDI_VERSION_1_1: Final = 0x00010001
_VDI_BLOCK_SIZE: Final = 1024 * 1024
_VDI_BLOCKS_MAX: Final = (0x80000000 - _SECTOR) // 4
_NULL_UUID: Final = bytes(16)


def _parse_vdi(src: _Source, head: bytes) -> ImageInfo:
    """VirtualBox VDI (vdi_open), plus the block map and data area inside the file.

    QEMU opens a VDI whose block map lies past the end of the file and would write into it.
    """
    data = _header(src, head, "vdi", 512)
    fields = _VDI.unpack_from(data, _VDI_SIGNATURE_AT)
    version, bmap_off, data_off, sector_size = fields[1], fields[6], fields[7], fields[11]
    disk_size, block_size, blocks, allocated = fields[13], fields[14], fields[16], fields[17]
    link, parent = fields[20], fields[21]
    if disk_size > _VDI_BLOCKS_MAX * _VDI_BLOCK_SIZE:
        raise ImageError(f"unsupported vdi image size {disk_size}")
    disk_size = -(-disk_size // _SECTOR) * _SECTOR
    if version != _VDI_VERSION_1_1:
        raise ImageError(f"unsupported vdi version {version >> 16}.{version & 0xFFFF}")
    if bmap_off % _SECTOR or data_off % _SECTOR:
        raise ImageError("vdi block map or data offset is not aligned to a sector")
    if sector_size != _SECTOR:
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
        raise _past_end("vdi block map")
    if data_off + allocated * block_size > src.size:
        raise _past_end("vdi data area")
    return ImageInfo("vdi", disk_size)


# --------------------------------------------------------------------------------------------
# VHDX

_KIB64: Final = 64 * 1024
_VHDX_HEADERS: Final = (1 * _KIB64, 2 * _KIB64)
_VHDX_REGION_TABLE: Final = 3 * _KIB64
_VHDX_NEED: Final = 4 * _KIB64  # through the end of the first region table
_VHDX_MAX_ENTRIES: Final = 2047
_VHDX_ENTRY: Final = struct.Struct("<16sQII")  # region table entry
_VHDX_ITEM: Final = struct.Struct("<16sIIII")  # metadata table entry
# GUIDs as stored (little-endian fields); literal bytes spare importing uuid at start-up.
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


def _parse_vhdx(src: _Source, head: bytes) -> ImageInfo:
    """VHDX: headers, region table, metadata table, and the virtual disk size item.

    Checksums (CRC-32C) are not verified; signatures, counts and offsets are.
    """
    if src.size < _VHDX_NEED:
        raise _truncated("vhdx", src.size, _VHDX_NEED)
    _vhdx_check_headers(src)
    regions = _vhdx_regions(src)
    if _VHDX_METADATA not in regions or _VHDX_BAT not in regions:
        raise ImageError("vhdx region table lacks the metadata or block allocation region")
    for name, (offset, length) in regions.items():
        if offset + length > src.size:
            what = "metadata region" if name == _VHDX_METADATA else "region"
            raise _past_end(f"vhdx {what}")
    meta_off, meta_len = regions[_VHDX_METADATA]
    items = _vhdx_metadata(src, meta_off, meta_len)
    params = _vhdx_item(src, items, meta_off, _VHDX_FILE_PARAMETERS, "file parameters", 8)
    block_size, flags = params & 0xFFFFFFFF, params >> 32
    size = _vhdx_item(src, items, meta_off, _VHDX_DISK_SIZE, "virtual disk size", 8)
    sector = _vhdx_item(src, items, meta_off, _VHDX_SECTOR_SIZE, "logical sector size", 4)
    if not (_is_power_of_2(block_size) and 1 << 20 <= block_size <= 256 << 20):
        raise ImageError(f"unsupported vhdx block size {block_size}")
    if sector not in (512, 4096):
        raise ImageError(f"unsupported vhdx logical sector size {sector}")
    if size > _VHDX_MAX_SIZE:
        raise ImageError(f"vhdx virtual disk size {size} is too large")
    if flags & _VHDX_HAS_PARENT:
        raise ImageError("vhdx differencing images are not supported")
    return ImageInfo("vhdx", _sectors_floor(size))


def _vhdx_check_headers(src: _Source) -> None:
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


def _vhdx_regions(src: _Source) -> dict[bytes, tuple[int, int]]:
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


def _vhdx_metadata(src: _Source, offset: int, length: int) -> dict[bytes, tuple[int, int]]:
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
    src: _Source, items: dict[bytes, tuple[int, int]], base: int, guid: bytes, what: str, width: int
) -> int:
    """One little-endian integer item of the metadata region that starts at ``base``."""
    if guid not in items:
        raise ImageError(f"vhdx metadata lacks the {what}")
    offset, length = items[guid]
    if length < width:
        raise ImageError(f"vhdx {what} item is too short")
    return int.from_bytes(src.exact(base + offset, width, f"vhdx {what}"), "little")


# --------------------------------------------------------------------------------------------
# VPC (VHD)

_VPC_FOOTER: Final = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")  # 85 of 512 bytes
_VPC_DYNAMIC: Final = struct.Struct(">8sQQIIII")  # first 40 of 1024 bytes
_VPC_SIZE_APPS: Final = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
_VHD_MAX_GEOMETRY: Final = 65535 * 16 * 255
_VHD_MAX_SECTORS: Final = 0xFF000000


def _parse_vpc_head(src: _Source, head: bytes) -> ImageInfo:
    """A VHD with its footer copy in the first sector: QEMU treats it as dynamic."""
    return _parse_vpc(src, _header(src, head, "vpc", _SECTOR)[:_SECTOR], dynamic=True)


def _parse_vpc_tail(src: _Source, head: bytes) -> ImageInfo:
    """A VHD whose only footer is the last sector: a fixed disk."""
    return _parse_vpc(src, src.exact(src.size - _SECTOR, _SECTOR, "vpc footer"), dynamic=False)


def _parse_vpc(src: _Source, footer: bytes, *, dynamic: bool) -> ImageInfo:
    """The footer (vpc_open): checksum, and the size QEMU derives from geometry or current_size."""
    fields = _VPC_FOOTER.unpack_from(footer)
    data_off, app, current_size = fields[3], fields[5], fields[9]
    cyls, heads, secs, checksum = fields[10], fields[11], fields[12], fields[14]
    computed = ~(sum(footer) - sum(footer[64:68])) & 0xFFFFFFFF
    if computed != checksum:
        raise ImageError(f"vpc footer checksum is wrong (0x{checksum:08x}, not 0x{computed:08x})")
    sectors = cyls * heads * secs
    if app in _VPC_SIZE_APPS or sectors == _VHD_MAX_GEOMETRY:
        sectors = current_size // _SECTOR
    if sectors > _VHD_MAX_SECTORS:
        raise ImageError(f"vpc image is too large ({sectors} sectors)")
    if dynamic:
        _check_vpc_dynamic(src, data_off, sectors)
    elif sectors * _SECTOR > src.size - _SECTOR:
        raise _past_end("vpc fixed disk data")
    return ImageInfo("vpc", sectors * _SECTOR)


def _check_vpc_dynamic(src: _Source, offset: int, sectors: int) -> None:
    """QEMU reads the whole block allocation table at open; one cut short means lost data."""
    data = src.exact(offset, _SECTOR, "vpc dynamic disk header")
    cookie, _, bat_off, _, entries, block_size, _ = _VPC_DYNAMIC.unpack_from(data)
    if cookie != b"cxsparse":
        raise ImageError("vpc dynamic disk header has no signature")
    if not _is_power_of_2(block_size) or block_size < _SECTOR:
        raise ImageError(f"invalid vpc block size {block_size}")
    if sectors * _SECTOR // block_size > 0xFFFFFFFF:
        raise ImageError("vpc image has too many blocks")
    if entries * block_size < sectors * _SECTOR:
        raise ImageError("vpc block allocation table is too small for the disk size")
    if entries > 0x7FFFFFFF // 4:
        raise ImageError(f"vpc block allocation table is too large ({entries} entries)")
    if bat_off + entries * 4 > src.size:
        raise _past_end("vpc block allocation table")


# --------------------------------------------------------------------------------------------
# Parallels

_PARALLELS: Final = struct.Struct("<16sIIIIIQIIIQ")  # 64 bytes
_PARALLELS_INUSE: Final = 0x746F6E59


def _parse_parallels(src: _Source, head: bytes) -> ImageInfo:
    """Parallels (parallels_open): header and block allocation table.

    An image not closed cleanly ("inuse") opens read-only only.
    """
    data = _header(src, head, "parallels", _PARALLELS.size)
    (magic, _, _, _, tracks, bat_entries, nb_sectors, inuse, _, _, _) = _PARALLELS.unpack(data[:64])
    if magic == _PARALLELS_MAGICS[0]:
        nb_sectors &= 0xFFFFFFFF
    if tracks == 0:
        raise ImageError("parallels image has zero sectors per cluster")
    if tracks > 0x7FFFFFFF // 513:
        raise ImageError("parallels cluster size is too large")
    if bat_entries > 0x7FFFFFFF // 4:
        raise ImageError(f"parallels block allocation table is too large ({bat_entries})")
    if _PARALLELS.size + bat_entries * 4 > src.size:
        raise _past_end("parallels block allocation table")
    return ImageInfo("parallels", nb_sectors * _SECTOR, read_only=inuse == _PARALLELS_INUSE)


# --------------------------------------------------------------------------------------------
# LUKS

_LUKS1: Final = struct.Struct(">6sH32s32s32sII20s32sI40s")  # 208 bytes, then 8 key slots
_LUKS1_SLOT: Final = struct.Struct(">II32sII")  # 48 bytes
_LUKS1_HEADER: Final = _LUKS1.size + 8 * _LUKS1_SLOT.size  # 592
_LUKS_SLOT_ENABLED: Final = 0x00AC71F3
_LUKS_SLOT_DISABLED: Final = 0x0000DEAD
_LUKS_STRIPES: Final = 4000


def _parse_luks(src: _Source, head: bytes) -> ImageInfo:
    """LUKS: the payload of version 1 starts at a sector the header names; version 2 is JSON."""
    version = int.from_bytes(head[6:8], "big") if len(head) >= 8 else 1
    if version == 2:
        return _parse_luks2(src, head)
    data = _header(src, head, "luks", _LUKS1_HEADER)
    payload, key_bytes = _LUKS1.unpack_from(data)[5:7]
    if payload * _SECTOR > src.size:
        raise _past_end("luks payload offset")
    _check_luks1_slots(data, payload, key_bytes)
    return ImageInfo("luks", src.size - payload * _SECTOR, encrypted=True)


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
        length = -(-key_bytes * stripes // _SECTOR)
        if start < -(-_LUKS1_HEADER // _SECTOR):
            raise ImageError(f"luks key slot {i} overlaps the header")
        if start + length > payload:
            raise ImageError(f"luks key slot {i} overlaps the encrypted payload")
        for j, (other, other_len) in enumerate(spans):
            if start < other + other_len and other < start + length:
                raise ImageError(f"luks key slots {j} and {i} overlap")
        spans.append((start, length))


def _parse_luks2(src: _Source, head: bytes) -> ImageInfo:
    """LUKS version 2: we check the binary header's size; the payload offset is in its JSON."""
    data = _header(src, head, "luks", 4096)
    header_size = int.from_bytes(data[8:16], "big")
    if not (_is_power_of_2(header_size) and 16 * 1024 <= header_size <= 4 * 1024 * 1024):
        raise ImageError(f"luks2 header size {header_size} is invalid")
    if header_size > src.size:
        raise _past_end("luks2 header")
    return ImageInfo("luks", None, encrypted=True)


# --------------------------------------------------------------------------------------------
# bochs, cloop, dmg: QEMU opens these read-only

_BOCHS: Final = struct.Struct("<IIIII")  # version, header size, catalog, bitmap, extent at 64
_BOCHS_V1: Final = 0x00010000


def _parse_bochs(src: _Source, head: bytes) -> ImageInfo:
    """Bochs growing image (bochs_open): header and catalog."""
    data = _header(src, head, "bochs", 512)
    version, header_size, catalog, _, extent = _BOCHS.unpack_from(data, 64)
    disk = int.from_bytes(data[84:92] if version == _BOCHS_V1 else data[88:96], "little")
    disk = _sectors_floor(disk)
    if catalog > 0x100000:
        raise ImageError(f"bochs catalog is too large ({catalog} entries)")
    if extent < _SECTOR or not _is_power_of_2(extent) or extent > 0x800000:
        raise ImageError(f"invalid bochs extent size {extent}")
    if catalog < -(-disk // extent):
        raise ImageError("bochs catalog is too small for the disk size")
    if header_size + catalog * 4 > src.size:
        raise _past_end("bochs catalog")
    return ImageInfo("bochs", disk, read_only=True)


def _parse_cloop(src: _Source, head: bytes) -> ImageInfo:
    """cloop version 2 (cloop_open): block size, block count, and the offsets table."""
    data = _header(src, head, "cloop", 136)
    block_size, blocks = struct.unpack_from(">II", data, 128)
    if block_size == 0 or block_size % _SECTOR or block_size > 64 * 1024 * 1024:
        raise ImageError(f"invalid cloop block size {block_size}")
    if blocks > (0xFFFFFFFF - 1) // 8 or (blocks + 1) * 8 > 512 * 1024 * 1024:
        raise ImageError(f"cloop image has too many blocks ({blocks})")
    end = int.from_bytes(src.exact(136 + blocks * 8, 8, "cloop offsets table"), "big")
    if end > src.size:
        raise _past_end("cloop compressed data")
    return ImageInfo("cloop", blocks * block_size, read_only=True)


_DMG: Final = struct.Struct(">4sIIIQQQQQ")  # the koly fields through the resource fork


def _parse_dmg(src: _Source, head: bytes) -> ImageInfo:
    """DMG (dmg_open): the koly trailer's forks must lie before it; it holds the sector count."""
    koly = src.size - _SECTOR
    trailer = src.exact(koly, _SECTOR, "dmg trailer")
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
    return ImageInfo("dmg", sectors * _SECTOR, read_only=True)


# --------------------------------------------------------------------------------------------
# VMDK

_VMDK4: Final = struct.Struct("<IIQQQQIQQQc4sH")  # after the magic, 75 bytes
_VMDK_GD_AT_END: Final = 0xFFFFFFFFFFFFFFFF
_VMDK_FLAG_RGD: Final = 1 << 1
_VMDK_COMPRESSION_DEFLATE: Final = 1
_VMDK_MARKER_EOS: Final = 0
_VMDK_MARKER_FOOTER: Final = 3
_VMDK_DESC_TYPES: Final = frozenset(
    {
        "monolithicFlat",
        "vmfs",
        "vmfsSparse",
        "seSparse",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    }
)
_VMDK_EXTENT_TYPES: Final = frozenset({"FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"})
# sscanf("%10s %lld %10s \"%511[^\n\r\"]\" %lld"), one line at a time
_VMDK_EXTENT: Final = re.compile(
    rb'\s*(\S+)\s+([+-]?\d+)\s*(\S{1,10})\s*"([^\n\r"]{1,511})"(?:\s*([+-]?\d+))?'
)


def _looks_like_vmdk_descriptor(buf: bytes) -> bool:
    """QEMU's vmdk_probe for text: comments and blank lines, then ``version=1|2|3``."""
    pos, end = 0, len(buf)
    while pos < end:
        if buf[pos] == ord("#"):
            newline = buf.find(b"\n", pos)
            pos = end if newline < 0 else newline + 1
            continue
        if buf[pos] == ord(" "):
            while pos < end and buf[pos] == ord(" "):
                pos += 1
            if pos < end and buf[pos] == ord("\r"):
                pos += 1
            if pos == end or buf[pos] != ord("\n"):
                return False
            pos += 1
            continue
        return any(
            buf.startswith(b"version=" + v + eol, pos)
            for v in (b"1", b"2", b"3")
            for eol in (b"\n", b"\r\n")
        )
    return False


def _parse_vmdk_sparse(src: _Source, head: bytes) -> ImageInfo:
    """A sparse VMDK extent ("KDMV", or the old "COWD"), which may carry its own descriptor."""
    data = _header(src, head, "vmdk", _SECTOR)
    if data.startswith(_VMDK3_MAGIC):
        return _parse_vmdk3(src, data)
    fields = _VMDK4.unpack_from(data, 4)
    capacity, desc_off = fields[2], fields[4]
    if capacity == 0 and desc_off:
        # A header that only points at a descriptor: the extents are elsewhere.
        info = _vmdk_descriptor_info(src, desc_off * _SECTOR)
        parent = _vmdk_parent(src, 0x200)
        return ImageInfo("vmdk", info, parent, "vmdk" if parent else None)
    if fields[8] == _VMDK_GD_AT_END:
        fields = _vmdk_stream_footer(src)
    version, flags, capacity, grain, _, _, gtes, rgd_off, gd_off, grain_off, _, _, compress = fields
    compressed = compress == _VMDK_COMPRESSION_DEFLATE
    if version > 3:
        raise ImageError(f"unsupported vmdk version {version}")
    if gtes > 512:
        raise ImageError("vmdk grain table is too large")
    if gtes * grain == 0:
        raise ImageError("vmdk grain size or grain table size is zero")
    if grain > 0x200000:
        raise ImageError("vmdk grain size is too large")
    gd_entries = -(-capacity // (gtes * grain))
    if gd_entries > 32 * 1024 * 1024:
        raise ImageError("vmdk grain directory is too large")
    if grain_off * _SECTOR > src.size:
        raise ImageError(f"truncated vmdk file (grains start at {grain_off * _SECTOR} bytes)")
    if gd_off * _SECTOR + gd_entries * 4 > src.size:
        raise _past_end("vmdk grain directory")
    if flags & _VMDK_FLAG_RGD and rgd_off * _SECTOR + gd_entries * 4 > src.size:
        raise _past_end("vmdk redundant grain directory")
    parent = _vmdk_parent(src, 0x200)
    return ImageInfo(
        "vmdk",
        capacity * _SECTOR,
        backing_file=parent,
        backing_format="vmdk" if parent else None,
        read_only=version == 3 and not compressed,
    )


def _vmdk_stream_footer(src: _Source) -> tuple[int, ...]:
    """A streamOptimized VMDK whose header says "at the end": the footer's header holds."""
    if src.size < 1536:
        raise _truncated("vmdk", src.size, 1536)
    data = src.exact(src.size - 1536, 1536, "vmdk footer")
    _, footer_size, footer_type = struct.unpack_from("<QII", data, 0)
    eos_val, eos_size, eos_type = struct.unpack_from("<QII", data, 1024)
    if (
        data[512:516] != _VMDK4_MAGIC
        or footer_size != 0
        or footer_type != _VMDK_MARKER_FOOTER
        or (eos_val, eos_size, eos_type) != (0, 0, _VMDK_MARKER_EOS)
    ):
        raise ImageError("vmdk stream footer is invalid")
    fields: tuple[int, ...] = _VMDK4.unpack_from(data, 516)
    return fields


def _parse_vmdk3(src: _Source, data: bytes) -> ImageInfo:
    """The old VMware 3 sparse extent: QEMU still opens it, with the same grain limits."""
    sectors, grain, gd_off, gd_entries = struct.unpack_from("<IIII", data, 12)
    if grain > 0x200000:
        raise ImageError("vmdk grain size is too large")
    if gd_entries > 32 * 1024 * 1024:
        raise ImageError("vmdk grain directory is too large")
    if gd_off * _SECTOR + gd_entries * 4 > src.size:
        raise _past_end("vmdk grain directory")
    parent = _vmdk_parent(src, 0x200)
    return ImageInfo("vmdk", sectors * _SECTOR, parent, "vmdk" if parent else None)


def _parse_vmdk_text(src: _Source, head: bytes) -> ImageInfo:
    """A VMDK descriptor file (monolithicFlat, twoGbMaxExtent*, vmfs...)."""
    size = _vmdk_descriptor_info(src, 0)
    parent = _vmdk_parent(src, 0)
    return ImageInfo("vmdk", size, parent, "vmdk" if parent else None)


def _vmdk_descriptor_info(src: _Source, offset: int) -> int | None:
    """The virtual size a descriptor's extents add up to (QEMU's vmdk_open_desc_file).

    Only the first `_DESC_LIMIT` bytes are read; for a longer descriptor the size is unknown.
    """
    raw = src.read(offset, _DESC_LIMIT)
    cut = len(raw) == _DESC_LIMIT and offset + _DESC_LIMIT < src.size
    desc = raw.split(b"\0", 1)[0]
    create_type = _vmdk_value(desc, b"createType")
    if create_type is None:
        raise ImageError("vmdk descriptor has no createType")
    if create_type not in _VMDK_DESC_TYPES:
        raise ImageError(f"unsupported vmdk createType {create_type!r}")
    sectors = 0
    for line in desc.split(b"\n"):
        sectors += _vmdk_extent_sectors(line)
    return None if cut else sectors * _SECTOR


def _vmdk_extent_sectors(line: bytes) -> int:
    """The sectors one extent line adds, 0 for lines QEMU skips."""
    m = _VMDK_EXTENT.match(line)
    if m is None or m.group(1) != b"RW":
        return 0
    kind, sectors, offset = m.group(3), int(m.group(2)), m.group(5)
    if kind == b"FLAT" and (offset is None or int(offset) < 0):
        raise ImageError(f"invalid vmdk extent line: {line.strip().decode(errors='replace')}")
    if kind != b"FLAT" and offset is not None:
        raise ImageError(f"invalid vmdk extent line: {line.strip().decode(errors='replace')}")
    if sectors <= 0 or kind.decode(errors="replace") not in _VMDK_EXTENT_TYPES:
        return 0
    return sectors


def _vmdk_value(desc: bytes, key: bytes) -> str | None:
    """``key="value"`` found QEMU's way: first occurrence, two characters on, up to a quote."""
    at = desc.find(key)
    if at < 0:
        return None
    start = at + len(key) + 2
    end = desc.find(b'"', start)
    if start >= len(desc) or end < 0:
        return None
    return desc[start:end].decode(errors="replace")


def _vmdk_parent(src: _Source, offset: int) -> str | None:
    """parentFileNameHint, looked for where and how QEMU looks (vmdk_parent_open)."""
    desc = src.read(offset, _VMDK_DESC_SIZE).split(b"\0", 1)[0]
    key = b"parentFileNameHint"
    at = desc.find(key)
    if at < 0:
        return None
    start = at + len(key) + 2
    end = desc.find(b'"', start)
    if end < 0:
        raise ImageError("vmdk parentFileNameHint is not terminated")
    if end - start > _PATH_MAX:
        raise ImageError(f"vmdk parentFileNameHint is too long ({end - start} bytes)")
    return _name(desc[start:end])


# --------------------------------------------------------------------------------------------
# The files a VMDK descriptor names


def vmdk_extent_files(path: str) -> tuple[str, ...]:
    """The files QEMU will open as extents of the VMDK at ``path``, names exactly as stored.

    Like a backing file, an extent may name any file or device on the host: the caller decides
    whether to follow them.  Read within `MAX_PROBE_BYTES`, non-blocking like `probe`.

    :raise ImageError: unreadable, not a VMDK, or a descriptor too long to see all its extents;
        the error carries ``path``.
    """
    return _on_file(path, vmdk_extent_files_reader)


def vmdk_extent_files_reader(read: Reader, size: int) -> tuple[str, ...]:
    """`vmdk_extent_files` on a read function: the extents of a descriptor QEMU would open.

    A sparse file holds its own data (empty answer) unless its header only points at an embedded
    descriptor; a text descriptor is read from the start.  The lines counted are those QEMU opens:
    ``RW``, a known extent type, a positive size.

    :raise ImageError: not a VMDK, a malformed extent line, or a descriptor that goes on past the
        `_DESC_LIMIT` bytes we read (QEMU would read further: we cannot vouch for the rest).
    """
    src = _Source(read, size)
    head = src.read(0, _HEAD_BYTES)
    if head.startswith(_VMDK4_MAGIC) and len(head) >= _SECTOR:
        fields = _VMDK4.unpack_from(head, 4)
        capacity, desc_off = fields[2], fields[4]
        if capacity != 0 or not desc_off:
            return ()
        offset = desc_off * _SECTOR
    elif head.startswith(_VMDK3_MAGIC):
        return ()
    elif _looks_like_vmdk_descriptor(head[:_PROBE_BUF]):
        offset = 0
    else:
        raise ImageError("is not a vmdk image")
    raw = src.read(offset, _DESC_LIMIT)
    desc, nul, _ = raw.partition(b"\0")
    if not nul and len(raw) == _DESC_LIMIT and offset + _DESC_LIMIT < size:
        raise ImageError(f"vmdk descriptor is longer than {_DESC_LIMIT} bytes; refused")
    names: list[str] = []
    for line in desc.split(b"\n"):
        m = _VMDK_EXTENT.match(line)
        if m is not None and _vmdk_extent_sectors(line) > 0:
            names.append(os.fsdecode(m.group(4)))
    return tuple(names)
