"""Partition tables of virtual disks, read through a short-lived private read-only export.

The table lives in the *virtual* disk, which only QEMU can read for formats other than raw.  So
each image is exported read-only on a private temporary file for as long as it takes to read the
table with our own bounded parser, then reverted — the same engine as a real export, with no path
of the user's ever mounted over.
"""

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

from fuse_disk_export import engine, stopsignals
from fuse_disk_export.engine.graph import ImageSpec, Layer, Slice
from fuse_disk_export.errors import PartitionError
from fuse_disk_export.filesystems import Read, identify
from fuse_disk_export.partitions import PartitionTable, read_table


def _read_only_view(spec: ImageSpec, mountpoint: str) -> ImageSpec:
    return spec._replace(
        layers=tuple(Layer(layer.path, layer.format, read_only=True) for layer in spec.layers),
        mountpoint=mountpoint,
        writable=False,
        slice=None,
    )


def _read(path: str, image: str) -> PartitionTable:
    with open(path, "rb") as f:
        fd = f.fileno()
        try:
            return read_table(
                lambda offset, length: os.pread(fd, length, offset), os.fstat(fd).st_size
            )
        except PartitionError as e:
            raise PartitionError(e.reason, path=image) from None


class Disk(NamedTuple):
    """A virtual disk's table, and the filesystem of each partition and of the whole disk."""

    table: PartitionTable
    #: Partition number -> what ``blkid -p`` would call its content ("ext4", "vfat", ...; see
    #: `filesystems.identify`), or None where nothing was recognised.
    filesystems: dict[int, str | None]
    #: What the disk itself holds at its start when no partition does (a disk formatted whole,
    #: without a table, or behind an MBR that lists no partitions): None otherwise.
    whole: str | None


def _filesystems(path: str, table: PartitionTable) -> tuple[dict[int, str | None], str | None]:
    with open(path, "rb") as f:
        fd = f.fileno()

        def at(base: int, limit: int) -> Read:
            def read(offset: int, length: int) -> bytes:
                length = max(0, min(length, limit - offset))
                return os.pread(fd, length, base + offset) if length else b""

            return read

        size = os.fstat(fd).st_size
        found = {p.number: identify(at(p.start, p.size), p.size) for p in table.partitions}
        return found, identify(at(0, size), size) if not table.partitions else None


def probe_disk(path: str, image: str | None = None) -> Disk:
    """The table of the raw disk at ``path`` and what it holds (``image``: the name errors give).

    :raise PartitionError: the table is malformed.
    """
    table = _read(path, image or path)
    try:
        return Disk(table, *_filesystems(path, table))
    except OSError as e:  # QEMU's EIO from a damaged image, read through the view
        raise PartitionError(f"reading its filesystems: {e.strerror}", path=image or path) from None


def read_disks(specs: Sequence[ImageSpec], secrets: Mapping[str, str] | None = None) -> list[Disk]:
    """Each virtual disk's partition table and the filesystems in it (``--mount-fs``,
    ``--list-partitions``).

    :raise PartitionError: a table is malformed.
    :raise FdeError: the images cannot be opened (as for an export).
    """
    disks: list[Disk] = []
    with _views(specs, secrets) as views:
        for view in views:
            disks.append(probe_disk(view.mountpoint, view.image))
    return disks


@contextlib.contextmanager
def _views(
    specs: Sequence[ImageSpec], secrets: Mapping[str, str] | None
) -> Iterator[list[ImageSpec]]:
    """Every image exported read-only on a private temporary file for the block."""
    with tempfile.TemporaryDirectory(prefix="fuse-disk-export-") as tmp:
        views = []
        for index, spec in enumerate(specs):
            mountpoint = os.path.join(tmp, f"{index}.raw")
            open(mountpoint, "wb").close()
            views.append(_read_only_view(spec, mountpoint))
        with engine.secret_files(secrets or {}) as (files, fds), stopsignals.watching() as signals:
            # A stop signal ends a daemon that hangs opening an image (engine.daemon.SETUP_GRACE).
            graph = engine.plan(views, secret_files=files)
            daemon = engine.start(graph, pass_fds=fds, watch=[signals])
        try:
            yield views
        finally:
            engine.stop(daemon)


def read_tables(
    specs: Sequence[ImageSpec], secrets: Mapping[str, str] | None = None
) -> list[PartitionTable]:
    """The partition table of each image's virtual disk (scheme "none" when it has none).

    :raise PartitionError: a table is malformed (the error names the image and the table).
    :raise FdeError: the images cannot be opened (as for an export).
    """
    with _views(specs, secrets) as views:
        return [_read(view.mountpoint, view.image) for view in views]


def partition_slice(table: PartitionTable, number: int, image: str) -> Slice:
    """The byte range of partition ``number``, as a `Slice` to export.

    :raise PartitionError: there is no such partition (the message lists those there are).
    """
    try:
        part = table.get(number)
    except PartitionError as e:
        raise PartitionError(e.reason, path=image) from None
    return Slice(part.start, part.size)
