"""Partition tables of virtual disks, read through a short-lived private read-only export.

The table lives in the *virtual* disk, which only QEMU can read for formats other than raw.  So
each image is exported read-only on a private temporary file for as long as it takes to read the
table with our own bounded parser, then reverted — the same engine as a real export, with no path
of the user's ever mounted over.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence

from fuse_disk_export.engine.bringup import bring_up, secret_files, terminate
from fuse_disk_export.engine.graph import ImageSpec, Layer, Slice, plan
from fuse_disk_export.errors import PartitionError
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


def read_tables(
    specs: Sequence[ImageSpec], secrets: Mapping[str, str] | None = None
) -> list[PartitionTable]:
    """The partition table of each image's virtual disk (scheme "none" when it has none).

    :raise PartitionError: a table is malformed (the error names the image and the table).
    :raise FdeError: the images cannot be opened (as for an export).
    """
    with tempfile.TemporaryDirectory(prefix="fuse-disk-export-") as tmp:
        views = []
        for index, spec in enumerate(specs):
            mountpoint = os.path.join(tmp, f"{index}.raw")
            open(mountpoint, "wb").close()
            views.append(_read_only_view(spec, mountpoint))
        with secret_files(secrets or {}) as (files, fds):
            graph = plan(views, secret_files=files)
            up = bring_up(graph, pass_fds=fds)
        try:
            return [_read(view.mountpoint, view.image) for view in views]
        finally:
            terminate(up, graph)


def partition_slice(table: PartitionTable, number: int, image: str) -> Slice:
    """The byte range of partition ``number``, as a `Slice` to export.

    :raise PartitionError: there is no such partition (the message lists those there are).
    """
    try:
        part = table.get(number)
    except PartitionError as e:
        raise PartitionError(e.reason, path=image) from None
    return Slice(part.start, part.size)
