"""One invocation, end to end: resolved images -> graph -> live daemon -> serve -> revert.

The command line (or the Python API) builds an `ExportRequest`; this module decides nothing about
QEMU (graph does) and nothing about processes (bringup and session do): it wires them to the
outside world — the pid file, the runtime registry, systemd — and reports live through a callback.
"""

import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

from fuse_disk_export import lazylog, notify, pidfile, pidwatch, state, stopsignals
from fuse_disk_export.engine import qemuversion, versions, writeguard
from fuse_disk_export.engine.bringup import Cancellable, Up, bring_up, secret_files, terminate
from fuse_disk_export.engine.graph import BlockGraph, Tuning, plan
from fuse_disk_export.engine.process import find_binary
from fuse_disk_export.errors import MountError, QemuError
from fuse_disk_export.images import Resolved
from fuse_disk_export.prepare import ImageExtras, prepare_images

TYPE_CHECKING = False
if TYPE_CHECKING:
    from fuse_disk_export.fsmount import Mounted

log = lazylog.get(__name__)


class FsPlan(NamedTuple):
    """Where and how ``--mount-fs`` mounts the filesystem of the export."""

    directory: str
    fs: str
    read_only: bool
    #: The private folder of the export's file, removed on revert.
    private_dir: str


class ExportRequest(NamedTuple):
    """Everything one invocation exports, already resolved to absolute paths."""

    images: Sequence[Resolved]
    tuning: Tuning = Tuning()
    pid_file: str | None = None
    #: Per image: overlay and snapshot server to prepare (empty: none for any image).
    preparations: Sequence[ImageExtras] = ()
    #: Secret objects to create, id -> passphrase (they reach QEMU through pipes).
    secrets: Mapping[str, str] | None = None
    #: ``--mount-fs``: the filesystem to mount over the (one) export, which is on a private file.
    filesystem: FsPlan | None = None


class Live(NamedTuple):
    """An invocation's exports, all mounted: the daemon, its graph, the setup's warnings, and
    the filesystem driver of ``--mount-fs``."""

    up: Up
    graph: BlockGraph
    warnings: list[str]
    filesystem: "Mounted | None" = None


@contextlib.contextmanager
def live(
    request: ExportRequest,
    *,
    cancel: Cancellable | None = None,
    watch_signals: bool = True,
    register: bool = True,
) -> Iterator[Live]:
    """Bring every export of ``request`` up; on leaving, take down whatever is still up.

    Without asyncio or qemu.qmp: the graph goes on qemu-storage-daemon's command line
    (`bring_up`), then the writes are guarded, and the pid file and the registry written.  On
    leaving, a daemon that still runs is stopped (SIGTERM: it removes its exports, flushes and
    closes its nodes), and every file this made is removed.

    :param cancel: the waiting parent of a ``-d`` run; its stop signal rolls the setup back.
    :param watch_signals: wake on stop signals during setup (the command line; an application
        using the Python API keeps its signals to itself).
    :raise FdeError: setup failed or was interrupted (nothing is left of it).
    """
    with contextlib.ExitStack() as cleanup:
        # Warnings of the setup reach a -d user through the waiting parent, and --list.
        warnings = lazylog.start_collecting()
        cleanup.callback(lazylog.stop_collecting, warnings)
        # Registered before the daemon's cleanup, so released after it: a pid file that is gone
        # means everything is reverted (a script waits for exactly that), the registry too.
        pid_files: list[pidfile.PidFile] = []
        cleanup.callback(_release, pid_files)
        if register:
            cleanup.callback(state.unregister)
        if watch_signals:
            stopsignals.check()
        since = time.time()
        if request.filesystem is not None:
            # Removed last: the export's file in it goes first.
            cleanup.callback(_remove_tree, request.filesystem.private_dir)
        for r in request.images:
            if r.creates_mountpoint:
                _create_mountpoint(r.spec.mountpoint)
                cleanup.callback(_remove_quietly, r.spec.mountpoint)
        if request.tuning.nbd_socket:
            # We checked nothing was there before; whatever QEMU leaves there is its socket.
            cleanup.callback(_remove_quietly, request.tuning.nbd_socket)
        specs = [r.spec for r in request.images]
        needs = request.preparations or [ImageExtras()] * len(specs)
        prepared = cleanup.enter_context(prepare_images(specs, needs))
        files, fds = cleanup.enter_context(secret_files(request.secrets or {}))
        binary = find_binary()
        # Planned for the QEMU that will answer (the plan goes on its command line); unknown
        # counts as old: the hole guard costs speed where it is not needed, never data.
        version = qemuversion.of(binary)
        hole_guard = version is None or versions.punch_hole_may_keep_data(version)
        tuning = request.tuning._replace(hole_guard=hole_guard)
        graph = plan(prepared.specs, tuning, files)
        if log.isEnabledFor(lazylog.DEBUG):
            for line in graph.describe():
                log.debug("plan: %s", line)
        # Given to the daemon (and a --mount-fs driver) too: the watcher removes the pid file
        # only once they have gone as well.
        watcher = pidwatch.remove_pid_file_when_gone(request.pid_file) if request.pid_file else None
        held = [watcher] if watcher is not None else []
        fds = [*fds, *held]
        try:
            up = bring_up(graph, pass_fds=fds, cancel=cancel, watch_signals=watch_signals)
        except QemuError as e:
            if not (graph.default_io_uring and "io_uring" in e.reason):
                raise
            # This QEMU or kernel (or a seccomp policy) has no io_uring: the thread pool, then.
            log.debug("io_uring unavailable (%s); reading through the thread pool", e.reason)
            graph = plan(prepared.specs, tuning._replace(io_uring=False), files)
            up = bring_up(graph, pass_fds=fds, cancel=cancel, watch_signals=watch_signals)
        cleanup.callback(terminate, up, graph)
        qemuversion.remember(binary, up.version)
        prepared.forget_overlays()
        writeguard.protect(graph, up.version)
        mounted = None
        if request.filesystem is not None:
            from fuse_disk_export import fsmount  # --mount-fs only

            plan_fs = request.filesystem
            # Entered after the daemon's cleanup: unmounted before the export goes.
            mounted = cleanup.enter_context(
                fsmount.mounted(
                    request.images[0].spec.mountpoint,
                    plan_fs.directory,
                    plan_fs.fs,
                    read_only=plan_fs.read_only,
                    pass_fds=held,
                )
            )
        if watch_signals:
            stopsignals.check()
        if request.pid_file:
            pid_files.append(pidfile.PidFile(request.pid_file))
        if register:
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
                        warnings=_about(warnings, r.spec.mountpoint, r.spec.image),
                        fs_dir=mounted.directory if mounted else None,
                        fs_type=mounted.fs if mounted else None,
                        fs_driver=mounted.driver.program if mounted else None,
                    )
                    for r in request.images
                ]
            )
        lazylog.stop_collecting(warnings)
        yield Live(up, graph, warnings, mounted)


def serve(
    request: ExportRequest,
    *,
    on_live: Callable[[Sequence[str]], None],
    cancel: Cancellable | None = None,
) -> int:
    """Export, serve until a stop signal, revert.  Returns the exit status (0).

    Live comes first, asyncio and qemu.qmp after: `live` brings everything up, ``on_live`` is
    told (with the setup's warnings: the command line prints its line, or tells the waiting
    parent), and only then is the daemon taken over through QMP to serve and revert.

    :param on_live: called once every export is live; an `FdeError` it raises reverts them.
    :param cancel: the waiting parent of a ``-d`` run; its stop signal rolls the setup back.
    :raise FdeError: setup failed or was interrupted (rolled back), or the daemon died while
        serving (its mounts detached).
    """
    stopped: str | None = None
    with live(request, cancel=cancel) as now:
        on_live(now.warnings)
        # Serving is long, and asyncio makes cycles: collected from here on (the command line
        # ran without the collector until now), the objects of the setup apart.
        if not gc.isenabled():
            gc.freeze()
            gc.enable()
        paths = (
            now.filesystem.directory
            if now.filesystem
            else ", ".join(r.spec.mountpoint for r in request.images)
        )
        notify.ready(f"Exporting {paths}")
        try:
            # logging (for a daemon, with its syslog handler), asyncio and qemu.qmp serve from
            # here on.  A stop signal while they load cuts the loading short; the daemon is then
            # stopped without them, on leaving `live`.
            with stopsignals.interruptible():
                lazylog.load()  # qemu.qmp logs through logging itself: its level set first
                log.info("live: %s", paths)
                import asyncio

                from fuse_disk_export.engine.session import Session
        except stopsignals.StopRequested as e:
            stopped = str(e)
            notify.stopping()
        else:
            try:
                session = Session(
                    now.graph, now.up, on_stop=notify.stopping, filesystem=now.filesystem
                )
                asyncio.run(session.serve())
            finally:
                notify.stopping()
    if stopped is not None:
        # Said once reverted: logging may not be loaded yet, and loading it would hold the
        # revert up.
        log.info("%s received, reverted", stopped)
    return 0


def _release(pid_files: list[pidfile.PidFile]) -> None:
    for pid_file in pid_files:
        pid_file.release()


def _remove_tree(path: str) -> None:
    import shutil  # --mount-fs only

    shutil.rmtree(path, ignore_errors=True)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _about(warnings: Sequence[str], *paths: str) -> tuple[str, ...]:
    return tuple(m for m in warnings if any(p in m for p in paths))


def _create_mountpoint(path: str) -> None:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise MountError(f"cannot be created: {e.strerror}", path=path) from None
