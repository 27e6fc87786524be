"""``--mount-fs``: which partition of the image to export, and which filesystem in it to mount,
chosen while the request is built (`request.build_request`), before anything is exported.

The partition is exported on a private file of ours, and `FsPlan` says how its filesystem is
mounted over it (`mount`, once the export is live).
"""

import os
from typing import TYPE_CHECKING, NamedTuple

from fuse_disk_export.errors import ImageError, UsageError
from fuse_disk_export.images import Resolved, as_made
from fuse_disk_export.options import Options

if TYPE_CHECKING:
    from fuse_disk_export.table_reader import Disk


class FsPlan(NamedTuple):
    """Where and how ``--mount-fs`` mounts the filesystem of the export."""

    directory: str
    fs: str
    read_only: bool
    #: The private folder of the export's file: made by the setup (``lifecycle.live``), which
    #: removes it again, so that nothing is left of a request that is never set up.
    private_dir: str


def _describe(disk: "Disk") -> str:
    return ", ".join(
        f"{p.number}: {disk.filesystems.get(p.number) or 'nothing recognised'}"
        for p in disk.table.partitions
    )


def _choose(options: Options, image: str, disk: "Disk") -> tuple[int | None, str]:
    """The partition (None: the whole disk) and the filesystem ``--mount-fs`` mounts.

    Every refusal says what was found and what to try.
    """
    from fuse_disk_export.mountfs.drivers import DRIVERS, FAMILIES, FS_TYPES

    forced = FS_TYPES[options.fs_type] if options.fs_type else None
    types = ", ".join(sorted(FS_TYPES))
    if options.partition is not None:
        disk.table.get(options.partition)  # PartitionError, listing those there are
        number: int | None = options.partition
        found = disk.filesystems.get(options.partition)
    elif not disk.table.partitions:
        number, found = None, disk.whole
    else:
        with_fs = [n for n, fs in disk.filesystems.items() if fs is not None]
        if len(with_fs) == 1:
            number = with_fs[0]
            found = disk.filesystems[number]
        elif with_fs:
            raise UsageError(
                f"{len(with_fs)} partitions hold a filesystem ({_describe(disk)}); "
                "choose one with -P N",
                path=image,
            )
        elif forced is None:
            raise ImageError(
                f"no partition holds a filesystem we recognise ({_describe(disk)}); "
                f"choose one with -P N and give its type with --fs-type ({types})",
                path=image,
            )
        else:
            raise UsageError(
                f"no partition holds a filesystem we recognise ({_describe(disk)}); "
                f"choose the one that holds {options.fs_type} with -P N",
                path=image,
            )
    fs = forced or (FAMILIES[found] if found else None)
    if number is not None:
        where = f"partition {number}"
    elif disk.table.scheme == "none":
        where = "the disk (no partition table)"
    else:
        where = f"the disk (an {disk.table.scheme.upper()} with no partitions)"
    if fs is None and found is None:
        raise ImageError(
            f"no filesystem recognised on {where}; give --fs-type ({types}) to try a driver anyway",
            path=image,
        )
    if fs is None or fs not in DRIVERS:
        raise UsageError(
            f"{where} holds {found}, which none of our userspace drivers serves "
            f"(they serve: {', '.join(sorted(DRIVERS))}); export it without --mount-fs",
            path=image,
        )
    return number, fs


def with_filesystem(
    options: Options, images: list[Resolved], secrets: dict[str, str]
) -> tuple[list[Resolved], FsPlan]:
    """``--mount-fs``: the partition to export on a private file, and how to mount its
    filesystem."""
    import tempfile

    from fuse_disk_export.mountfs import mount
    from fuse_disk_export.mountfs.drivers import DRIVERS
    from fuse_disk_export.table_reader import partition_slice, read_disks

    assert options.mount_fs is not None
    directory = os.path.abspath(options.mount_fs)
    mount.check_directory(directory)
    (r,) = images
    (disk,) = read_disks([as_made(r)], secrets)
    number, fs = _choose(options, r.spec.image, disk)
    read_only = not r.spec.writable
    driver = DRIVERS[fs]
    if not read_only and not driver.writes:
        raise UsageError(
            f"{driver.program} ({fs}) does not write safely: export it read-only (-r)",
            path=r.spec.image,
        )
    mount.find_driver(fs)
    table_slice = partition_slice(disk.table, number, r.spec.image) if number is not None else None
    # The image is resolved already: only where it is exported changes, to a file of our own.
    private = os.path.join(tempfile.gettempdir(), f"fuse-disk-export-fs-{os.urandom(6).hex()}")
    spec = r.spec._replace(mountpoint=os.path.join(private, "disk.raw"), slice=table_slice)
    view = r._replace(spec=spec, creates_mountpoint=True)
    return [view], FsPlan(directory, fs, read_only, private)
