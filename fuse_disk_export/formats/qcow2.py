"""qcow2 (QEMU's block/qcow2.c): the header, its extensions, its backing name, its tables."""

import struct
from typing import Final, NamedTuple

from fuse_disk_export.errors import ImageError
from fuse_disk_export.formats.common import (
    LEGACY_AES,
    NAME_MAX,
    ImageInfo,
    Source,
    sectors_floor,
    stored_name,
    u32be,
)

_QCOW2_EXT_LIMIT: Final = 64 * 1024  # qcow2 header extensions we walk (QEMU's are < 1 KiB)


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
_QCOW2_CRYPT_AES: Final = 1
_QCOW2_CRYPT_LUKS: Final = 2
#: `ImageInfo.encryption` by the header's crypt_method (checked to be one of them).
_ENCRYPTION: Final = {0: "", _QCOW2_CRYPT_AES: "aes", _QCOW2_CRYPT_LUKS: "luks"}


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


def parse(src: Source, head: bytes) -> ImageInfo:
    """qcow2: the header, its extensions, its backing name, and where its tables lie."""
    version = u32be(head, 4) if len(head) >= 8 else 3
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
        limit = min(NAME_MAX, h.cluster_size - h.backing_offset)
        if h.backing_size > limit:
            raise ImageError(
                f"qcow2 backing file name is too long ({h.backing_size} bytes, at most {limit})"
            )
        backing = stored_name(
            src.exact(h.backing_offset, h.backing_size, "qcow2 backing file name")
        )
    return ImageInfo(
        "qcow2",
        sectors_floor(h.size),
        backing_file=backing,
        backing_format=ext.backing_format if backing else None,
        encryption=_ENCRYPTION[h.crypt_method],
        data_file=data_file,
        read_only=(
            "it is marked corrupt, and QEMU opens it read-only (qemu-img check -r all repairs it)"
            if h.incompatible & _QCOW2_INCOMPAT_CORRUPT
            else LEGACY_AES
            if h.crypt_method == _QCOW2_CRYPT_AES
            else ""
        ),
    )


def _qcow2_header(src: Source, head: bytes, version: int) -> _Qcow2Header:
    need = _QCOW2_V2.size if version == 2 else _QCOW2_V2.size + _QCOW2_V3.size
    data = src.header(head, "qcow2", need)
    _, _, boff, bsize, cbits, size, crypt, *tables = _QCOW2_V2.unpack_from(data)
    l1_size, l1_off, rt_off, rt_clusters, nb_snap, snap_off = tables
    incompat, refcount_order, header_length, compression = 0, 4, _QCOW2_V2.size, 0
    if version == 3:
        incompat, _, _, refcount_order, header_length = _QCOW2_V3.unpack_from(data, _QCOW2_V2.size)
        if header_length < 104:
            raise ImageError(f"qcow2 header is too short (header_length {header_length} < 104)")
        if header_length > src.size:
            raise src.truncated("qcow2", header_length)
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


def _check_qcow2_header(src: Source, h: _Qcow2Header) -> None:
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


def _check_qcow2_tables(src: Source, h: _Qcow2Header) -> None:
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
    src: Source, h: _Qcow2Header, name: str, offset: int, entries: int, width: int, limit: int
) -> None:
    if entries > limit // width:
        raise ImageError(f"qcow2 {name} table is too large")
    if offset % h.cluster_size:
        raise ImageError(f"qcow2 {name} table offset is not aligned to a cluster")
    if entries and offset + entries * width > src.size:
        raise src.past_end(f"qcow2 {name} table")


def _qcow2_extensions(src: Source, head: bytes, h: _Qcow2Header) -> _Qcow2Extensions:
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


def _qcow2_extensions_cut(src: Source, needed_end: int) -> ImageError:
    if needed_end > src.size:
        return src.past_end("qcow2 header extension")
    return ImageError(f"qcow2 header extensions run past {_QCOW2_EXT_LIMIT} bytes")


def _qcow2_extension(
    src: Source, h: _Qcow2Header, kind: int, data: bytes, found: _Qcow2Extensions
) -> None:
    if kind == _QCOW2_EXT_BACKING_FORMAT:
        if len(data) >= 16:
            raise ImageError(f"qcow2 backing format name is too long ({len(data)} bytes)")
        found.backing_format = stored_name(data)
    elif kind == _QCOW2_EXT_DATA_FILE:
        found.data_file = stored_name(data)
    else:
        if h.crypt_method != _QCOW2_CRYPT_LUKS:
            raise ImageError("qcow2 encryption header extension without LUKS encryption")
        if len(data) != 16:
            raise ImageError(f"qcow2 encryption header extension has size {len(data)}, not 16")
        offset, length = struct.unpack(">QQ", data)
        if offset % h.cluster_size:
            raise ImageError("qcow2 encryption header offset is not aligned to a cluster")
        if offset + length > src.size:
            raise src.past_end("qcow2 encryption header")
        found.crypto_header = True
