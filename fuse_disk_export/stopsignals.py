"""SIGINT, SIGTERM and SIGHUP, recorded from the entry point's first line until the run ends.

A job started with ``&`` by a non-interactive shell inherits SIGINT *ignored*; a signal that
arrives before a handler is installed is then discarded by the kernel, and an export that goes live
afterwards would never be reverted.  So the entry point installs `record` before it imports
anything else, and every later stage either asks `check` or waits on `watching` (the engine's
waits poll its descriptor): a stop signal at any moment after the interpreter's own start-up is
honoured, as a rollback and the exit status 128+N, or, once live, as a revert and 0.

The handler never raises, except inside `interruptible` (a prompt, a wait the user may abandon):
there it raises `Interrupted`, the one exception for a stop signal.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Iterator
from types import FrameType

from fuse_disk_export.errors import Interrupted

#: The signals that revert an export (and roll back one being set up).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_caught: list[int] = []
_raise_now = False


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _record(signum: int, _frame: FrameType | None) -> None:
    _caught.append(signum)
    if _raise_now:
        raise Interrupted(_name(signum), during_setup=False)


def record() -> None:
    """Record stop signals from now on, whatever disposition was inherited (ignored included)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def first() -> str | None:
    """The name of the first stop signal recorded ("SIGINT", ...), or None."""
    return _name(_caught[0]) if _caught else None


def check() -> None:
    """:raise Interrupted: a stop signal has been recorded (nothing is exported yet)."""
    if _caught:
        raise Interrupted(_name(_caught[0]))


class SignalWatch:
    """The record as something to wait on: `fileno` turns readable when a stop signal arrives
    (Python's wakeup fd), `reason` names the first one.  What the engine's waits poll."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._read.setblocking(False)
        self._old: int | None = None
        # Outside the main thread (the Python API's caller's business), nothing to wait on.
        with contextlib.suppress(ValueError):
            self._old = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)

    @property
    def fileno(self) -> int:
        return self._read.fileno() if self._old is not None else -1

    def reason(self) -> str | None:
        with contextlib.suppress(OSError):
            while self._read.recv(256):
                pass
        return first()

    def close(self) -> None:
        if self._old is not None:
            signal.set_wakeup_fd(self._old)
        self._read.close()
        self._write.close()


@contextlib.contextmanager
def watching() -> Iterator[SignalWatch]:
    """A `SignalWatch` for the duration of the block (outside the main thread, where signals
    never arrive, one with nothing to poll)."""
    watch = SignalWatch()
    try:
        yield watch
    finally:
        watch.close()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block a stop signal raises `Interrupted` at once (and one already recorded
    raises on entry): for prompts and waits that a Ctrl-C must cut short."""
    global _raise_now
    if _caught:
        raise Interrupted(_name(_caught[0]), during_setup=False)
    _raise_now = True
    try:
        yield
    finally:
        _raise_now = False
