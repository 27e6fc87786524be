"""One fuse-disk-export per mount point at a time.

Two invocations on the same image, started together, both find its path unmounted.  The one whose
qemu-storage-daemon then fails (QEMU's image lock, or it opened the other's raw view) rolls back by
detaching what is mounted on its mount point: the other's live export, which then serves nothing
while it reports live, and writes meant for the raw view land in the image file itself.  So each
mount point is claimed before anything is made or started, and the claim is held until the revert
is done: the second invocation is refused before it touches anything.

A claim is a write lock on one byte of a file in the registry's folder (`registry.registry_dir`), at
an offset computed from the path: an open-file-description lock, so that one descriptor holds the
claims of thousands of images, and the kernel drops them however we exit, SIGKILL included.  The
file is never removed (it holds no data), so no claim can be taken on a file nobody else sees.
"""

import contextlib
import fcntl
import os
import struct
import zlib
from collections.abc import Iterator, Sequence

from fuse_disk_export import registry
from fuse_disk_export.errors import MountError

# struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t), padding.
_FLOCK = "hhqqi4x"
_CLAIMS = "claims"


def _offset(path: str) -> int:
    data = os.fsencode(path)
    # Two checksums of different kinds rather than hashlib, whose import costs more than
    # everything else here on the path to live; below 2**62, so that offset + 1 fits an off_t.
    return (zlib.crc32(data) << 30 | zlib.adler32(data) & (2**30 - 1)) & (2**62 - 1)


def _lock(fd: int, kind: int, offset: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0))


def _refusal(path: str) -> MountError:
    # The registry names the holder once it is live; before, it is setting up or reverting.
    record = registry.find_by_mountpoint(path)
    if record is not None:
        return MountError(f"already exported by fuse-disk-export pid {record.pid}", path=path)
    return MountError(
        "another fuse-disk-export is setting up or reverting an export on this path", path=path
    )


@contextlib.contextmanager
def claimed(paths: Sequence[str]) -> Iterator[None]:
    """Hold a claim on every path of ``paths`` while the block runs.

    :raise MountError: another fuse-disk-export holds one of them (none is held then).
    """
    directory = registry.registry_dir()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(
        os.path.join(directory, _CLAIMS),
        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
        0o600,
    )
    try:
        for path in paths:
            try:
                _lock(fd, fcntl.F_WRLCK, _offset(path))
            except (BlockingIOError, PermissionError):  # EAGAIN, EACCES: held
                raise _refusal(path) from None
        yield
    finally:
        # Every claim goes with the descriptor.
        os.close(fd)
