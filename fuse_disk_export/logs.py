"""Where messages go: stderr in the foreground; for a ``-d`` daemon, which has no terminal, the
file named with ``--log-file`` (opened before detaching, so that a bad path is reported where the
user is looking, and kept across python-daemon's closing of file descriptors; it also receives
qemu-storage-daemon's own messages, as the daemon's stderr), else syslog through /dev/log when
that exists.  And the warnings of a setup, collected for the ``-d`` parent and ``--list``.
"""

from __future__ import annotations

import logging
import os
import sys
from types import TracebackType
from typing import IO

from fuse_disk_export.errors import UsageError

SYSLOG_SOCKET = "/dev/log"
IDENT = "fuse-disk-export"

FILE_FORMAT = f"%(asctime)s {IDENT}[%(process)d]: %(levelname)s: %(message)s"

#: The logger every module of the package logs under (``logging.getLogger(__name__)``).
PACKAGE = "fuse_disk_export"


def say(text: str) -> None:
    """Print ``text`` (a line, or lines) on stdout.  A reader that has gone (a pipe closed, as
    by ``| head -0``) is no error: what the command does does not depend on being read, and
    its exit status reports what it did."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        stdout_gone()


def stdout_gone() -> None:
    """What is still buffered for a stdout whose reader has gone is dropped, and whatever
    follows goes to /dev/null, so that no later write or flush fails."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, sys.stdout.fileno())
    finally:
        os.close(null)


class WarningCollector(logging.Handler):
    """The message of every warning (and error) the package logs, from entering until `stop`:
    how a setup's warnings travel to the waiting parent of a ``-d`` run and into the registry.

    Collected whatever the command line prints: its own handlers filter by level, the loggers
    let every warning through (`setup_terminal`).
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # a bad format: logging's own way of reporting it
            self.handleError(record)

    def __enter__(self) -> WarningCollector:
        logging.getLogger(PACKAGE).addHandler(self)
        return self

    def stop(self) -> None:
        logging.getLogger(PACKAGE).removeHandler(self)

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.stop()


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


class _OneLine(logging.Formatter):
    """Warnings and errors as the tool's own lines (``fuse-disk-export: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{IDENT}: {text}" if record.levelno >= logging.WARNING else text


def setup_terminal(*, verbose: bool, quiet: bool) -> None:
    """Every message of a foreground run (and a -d run before it detaches) to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if verbose:
        root.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    else:
        # -q filters at the handler: warnings still reach a `WarningCollector`.
        root.setLevel(logging.WARNING)
        handler.setLevel(logging.ERROR if quiet else logging.WARNING)


def setup_daemon(log_file: IO[str] | None, *, verbose: bool = False) -> None:
    """Send every message of this (detached) process to `daemon_handler`, from INFO up."""
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [daemon_handler(log_file)]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
