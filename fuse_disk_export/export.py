"""One invocation, end to end: resolved images -> graph -> live session -> revert.

The command line builds an `ExportRequest`; this module decides nothing about QEMU (graph does)
and nothing about processes (session does): it wires them to the outside world — the pid file, the
runtime registry, the "set up" line, the waiting parent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fuse_disk_export import guard, notify, state, stopsignals
from fuse_disk_export.daemonize import Reporter
from fuse_disk_export.engine.graph import Tuning, plan
from fuse_disk_export.engine.process import Spawned, spawn
from fuse_disk_export.errors import FdeError, MountError
from fuse_disk_export.images import Resolved
from fuse_disk_export.pidfile import PidFile
from fuse_disk_export.prepare import Preparation, Prepared, prepared

if TYPE_CHECKING:
    from fuse_disk_export.engine.session import Session

log = logging.getLogger(__name__)

READY_LINE = "All exports set up, ^C to revert"


@dataclass(frozen=True)
class ExportRequest:
    """Everything one invocation exports, already resolved to absolute paths."""

    images: Sequence[Resolved]
    tuning: Tuning = field(default_factory=Tuning)
    pid_file: str | None = None
    quiet: bool = False
    #: Per image: overlay and snapshot server to prepare (empty: none for any image).
    preparations: Sequence[Preparation] = ()
    #: QMP secret objects to create, id -> passphrase.
    secrets: Mapping[str, str] = field(default_factory=dict)


def serve(request: ExportRequest, reporter: Reporter | None = None) -> int:
    """Export, serve until a stop signal, revert.  Returns the exit status.

    :param reporter: the waiting parent of a ``-d`` run, told once live or failed.
    :raise FdeError: setup failed (already rolled back) or the daemon died while serving.
    """
    # Boot qemu-storage-daemon first: it starts while we import asyncio and qemu.qmp (tens of
    # milliseconds), which only the session needs.  Stop signals recorded since the entry point
    # are taken over by the session; one recorded already means nothing is started at all.
    stopsignals.check()
    spawned: Spawned | None = spawn()
    since = time.time()
    specs = [r.spec for r in request.images]
    needs = request.preparations or [Preparation()] * len(specs)
    ready: Prepared | None = None
    pid_file: PidFile | None = None
    # Warnings of the setup reach a -d user through the waiting parent, and --list.
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)

    def on_live(session: Session) -> None:
        nonlocal pid_file
        if ready is not None:
            ready.forget_overlays()
        if request.pid_file:
            pid_file = PidFile(request.pid_file)
            guard.remove_pid_file_when_gone(request.pid_file)
        assert session.daemon is not None
        state.register(
            [
                state.ExportRecord(
                    image=r.spec.image,
                    format=r.spec.layers[0].format,
                    virtual_size=r.info.virtual_size,
                    mountpoint=r.spec.mountpoint,
                    writable=r.spec.writable,
                    pid=os.getpid(),
                    daemon_pid=session.daemon.pid,
                    since=since,
                    warnings=warnings.about(r.spec.mountpoint, r.spec.image),
                )
                for r in request.images
            ]
        )
        logging.getLogger().removeHandler(warnings)
        live = ", ".join(r.spec.mountpoint for r in request.images)
        log.info("live: %s", live)
        if reporter is not None:
            reporter.ready(warnings.messages)
        elif not request.quiet:
            print(READY_LINE, flush=True)
        notify.ready(f"Exporting {live}")

    created: list[str] = []
    try:
        for r in request.images:
            if r.creates_mountpoint:
                _create_mountpoint(r.spec.mountpoint)
                created.append(r.spec.mountpoint)
        with prepared(specs, needs) as ready:
            import asyncio

            from fuse_disk_export.engine.session import Session

            graph = plan(ready.specs, request.tuning, request.secrets)
            for line in graph.describe():
                log.debug("plan: %s", line)
            session = Session(
                graph, on_live=on_live, on_stop=notify.stopping, spawned=spawned, cancel=reporter
            )
            spawned = None
            asyncio.run(session.run())
    except FdeError as e:
        if reporter is not None and reporter.pending:
            reporter.failed(e)
            return e.exit_status
        raise
    finally:
        logging.getLogger().removeHandler(warnings)
        if spawned is not None:
            spawned.abandon()
        notify.stopping()
        state.unregister()
        if pid_file is not None:
            pid_file.release()
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if request.tuning.nbd_socket:
            # We checked nothing was there before; whatever QEMU left is its socket.
            with contextlib.suppress(OSError):
                os.unlink(request.tuning.nbd_socket)
    return 0


class _Warnings(logging.Handler):
    """The warnings logged while an invocation is set up."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def about(self, *paths: str) -> list[str]:
        return [m for m in self.messages if any(p in m for p in paths)]


def _create_mountpoint(path: str) -> None:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise MountError(f"cannot be created: {e.strerror}", path=path) from None
