"""The one exception hierarchy of fuse-disk-export: every class of it is here.

Every error a user can meet derives from `FdeError`. Its ``str()`` is the one line the command line
prints: the file it is about, then the reason.  Anything that is not an `FdeError` is a bug and is
shown with a traceback.

::

    FdeError
     +-- UsageError          the command line does not make sense (exit status 2)
     +-- ImageError          the image cannot be used
     |    +-- BackingError
     |    +-- PartitionError
     |    +-- ProbeLimitError
     +-- MountError          a mount point cannot be used
     +-- PidFileError        the pid file is held, or cannot be written
     +-- FsError             the --mount-fs driver failed or died
     +-- QemuError           qemu-storage-daemon refused, could not start, or died
     |    +-- LockedError
     +-- RequirementError    something this machine lacks
     +-- Interrupted         a stop signal (SIGINT, SIGTERM, SIGHUP) cut a run short (128+N)
"""

from __future__ import annotations

import signal


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


class ProbeLimitError(ImageError):
    """A probe would have read more than its bound (`formats.common.MAX_PROBE_BYTES`).

    Every parser bounds its own reads well below the limit, so this means a parser lost its bound:
    it is an `ImageError` so that callers need nothing special, and a class of its own so that the
    fuzz tests can tell it from an honest refusal.
    """


class MountError(FdeError):
    """A mount point cannot be used: already mounted, a directory, a dead FUSE mount..."""


class PidFileError(FdeError):
    """The pid file is held by a live process, or cannot be written."""


class FsError(FdeError):
    """The ``--mount-fs`` filesystem driver failed, or died."""


class QemuError(FdeError):
    """qemu-storage-daemon refused a command, could not be started, or died."""


class LockedError(QemuError):
    """The image is locked by another process (typically another QEMU)."""


class RequirementError(FdeError):
    """Something this machine lacks: qemu-storage-daemon, /dev/fuse, fusermount3."""


def limit_reached(e: BaseException) -> RequirementError | None:
    """The error to show for a process or thread the system would not create (fork's EAGAIN,
    Python's "can't start new thread"), or None for any other exception.  Wherever it happened,
    whatever was set up has been undone on the way out."""
    if isinstance(e, BlockingIOError) or (
        isinstance(e, RuntimeError) and "can't start new thread" in str(e)
    ):
        return RequirementError(
            "cannot start a process or thread: the limit on processes (ulimit -u) is reached, "
            "or memory is short"
        )
    return None


class Interrupted(FdeError):
    """A stop signal arrived before the work was done: at a prompt, while listing or stopping,
    or before every export was live (then everything was rolled back).

    The one exception for "interrupted": the command line records stop signals from its first
    line (`stopsignals`), so Python's KeyboardInterrupt never reaches it.
    """

    def __init__(self, signame: str, *, during_setup: bool = True) -> None:
        reason = f"interrupted by {signame}"
        if during_setup:
            reason += " during setup; nothing was left mounted"
        super().__init__(reason)
        self.signame = signame
        #: 128+N, as a shell reports a command that signal N ended.
        if signame in signal.Signals.__members__:
            self.exit_status = 128 + int(signal.Signals[signame])
