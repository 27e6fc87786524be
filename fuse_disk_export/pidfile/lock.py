"""The ``-p`` pid file: written once live, locked for as long as we serve, removed on revert.

The lock is QEMU's own (``--pidfile`` of qemu-nbd and qemu-storage-daemon): a POSIX record lock on
the whole file, held by the process whose pid it holds.  A second instance given the same name sees
the lock and refuses *before* exporting anything, instead of taking the file from a live export;
a file whose process is gone holds no lock and is taken over.  The kernel drops the lock however we
exit, SIGKILL included.
"""

from __future__ import annotations

import fcntl
import os
import struct

from fuse_disk_export.errors import PidFileError

# struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t), padding.
_FLOCK = "hhqqi4x"


def holder(path: str) -> int | None:
    """The pid of the process that holds the lock on ``path``, or None (no file, or no lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    finally:
        os.close(fd)
    return pid if kind != fcntl.F_UNLCK else None


def _held_error(path: str, pid: int | None) -> PidFileError:
    who = f"process {pid}" if pid else "another process"
    return PidFileError(f"pid file is held by {who}, which is still running", path=path)


def check_free(path: str) -> None:
    """Refuse a pid file that a live process holds (before anything is exported).

    :raise PidFileError: it is held.
    """
    pid = holder(path)
    if pid is not None:
        raise _held_error(path, pid)


class PidFile:
    """Our pid in ``path``, locked until `release`; removed then if it is still ours."""

    def __init__(self, path: str) -> None:
        """Create or take over ``path``, lock it and write our pid.

        :raise PidFileError: another live process holds it, or it cannot be written.
        """
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise PidFileError(f"cannot write the pid file: {e.strerror}", path=path) from None
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise _held_error(path, holder(path)) from None
            # Between our open and our lock, the holder may have removed the file (and another
            # instance made a new one): then the lock is on a file nobody sees.
            if not _same_file(fd, path):
                raise _held_error(path, holder(path))
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise PidFileError(f"cannot write the pid file: {e.strerror}", path=path) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the file if it is still the one we locked, then drop the lock."""
        if self._fd < 0:
            return
        try:
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = -1


def _same_file(fd: int, path: str) -> bool:
    try:
        ours, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino)
