"""The one exception hierarchy of fuse-disk-export.

Every error a user can meet derives from `FdeError`. Its ``str()`` is the one line the command line
prints: the file it is about, then the reason.  Anything that is not an `FdeError` is a bug and is
shown with a traceback.
"""

from __future__ import annotations


class FdeError(Exception):
    """Base class: a failure written for people, optionally about one file.

    :param reason: what went wrong, in words a user understands.
    :param path: the file (image, mount point, pid file...) the failure is about.
    """

    #: Process exit status the command line uses for this kind of failure.
    exit_status = 1

    def __init__(self, reason: str, *, path: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class UsageError(FdeError):
    """The command line does not make sense (bad option combination, bad value)."""

    exit_status = 2


class ImageError(FdeError):
    """The image cannot be used: missing, not a regular file, malformed, truncated, wrong format."""


class BackingError(ImageError):
    """The image names a backing file (or data file) that the backing policy refuses."""


class PartitionError(ImageError):
    """A partition table is malformed or the requested partition does not exist."""


class MountError(FdeError):
    """A mount point cannot be used: already mounted, a directory, a dead FUSE mount..."""


class QemuError(FdeError):
    """qemu-storage-daemon refused a command, could not be started, or died."""


class LockedError(QemuError):
    """The image is locked by another process (typically another QEMU)."""


class RequirementError(FdeError):
    """Something this machine lacks: qemu-storage-daemon, /dev/fuse, fusermount3."""


class Interrupted(FdeError):
    """A stop signal arrived before every export was live; everything was rolled back."""

    def __init__(self, signame: str) -> None:
        import signal

        super().__init__(f"interrupted by {signame} during setup; nothing was left mounted")
        self.signame = signame
        #: 128+N, as a shell reports a command that signal N ended.
        if signame in signal.Signals.__members__:
            self.exit_status = 128 + int(signal.Signals[signame])
