"""Where a ``-d`` daemon's messages go: ``--log-file``, else syslog, else nowhere.

In the foreground, messages go to stderr (set up by the command line).  A daemon has no terminal:
it logs to the file named with ``--log-file`` (opened before detaching, so a bad path is reported
where the user is looking, and preserved across python-daemon's closing of file descriptors; it
also receives qemu-storage-daemon's own messages, as the daemon's stderr), else to syslog through
/dev/log when that exists.  Imported only on the ``-d`` path.
"""

from __future__ import annotations

import logging
import os
from typing import IO

from fuse_disk_export.errors import UsageError

SYSLOG_SOCKET = "/dev/log"
IDENT = "fuse-disk-export"

FILE_FORMAT = f"%(asctime)s {IDENT}[%(process)d]: %(levelname)s: %(message)s"


def open_log_file(path: str) -> IO[str]:
    """Open ``path`` for appending, line-buffered.

    :raise UsageError: it cannot be opened (reported before detaching).
    """
    try:
        return open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    except OSError as e:
        raise UsageError(f"cannot open the log file: {e.strerror}", path=path) from None


def daemon_handler(log_file: IO[str] | None, *, syslog: str = SYSLOG_SOCKET) -> logging.Handler:
    """The handler a detached daemon logs through (call it after detaching)."""
    if log_file is not None:
        handler: logging.Handler = logging.StreamHandler(log_file)
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        return handler
    if os.path.exists(syslog):
        from logging.handlers import SysLogHandler  # only a daemon logging to syslog pays

        try:
            syslog_handler = SysLogHandler(
                address=syslog,
                facility=SysLogHandler.LOG_DAEMON,
            )
        except OSError:
            return logging.NullHandler()
        syslog_handler.ident = f"{IDENT}[{os.getpid()}]: "
        return syslog_handler
    return logging.NullHandler()


def setup_daemon(log_file: IO[str] | None, *, verbose: bool = False) -> None:
    """Send every message of this (detached) process to `daemon_handler`, from INFO up."""
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [daemon_handler(log_file)]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # qemu.qmp's messages are about its connection's life; ours say what it means for the user.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
