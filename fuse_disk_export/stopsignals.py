"""SIGINT, SIGTERM and SIGHUP, recorded from the entry point's first line until a session acts.

A job started with ``&`` by a non-interactive shell inherits SIGINT *ignored*; a signal that
arrives before a handler is installed is then discarded by the kernel, and an export that goes live
afterwards would never be reverted.  So the entry point installs `record` before it imports
anything else, and every later stage asks `check` (or takes over the record, as the session does):
a stop signal at any moment after the interpreter's own start-up is honoured, as a rollback and the
exit status 128+N.

Only the standard library's ``signal`` is imported here: this module runs before everything else.
"""

from __future__ import annotations

# _signal, the C module under signal: signal itself imports enum, which would keep the window in
# which a stop signal can be lost open for milliseconds longer (CPython only, as is this project).
import _signal  # type: ignore[import-not-found]
from types import FrameType, TracebackType

#: The signals that revert an export (and roll back one being set up).
STOP_SIGNALS: tuple[int, ...] = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)


def _name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


_caught: list[int] = []
_raise_now = False
_recording = False


class StopRequested(BaseException):
    """Raised by the handler inside `interruptible` (a prompt, a wait the user may abandon)."""

    def __init__(self, signum: int) -> None:
        super().__init__(_name(signum))
        self.signum = signum


def _record(signum: int, _frame: FrameType | None) -> None:
    _caught.append(signum)
    if _raise_now:
        raise StopRequested(signum)


def record() -> None:
    """Record stop signals from now on, whatever disposition was inherited (ignored included)."""
    global _recording
    _recording = True
    for sig in STOP_SIGNALS:
        _signal.signal(sig, _record)


def resume() -> None:
    """Record again after someone else's handlers (an asyncio loop's) were removed; does nothing
    in a process that never called `record` (a program using the Python API keeps its own)."""
    if _recording:
        record()


def note(signame: str) -> None:
    """Add a stop signal that another handler received (an asyncio loop's) to the record."""
    import signal

    if signame in signal.Signals.__members__:
        _caught.append(int(signal.Signals[signame]))


def caught() -> list[str]:
    """Names of the stop signals recorded so far, oldest first ("SIGINT", ...)."""
    return [_name(n) for n in _caught]


def first() -> str | None:
    return _name(_caught[0]) if _caught else None


def check() -> None:
    """Raise `Interrupted` if a stop signal has been recorded (nothing is exported yet)."""
    if _caught:
        from fuse_disk_export.errors import Interrupted

        raise Interrupted(_name(_caught[0]))


class interruptible:
    """Within the block a stop signal raises `StopRequested` at once (and one already recorded
    raises on entry): for prompts and waits that a Ctrl-C must cut short.  (A class rather than
    contextlib, which this module does not import: it runs before everything else.)"""

    def __enter__(self) -> None:
        global _raise_now
        if _caught:
            raise StopRequested(_caught[0])
        _raise_now = True

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        global _raise_now
        _raise_now = False
