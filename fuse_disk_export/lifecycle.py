"""One invocation, end to end: resolved images -> graph -> live daemon -> serve -> revert.

The command line (or the Python API) builds an `ExportRequest` (`request`); this module decides
nothing about QEMU (the engine's graph does) and starts no process itself (the engine does): it
wires the engine to the outside world — stop signals, the pid file, the runtime registry, systemd,
a ``--mount-fs`` driver — and reports live through a callback.
"""

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from fuse_disk_export import (
    choices,
    claims,
    engine,
    logs,
    mounts,
    notify,
    pidfile,
    registry,
    stopsignals,
)
from fuse_disk_export.engine import limits, qemuinfo, writeguard
from fuse_disk_export.engine.graph import BlockGraph, Tuning, may_read_short, single_queue_image
from fuse_disk_export.engine.process import find_binary
from fuse_disk_export.errors import FsError, Interrupted, MountError, QemuError, UsageError
from fuse_disk_export.prepare import ImageExtras, prepare_images
from fuse_disk_export.request import ExportRequest

if TYPE_CHECKING:
    from fuse_disk_export.mountfs.mount import Mounted

log = logging.getLogger(__name__)


def _check_io_uring(request: ExportRequest, tuning: Tuning) -> None:
    if tuning.aio != "io_uring" or tuning.io_uring_short_reads:
        return
    for r in request.images:
        if may_read_short(r.spec):
            raise UsageError(
                "--aio io_uring: this qemu-storage-daemon can hang for good reading the end of a "
                "file whose size is not a multiple of 512 with it, as a vmdk's descriptor (7.2 "
                "and 10.0.2 do; 11.1.3 does not)",
                path=r.spec.image,
            )


class Live(NamedTuple):
    """An invocation's exports, all mounted: the daemons (one unless there are more images than
    one serves well), the setup's warnings, and the filesystem driver of ``--mount-fs``."""

    daemons: list[engine.Daemon]
    warnings: list[str]
    filesystem: "Mounted | None" = None


def _check(watch: Sequence[engine.Watch]) -> None:
    """:raise Interrupted: something watched has called the setup off."""
    for w in watch:
        why = w.reason()
        if why is not None:
            raise Interrupted(why)


@contextlib.contextmanager
def live(
    request: ExportRequest,
    *,
    watch: Sequence[engine.Watch] = (),
    register: bool = True,
) -> Iterator[Live]:
    """Bring every export of ``request`` up; on leaving, take down whatever is still up.

    The graph goes on the command line of qemu-storage-daemon (`engine.start_all`: one daemon,
    or one per `limits.SHARD_SIZE` images), then the writes are guarded, and the pid file and the
    registry written.  On leaving, the daemons are stopped (`engine.stop_all`: each removes its
    exports, flushes and closes its nodes), and every file this made is removed.

    :param watch: what may call the setup off (stop signals, the waiting parent of a ``-d``
        run); an application using the Python API keeps its signals to itself and passes none.
    :raise FdeError: setup failed or was interrupted (nothing is left of it).
    """
    with contextlib.ExitStack() as cleanup:
        # Warnings of the setup reach a -d user through the waiting parent, and --list.
        collected = cleanup.enter_context(logs.WarningCollector())
        warnings = collected.messages
        # Registered before the daemon's cleanup, so released after it: a pid file that is gone
        # means everything is reverted (a script waits for exactly that), the registry too.
        pid_files: list[pidfile.PidFile] = []
        # Reaped last: once they have closed every export and image, the revert is done, and
        # their exit (milliseconds more) need not hold up the pid file; we still never exit
        # before them.
        started: list[engine.Daemon] = []
        cleanup.callback(engine.reap_all, started)
        cleanup.callback(_release, pid_files)
        if register:
            cleanup.callback(registry.unregister)
        # Held until every daemon has stopped, and given up before the pid file goes: a script
        # that waits for it and exports again must not find the path still claimed.
        cleanup.enter_context(claims.claimed([r.spec.mountpoint for r in request.images]))
        _check(watch)
        since = time.time()
        if request.filesystem is not None:
            # Ours alone (0700; an existing name fails).  Removed last: the export's file in it
            # goes first.
            try:
                os.mkdir(request.filesystem.private_dir, 0o700)
            except OSError as e:
                raise FsError(
                    f"cannot make the export's private folder: {e.strerror}",
                    path=request.filesystem.private_dir,
                ) from None
            cleanup.callback(shutil.rmtree, request.filesystem.private_dir, ignore_errors=True)
        for r in request.images:
            if r.creates_mountpoint:
                _create_mountpoint(r.spec.mountpoint)
                cleanup.callback(_remove_quietly, r.spec.mountpoint)
        if request.tuning.nbd_socket:
            # We checked nothing was there before; whatever QEMU leaves there is its socket.
            cleanup.callback(_remove_quietly, request.tuning.nbd_socket)
        binary = find_binary()
        # Planned for the QEMU that will answer (the plan goes on its command line); unknown
        # counts as old: a guard costs speed where it is not needed, never data.  Refused
        # combinations are refused before an overlay or a helper process is made.
        info = qemuinfo.of(binary, os.path.join(registry.registry_dir(), qemuinfo.CACHE))
        tuning = choices.for_qemu(
            request.tuning,
            info,
            iothreads=request.iothreads,
            single_queue=single_queue_image([r.spec for r in request.images]),
        )
        _check_io_uring(request, tuning)
        specs = [r.spec for r in request.images]
        needs = request.preparations or [ImageExtras()] * len(specs)
        prepared = cleanup.enter_context(prepare_images(specs, needs))
        # Given to every daemon (and a --mount-fs driver) too: the watcher removes the pid file
        # only once they have all gone as well.
        watcher = pidfile.remove_pid_file_when_gone(request.pid_file) if request.pid_file else None
        held = [watcher] if watcher is not None else []
        size = limits.SHARD_SIZE
        shards = [prepared.specs[i : i + size] for i in range(0, len(prepared.specs), size)]

        def start(tuning: Tuning) -> tuple[list[BlockGraph], list[engine.Daemon]]:
            while True:
                # A pipe per secret, daemon and attempt: each is read once.
                secrets = [
                    cleanup.enter_context(engine.secret_files(request.secrets or {}))
                    for _ in shards
                ]
                graphs = [
                    engine.plan(specs, tuning, files)
                    for specs, (files, _) in zip(shards, secrets, strict=True)
                ]
                # A shard whose command line the kernel would refuse is halved (long paths).
                too_long = [
                    i for i, g in enumerate(graphs) if len(shards[i]) > 1 and not limits.fits(g)
                ]
                if not too_long:
                    break
                for i in reversed(too_long):
                    half = len(shards[i]) // 2
                    shards[i : i + 1] = [shards[i][:half], shards[i][half:]]
            for graph in graphs if log.isEnabledFor(logging.DEBUG) else ():
                for line in graph.describe():
                    log.debug("plan: %s", line)
            pass_fds = [[*fds, *held] for _, fds in secrets]
            return graphs, engine.start_all(graphs, pass_fds=pass_fds, watch=watch)

        try:
            graphs, daemons = start(tuning)
        except QemuError as e:
            if not (tuning.io_uring and tuning.aio is None and "io_uring" in e.reason):
                raise
            # This QEMU or kernel (or a seccomp policy) has no io_uring: the thread pool, then.
            log.debug("io_uring unavailable (%s); reading through the thread pool", e.reason)
            tuning = tuning._replace(io_uring=False)
            graphs, daemons = start(tuning)
        started += daemons
        cleanup.callback(engine.stop_all, daemons, reap=False)
        for r in request.images:
            if r.note:
                log.warning("%s: %s", r.spec.image, r.note)
        chosen = choices.describe(graphs[0], tuning, info)
        log.info("QEMU %s", ", ".join(f"{k} {v}" for k, v in chosen.items()))
        if len(daemons) > 1:
            log.info("%d images served by %d daemons", len(request.images), len(daemons))
        prepared.forget_overlays()
        for daemon in daemons:
            writeguard.protect(daemon.graph, daemon.version)
        mounted = None
        if request.filesystem is not None:
            from fuse_disk_export.mountfs import mount  # --mount-fs only

            plan_fs = request.filesystem
            # Entered after the daemon's cleanup: unmounted before the export goes.
            mounted = cleanup.enter_context(
                mount.mounted(
                    request.images[0].spec.mountpoint,
                    plan_fs.directory,
                    plan_fs.fs,
                    read_only=plan_fs.read_only,
                    pass_fds=held,
                )
            )
        _check(watch)
        if request.pid_file:
            pid_files.append(pidfile.PidFile(request.pid_file))
        if register:
            serving = {m: d.pid for d in daemons for m in d.mountpoints}
            registry.register(
                [
                    registry.ExportRecord(
                        image=r.spec.image,
                        format=r.spec.layers[0].format,
                        virtual_size=r.info.virtual_size,
                        mountpoint=r.spec.mountpoint,
                        writable=r.spec.writable,
                        pid=os.getpid(),
                        daemon_pid=serving[r.spec.mountpoint],
                        since=since,
                        warnings=_about(warnings, r.spec.mountpoint, r.spec.image),
                        fs_dir=mounted.directory if mounted else None,
                        fs_type=mounted.fs if mounted else None,
                        fs_driver=mounted.driver.program if mounted else None,
                        qemu=chosen,
                    )
                    for r in request.images
                ]
            )
        prepared.keep_created()
        collected.stop()
        yield Live(daemons, warnings, mounted)


def serve(
    request: ExportRequest,
    *,
    on_live: Callable[[Sequence[str]], None],
    cancel: engine.Watch | None = None,
) -> int:
    """Export, serve until a stop signal, revert.  Returns the exit status (0).

    :param on_live: called once every export is live, with the setup's warnings; an `FdeError`
        it raises reverts them.
    :param cancel: the waiting parent of a ``-d`` run; it may call the setup off.
    :raise FdeError: setup failed or was interrupted (rolled back), the daemon died while
        serving (its mounts detached), or the ``--mount-fs`` driver did.
    """
    with stopsignals.watching() as signals:
        watch: list[engine.Watch] = [signals] if cancel is None else [signals, cancel]
        with live(request, watch=watch) as now:
            on_live(now.warnings)
            paths = (
                now.filesystem.directory
                if now.filesystem
                else ", ".join(r.spec.mountpoint for r in request.images)
            )
            notify.ready(f"Exporting {paths}")
            log.info("live: %s", paths)
            driver = (
                engine.Exited(now.filesystem.process.pid, now.filesystem.driver.program)
                if now.filesystem
                else None
            )
            watched: list[engine.Watch] = [signals, *([driver] if driver else [])]
            try:
                by, why = engine.serve(*now.daemons, watch=watched)
            except QemuError as e:
                if now.filesystem is not None:
                    # Its reads fail from now on ("fuse: bad error value"): a consequence.  The
                    # user knows the export by the folder, not by our private file.
                    now.filesystem.stderr.quiet()
                    raise QemuError(e.reason, path=now.filesystem.directory) from None
                if len(now.daemons) == 1:
                    raise
                # Every daemon's death ends the serving: all or nothing, as the setup was.
                raise QemuError(f"{e.reason}; reverted every export of this invocation") from None
            finally:
                notify.stopping()
                if driver:
                    driver.close()
            if by is driver and now.filesystem is not None:
                if now.filesystem.now() is not None:
                    from fuse_disk_export.mountfs import mount  # --mount-fs only

                    # It died: its dead mount is still there (detached in the revert).
                    raise mount.driver_died(now.filesystem)
                # It exited because its filesystem was unmounted (fusefat with status 255, after
                # "readn() error" on stderr).
                now.filesystem.stderr.quiet()
                why = f"{now.filesystem.directory} unmounted from outside"
            if by is driver or isinstance(by, engine.Unmounted):
                # As nbdfuse after fusermount3 -u: the user ended it; the rest goes with it.
                log.warning("%s; reverting every export of this invocation", why)
            else:
                log.info("%s received, reverting", why)
            _warn_in_use(request)
    return 0


def _warn_in_use(request: ExportRequest) -> None:
    """Warn about loop devices left on an export: the revert goes ahead (a stop signal is never
    refused), but whatever they hold that has not reached the export is lost with it."""
    in_use = mounts.loop_devices_on(r.spec.mountpoint for r in request.images)
    for path, loops in in_use.items():
        log.warning(
            "%s: still in use by %s at the revert: what it had not written through (a "
            "filesystem mounted from it: its unflushed cache) is lost, and it fails from now on; "
            "unmount and detach it first (umount, losetup -d)",
            path,
            ", ".join(loops),
        )


def _release(pid_files: list[pidfile.PidFile]) -> None:
    for pid_file in pid_files:
        pid_file.release()


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
