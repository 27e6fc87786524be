"""What a user can fix, checked before anything starts: each failure says how to fix it.

Without these, the same problems surface as QEMU's generic "Failed to mount FUSE session to export"
after a daemon has been started; here they are one line that names the missing piece.
"""

from __future__ import annotations

import os
import stat

from fuse_disk_export import mounts
from fuse_disk_export.engine.process import find_binary
from fuse_disk_export.errors import RequirementError

FUSE_DEVICE = "/dev/fuse"


#: The FUSE device's numbers (the kernel's misc device FUSE_MINOR).
FUSE_RDEV = os.makedev(10, 229)


def not_the_fuse_device(st: os.stat_result) -> str | None:
    """What the file of ``st`` is instead of the FUSE device (a bind mount of /dev/null over
    it, a regular file), or None: libfuse would fail with a bare EINVAL."""
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == FUSE_RDEV:
        return None
    if stat.S_ISCHR(st.st_mode):
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        return f"not the FUSE device: character device {major}:{minor}, not 10:229"
    return "not the FUSE device: not a character device"


def check_fuse(device: str = FUSE_DEVICE) -> None:
    """/dev/fuse present and readable and writable by us; fusermount3 present when not root.

    :raise RequirementError: what is missing, and the remedy.
    """
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise RequirementError(
            "missing: the kernel's FUSE module is not loaded (modprobe fuse), or a container "
            "was started without the device",
            path=device,
        ) from None
    except OSError as e:
        raise RequirementError(f"cannot be used: {e.strerror}", path=device) from None
    if (wrong := not_the_fuse_device(st)) is not None:
        raise RequirementError(f"{wrong}; as root: mknod {device} c 10 229", path=device)
    if not os.access(device, os.R_OK | os.W_OK):
        mode = stat.S_IMODE(st.st_mode)
        raise RequirementError(
            f"permission denied: FUSE exports need read and write access, and its mode is "
            f"{mode:04o} (owner uid {st.st_uid}); ask an administrator for "
            f"'chmod 0666 {device}', Debian's default",
            path=device,
        )
    if os.geteuid() != 0 and mounts.fusermount() is None:
        raise RequirementError(
            "fusermount3 not found: without root, FUSE mounts need it (Debian package fuse3)"
        )


def check_daemon(binary: str = "qemu-storage-daemon") -> None:
    """:raise RequirementError: qemu-storage-daemon is not installed."""
    find_binary(binary)
