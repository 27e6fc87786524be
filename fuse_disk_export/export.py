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
from typing import TYPE_CHECKING, NamedTuple

from fuse_disk_export import notify, pidwatch, state, stopsignals
from fuse_disk_export.engine import qemuversion, versions, writeguard
from fuse_disk_export.engine.bringup import bring_up, secret_files, terminate
from fuse_disk_export.engine.graph import Tuning, plan
from fuse_disk_export.engine.process import find_binary
from fuse_disk_export.errors import MountError, QemuError
from fuse_disk_export.images import Resolved
from fuse_disk_export.pidfile import PidFile
from fuse_disk_export.prepare import Preparation, prepared

if TYPE_CHECKING:
    from fuse_disk_export.daemonize import Reporter

log = logging.getLogger(__name__)

READY_LINE = "All exports set up, ^C to revert"


class ExportRequest(NamedTuple):
    """Everything one invocation exports, already resolved to absolute paths."""

    images: Sequence[Resolved]
    tuning: Tuning = Tuning()
    pid_file: str | None = None
    quiet: bool = False
    #: Per image: overlay and snapshot server to prepare (empty: none for any image).
    preparations: Sequence[Preparation] = ()
    #: QMP secret objects to create, id -> passphrase.
    secrets: Mapping[str, str] | None = None


def serve(request: ExportRequest, reporter: Reporter | None = None) -> int:
    """Export, serve until a stop signal, revert.  Returns the exit status (0).

    Live comes first, asyncio and qemu.qmp after: the graph is brought up from
    qemu-storage-daemon's command line (`bring_up`), the writes guarded, the pid file written and
    live reported; only then is the daemon taken over through QMP to serve and revert.

    :param reporter: the waiting parent of a ``-d`` run, told once live (or, by the caller, why
        not); a stop signal it passes on rolls the setup back.
    :raise FdeError: setup failed or was interrupted (rolled back), or the daemon died while
        serving (its mounts detached).
    """
    with contextlib.ExitStack() as cleanup:
        # Warnings of the setup reach a -d user through the waiting parent, and --list.
        warnings = _Warnings()
        logging.getLogger().addHandler(warnings)
        cleanup.callback(logging.getLogger().removeHandler, warnings)
        cleanup.callback(state.unregister)
        cleanup.callback(notify.stopping)
        stopsignals.check()
        since = time.time()
        for r in request.images:
            if r.creates_mountpoint:
                _create_mountpoint(r.spec.mountpoint)
                cleanup.callback(_remove_quietly, r.spec.mountpoint)
        if request.tuning.nbd_socket:
            # We checked nothing was there before; whatever QEMU leaves there is its socket.
            cleanup.callback(_remove_quietly, request.tuning.nbd_socket)
        specs = [r.spec for r in request.images]
        needs = request.preparations or [Preparation()] * len(specs)
        ready = cleanup.enter_context(prepared(specs, needs))
        files, fds = cleanup.enter_context(secret_files(request.secrets or {}))
        binary = find_binary()
        # Planned for the QEMU that will answer (the plan goes on its command line); unknown
        # counts as old: the hole guard costs speed where it is not needed, never data.
        version = qemuversion.of(binary)
        hole_guard = version is None or versions.punch_hole_may_keep_data(version)
        graph_tuning = request.tuning._replace(hole_guard=hole_guard)
        graph = plan(ready.specs, graph_tuning, files)
        for line in graph.describe():
            log.debug("plan: %s", line)
        try:
            up = bring_up(graph, pass_fds=fds, cancel=reporter)
        except QemuError as e:
            if not (graph.default_io_uring and "io_uring" in e.reason):
                raise
            # This QEMU or kernel (or a seccomp policy) has no io_uring: the thread pool, then.
            log.debug("io_uring unavailable (%s); reading through the thread pool", e.reason)
            graph = plan(ready.specs, graph_tuning._replace(io_uring=False), files)
            up = bring_up(graph, pass_fds=fds, cancel=reporter)
        failure: BaseException | None = None
        try:
            qemuversion.remember(binary, up.version)
            ready.forget_overlays()
            writeguard.protect(graph, up.version)
            stopsignals.check()
            if request.pid_file:
                pid_file = PidFile(request.pid_file)
                cleanup.callback(pid_file.release)
                pidwatch.remove_pid_file_when_gone(request.pid_file)
            state.register(
                [
                    state.ExportRecord(
                        image=r.spec.image,
                        format=r.spec.layers[0].format,
                        virtual_size=r.info.virtual_size,
                        mountpoint=r.spec.mountpoint,
                        writable=r.spec.writable,
                        pid=os.getpid(),
                        daemon_pid=up.spawned.process.pid,
                        since=since,
                        warnings=tuple(warnings.about(r.spec.mountpoint, r.spec.image)),
                    )
                    for r in request.images
                ]
            )
            live = ", ".join(r.spec.mountpoint for r in request.images)
            if reporter is not None:
                reporter.ready(warnings.messages)
            elif not request.quiet:
                print(READY_LINE, flush=True)
            log.info("live: %s", live)
            notify.ready(f"Exporting {live}")
        except BaseException as e:
            failure = e
        logging.getLogger().removeHandler(warnings)
        if failure is not None:
            terminate(up, graph)
            raise failure
        try:
            # Live: asyncio and qemu.qmp serve from here on.  A stop signal while they load cuts
            # the loading short, and the daemon is stopped without them.
            with stopsignals.interruptible():
                import asyncio

                from fuse_disk_export.engine.session import Session
        except stopsignals.StopRequested as e:
            log.info("%s received, reverting", e)
            notify.stopping()
            terminate(up, graph)
            return 0
        asyncio.run(Session(graph, up, on_stop=notify.stopping).serve())
    return 0


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


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
