"""Loggers that import `logging` only once a record has somewhere to go.

`logging` (with threading, traceback, weakref and string) costs more at start-up than everything
else a run does before it is live, and a run that is not ``-v`` logs nothing before then.  So the
package logs through these loggers: a record below the level the program asked for (`configure`)
is dropped without importing anything; the first record at or above it imports `logging`, runs
the program's setup (its handlers), and from then on every record goes to `logging` as usual.

Where nobody called `configure` (the Python API, tests), records go to `logging` exactly as a
plain ``logging.getLogger(name)`` would send them: while `logging` is not even imported nothing
can have configured it, so, as there, only warnings and worse are emitted.

Warnings also reach the lists of `start_collecting`, which is how a setup's warnings travel to the
``-d`` parent and into the registry.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

_threshold = WARNING
_pending_setup: Callable[[], None] | None = None
_collectors: list[list[str]] = []


def configure(level: int, setup: Callable[[], None], *, now: bool = False) -> None:
    """Records from ``level`` up are emitted; ``setup`` installs their handlers, when the first
    one comes (or ``now``)."""
    global _threshold, _pending_setup
    _threshold = level
    _pending_setup = setup
    if now:
        load()


def load() -> None:
    """Import `logging` and run the pending setup now (before code that logs through `logging`
    directly, such as qemu.qmp, is loaded)."""
    global _pending_setup
    setup = _pending_setup
    if setup is not None:
        setup()  # cut short (a stop signal), it runs again for the next record
        _pending_setup = None


def shutdown() -> None:
    """`logging.shutdown`, if `logging` was ever loaded."""
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.shutdown()


def start_collecting() -> list[str]:
    """A list that receives the message of every warning (and error) until `stop_collecting`."""
    messages: list[str] = []
    _collectors.append(messages)
    return messages


def stop_collecting(messages: list[str]) -> None:
    if any(m is messages for m in _collectors):
        _collectors[:] = [m for m in _collectors if m is not messages]


class Logger:
    """The part of `logging.Logger` the package uses, on demand."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _target(self, level: int) -> logging.Logger | None:
        if _pending_setup is not None:
            if level < _threshold:
                return None
            load()
        if "logging" not in sys.modules and level < WARNING:
            return None
        import logging

        return logging.getLogger(self.name)

    def isEnabledFor(self, level: int) -> bool:
        target = self._target(level)
        return target is not None and target.isEnabledFor(level)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level >= WARNING and _collectors:
            text = _message(msg, args)
            for messages in _collectors:
                messages.append(text)
        target = self._target(level)
        if target is not None:
            kwargs.setdefault("stacklevel", 2)  # the record names our caller
            target.log(level, msg, *args, **kwargs)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(DEBUG, msg, *args, stacklevel=3, **kwargs)

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(INFO, msg, *args, stacklevel=3, **kwargs)

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(WARNING, msg, *args, stacklevel=3, **kwargs)

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(ERROR, msg, *args, stacklevel=3, **kwargs)

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        kwargs.setdefault("exc_info", True)
        self.log(ERROR, msg, *args, stacklevel=3, **kwargs)


def _message(msg: object, args: tuple[object, ...]) -> str:
    """The record's message, as `logging.LogRecord.getMessage` makes it (a lone mapping is the
    arguments by name); a bad format gives the text as it is, not an exception."""
    values: object = args
    if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
        values = args[0]
    try:
        return str(msg) % values if args else str(msg)
    except (TypeError, ValueError, KeyError):
        return str(msg)


def get(name: str) -> Logger:
    return Logger(name)
