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

This module is the face: it opens the file, reads the first bytes, and hands them to the parser
`formats.signatures` names, one module per format in `fuse_disk_export.formats`.  A format's
module is imported the first time an image of that format is probed, so that start-up, and
probing raw images, import none.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import TypeVar

from fuse_disk_export.bounded import Reader
from fuse_disk_export.errors import ImageError, ProbeLimitError
from fuse_disk_export.formats.common import (
    HEAD_BYTES,
    MAX_PROBE_BYTES,
    SECTOR,
    ImageInfo,
    Source,
)
from fuse_disk_export.formats.signatures import match_head, match_tail

__all__ = [
    "MAX_PROBE_BYTES",
    "ImageInfo",
    "ProbeLimitError",
    "probe",
    "probe_reader",
    "vmdk_extent_files",
    "vmdk_extent_files_reader",
]

_T = TypeVar("_T")


def probe(path: str) -> ImageInfo:
    """Open ``path`` and probe it.

    The caller has already resolved the path; we only refuse what cannot be an image file.

    :raise ImageError: missing, unreadable, not a regular file, or a malformed header; the error
        carries ``path``.
    """
    return _on_file(path, probe_reader)


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
    src = Source(read, size)
    head = src.read(0, HEAD_BYTES)
    parser = match_head(head)
    if parser is None and size >= SECTOR:
        parser = match_tail(src.read(size - SECTOR, SECTOR))
    if parser is None:
        return ImageInfo("raw", size)
    return _parse(parser, src, head)


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
        bytes we read of it (QEMU would read further: we cannot vouch for the rest).
    """
    from fuse_disk_export.formats import vmdk

    return vmdk.extent_files(Source(read, size))


def _parse(parser: str, src: Source, head: bytes) -> ImageInfo:
    """Run ``parser``, a ``"module.function"`` of `fuse_disk_export.formats`.

    Its module is imported here, the first time its format is met, rather than with this one.
    """
    import importlib

    module, _, function = parser.partition(".")
    parse: Callable[[Source, bytes], ImageInfo] = getattr(
        importlib.import_module(f"fuse_disk_export.formats.{module}"), function
    )
    return parse(src, head)


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
