"""The userspace FUSE drivers ``--mount-fs`` runs, one per filesystem family, and the names
``--fs-type`` takes.

`FAMILIES` says which family each name of `filesystems.identify` (libblkid's TYPE) belongs to,
and so which driver, if any, serves it.
"""

from typing import NamedTuple

from fuse_disk_export.filesystems import Read, identify


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
    #: It writes a line for each request it serves, which tells a user nothing: its stderr is
    #: only logged (-v), and its last line is kept for an error.
    chatty: bool = False


DRIVERS: dict[str, Driver] = {
    "ext": Driver("ext", "fuse2fs", "fuse2fs", True, ("-f",)),
    "ntfs": Driver("ntfs", "ntfs-3g", "ntfs-3g", True, ("-o", "no_detach")),
    # fusefat writes only with "-o rw+", which its author calls experimental.
    # fusefat 1.0 writes "getattr(/)", "readdir(/)", the layout at each mount and, run read-only,
    # a failed write-back of its table at each unmount ("write() error: Bad file descriptor").
    "vfat": Driver("vfat", "fusefat", "fusefat", False, ("-f",), chatty=True),
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

#: What `identify` can name (libblkid's TYPE), and the driver family each belongs to (None: no
#: driver of ours serves it).
FAMILIES: dict[str, str | None] = {
    "vfat": "vfat",
    "ntfs": "ntfs",
    "exfat": None,
    "ext2": "ext",
    "ext3": "ext",
    "ext4": "ext",
    "ext4dev": "ext",
    "jbd": None,
    "btrfs": None,
    "xfs": None,
    "iso9660": "iso9660",
    "squashfs": "squashfs",
    "squashfs3": None,
    "swap": None,
    "crypto_LUKS": None,
    "LVM2_member": None,
}


def probe(read: Read, size: int) -> str | None:
    """The driver family (a key of `DRIVERS`, or a name none of them serves such as "btrfs")
    of what `identify` finds, or None."""
    found = identify(read, size)
    if found is None:
        return None
    return FAMILIES[found] or found
