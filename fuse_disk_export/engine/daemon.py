"""The qemu-storage-daemons we own: start them with their graphs, serve, stop them.  No asyncio,
no QMP client: one synchronous wait (``poll``) at each stage.  An invocation has one daemon, or
several side by side when it has more images than one serves well (`limits.SHARD_SIZE`):
`start_all` brings them up together, all or none.

start
    The daemon creates every ``--object``, ``--blockdev`` and ``--export`` before its main loop,
    and its QMP monitor, given last, greets only once all of them are up: so the greeting, read
    on our end of the socketpair, *is* "every export is mounted".  Until then this waits on the
    daemon's exit (a pidfd), its stderr (passed on as it comes, so that it never blocks on a full
    pipe) and what the caller watches (stop signals, the waiting parent of a ``-d`` run).  If an
    option fails, the daemon prints why and exits 1, leaving as dead mounts the exports it had
    already mounted: those are detached, and the error names the image the failed option was for.
serve
    Waits for what the caller watches (a stop signal, a ``--mount-fs`` driver's exit), the
    daemon's death, or an export unmounted from outside (`Unmounted`).  Nothing is sent over
    QMP; the monitor is never even negotiated, so the daemon sends us no events.
stop
    SIGTERM makes qemu-storage-daemon do what ``quit`` does: remove every export, then flush and
    close every node, then close its monitor, and exit.  Whatever it leaves mounted is detached.
    The one way a daemon ends.  A caller may go on at the monitor's close (everything reverted)
    and reap the daemon later (`reap_all`).
"""

import contextlib
import json
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from fuse_disk_export import mounts
from fuse_disk_export.engine import limits, versions
from fuse_disk_export.engine.graph import BlockGraph
from fuse_disk_export.engine.process import Spawned, describe_exit, qemu_error, spawn
from fuse_disk_export.engine.versions import QemuVersion
from fuse_disk_export.errors import FdeError, Interrupted, QemuError, UsageError

log = logging.getLogger(__name__)

#: How long a stop during setup waits for the daemon to finish what it is creating (it takes
#: milliseconds), before a daemon that does not answer is killed: QEMU can hang in an open for
#: good (7.2 and 10.0.2 did, opening a vmdk's extents with io_uring).
SETUP_GRACE = 3.0

#: How long `stop` waits for the daemon to exit after SIGTERM before it kills it.
STOP_TIMEOUT = 5.0


class Watch(Protocol):
    """Something a wait of the engine watches, which may call it off: stop signals, the waiting
    parent of a ``-d`` run, a process that must not die (`Exited`)."""

    @property
    def fileno(self) -> int:
        """Turns readable when `reason` may have news (negative: nothing to poll)."""

    def reason(self) -> str | None:
        """Why the wait is called off (a stop signal's name...), or None; never blocks."""


class Exited:
    """A `Watch` on a process (by pidfd): called off once it has exited."""

    def __init__(self, pid: int, what: str) -> None:
        self.pid = pid
        self.what = what
        self._pidfd = os.pidfd_open(pid)

    @property
    def fileno(self) -> int:
        return self._pidfd

    def reason(self) -> str | None:
        if self._pidfd < 0 or not select.select([self._pidfd], [], [], 0)[0]:
            return None
        return f"{self.what} (pid {self.pid}) exited"

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


class Daemon:
    """A running qemu-storage-daemon we own, every export of its graph mounted (`start`).
    Always ended by `stop`."""

    def __init__(
        self, spawned: Spawned, pidfd: int, graph: BlockGraph, version: QemuVersion
    ) -> None:
        self.process = spawned.process
        self.graph = graph
        self.version = version
        self._spawned = spawned
        self._pidfd = pidfd
        self._terminated = False
        #: Each export's mount as it was when the daemon went live: how it is found once it has
        #: moved (a folder renamed) or gone (`Unmounted`).
        self.mounts: list[mounts.MountEntry] = []

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def mountpoints(self) -> list[str]:
        return [e.mountpoint for e in self.graph.exports]

    def _close(self) -> None:
        """Reap the process and close every descriptor we hold of it."""
        self.process.wait()
        _close(self._spawned)
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def _close(spawned: Spawned) -> None:
    with contextlib.suppress(OSError):
        spawned.qmp_socket.close()
    spawned.stderr.close()


@contextlib.contextmanager
def secret_files(secrets: Mapping[str, str]) -> Iterator[tuple[dict[str, str], list[int]]]:
    """A pipe per secret holding its passphrase: (id -> ``/dev/fd/N``, the fds to pass down).

    The passphrase is in no command line and no file; the pipes are closed on exit.
    """
    files: dict[str, str] = {}
    fds: list[int] = []
    try:
        for key, passphrase in secrets.items():
            data = passphrase.encode()
            if len(data) >= select.PIPE_BUF * 16:
                raise UsageError("the passphrase is too long")
            read_end, write_end = os.pipe()
            fds.append(read_end)
            try:
                os.write(write_end, data)
            finally:
                os.close(write_end)
            files[key] = f"/dev/fd/{read_end}"
        yield files, fds
    finally:
        for fd in fds:
            os.close(fd)


class _Waiter:
    """One ``poll`` over the daemons' descriptors (their exits, their stderr, passed on as it
    comes so that none ever blocks writing it) and the caller's watches."""

    def __init__(self, daemons: Sequence["Daemon"], watch: Sequence[Watch]) -> None:
        self.stderrs = [d._spawned.stderr for d in daemons]
        self.watch = [w for w in watch if w.fileno >= 0]
        self.poller = select.poll()
        fds = [fd for d in daemons for fd in (d._pidfd, d._spawned.stderr.fd)]
        for fd in [*fds, *(w.fileno for w in self.watch)]:
            if fd >= 0:
                self.poller.register(fd, select.POLLIN)

    def wait(self, timeout: float | None = None) -> set[int]:
        """The descriptors that turned readable (what the daemons wrote is passed on here)."""
        ready = self.poll(timeout)
        self.pump(ready)
        return ready

    def poll(self, timeout: float | None = None) -> set[int]:
        return {fd for fd, _ in self.poller.poll(None if timeout is None else timeout * 1000)}

    def pump(self, ready: set[int]) -> None:
        for stderr in self.stderrs:
            if stderr.fd in ready and not stderr.pump():
                self.poller.unregister(stderr.fd)

    def called_off(self) -> tuple[Watch, str] | None:
        """The first watch that calls the wait off, and why; those with nothing more to say
        (a process that exited) are polled no more."""
        for w in self.watch:
            why = w.reason()
            if why is not None:
                self.watch.remove(w)
                with contextlib.suppress(KeyError, ValueError):
                    self.poller.unregister(w.fileno)
                return w, why
        return None


def _read_greeting(sock: socket.socket, buffer: bytearray) -> dict[str, object] | None:
    """The QMP greeting, once all of its line has arrived; None until then."""
    with contextlib.suppress(BlockingIOError):
        buffer += sock.recv(65536, socket.MSG_DONTWAIT)
    if b"\n" not in buffer:
        return None
    try:
        greeting = json.loads(buffer.split(b"\n", 1)[0])
    except ValueError:
        return {}
    return greeting if isinstance(greeting, dict) else {}


def _version(greeting: Mapping[str, object]) -> QemuVersion:
    return versions.from_greeting(greeting) or (0, 0, 0)


def explain(lines: list[str], graph: BlockGraph) -> FdeError | None:
    """The error of a daemon that exited during setup, from what it printed, naming the image.

    qemu-storage-daemon prints ``--blockdev {JSON}: reason`` for the option that failed; lines
    before it that name no option are the cause libfuse or fusermount3 printed (QEMU's reason can
    be as generic as "Failed to mount FUSE session to export").
    """
    rendered = [
        (f"{option} {text}: ", step)
        for step in graph.all_steps()
        for option, text in [step.option()]
    ]
    for index, line in enumerate(lines):
        for prefix, step in rendered:
            if line.startswith(prefix):
                reason = line[len(prefix) :]
                causes = [c for c in lines[:index] if not c.startswith("--")]
                if causes and causes[-1] not in reason:
                    reason = f"{reason} ({causes[-1]})"
                # Steps of no image ("secret KEY", "iothread") name no file.
                image = step.image if os.path.isabs(step.image) else None
                return qemu_error(reason, path=image)
    return None


def _detach_new(
    graph: BlockGraph, before: set[int], recorded: Sequence[mounts.MountEntry] = ()
) -> list[str]:
    """Detach what the daemon, which has exited, left mounted (not there before it started),
    and its ``recorded`` mounts wherever they are now (moved with a renamed folder, where its
    own unmount missed them); return the paths.

    A FUSE mount that some process still serves is not the daemon's: another program mounted it
    there meanwhile (the application keeps its own invocations apart), and it is left alone.
    """
    table = mounts.read_mounts()
    at = mounts.topmost(table)
    found = [
        entry
        for export in graph.exports
        if (entry := at.get(export.mountpoint)) is not None and entry.mount_id not in before
    ]
    found += [e for e in mounts.where_now(recorded, table) if e is not None and e not in found]
    detached = []
    served: set[int] | None = None
    for entry in found:
        if entry.is_fuse:
            served = mounts.served_connections() if served is None else served
            if mounts.connection_id(entry) in served:
                log.debug("%s: mounted by another process; left alone", entry.mount_point)
                continue
        mounts.lazy_unmount(entry.mount_point)
        detached.append(entry.mount_point)
    return detached


def _mounted_now(graph: BlockGraph) -> set[int]:
    at = mounts.topmost(mounts.read_mounts())
    return {e.mount_id for x in graph.exports if (e := at.get(x.mountpoint)) is not None}


def start(
    graph: BlockGraph, *, pass_fds: Sequence[int] = (), watch: Sequence[Watch] = ()
) -> Daemon:
    """Start a qemu-storage-daemon that brings ``graph`` up; return once every export is live.

    `start_all` with one graph: see there.
    """
    (daemon,) = start_all([graph], pass_fds=[pass_fds], watch=watch)
    return daemon


class _Starting:
    """One daemon of `start_all` until its greeting."""

    def __init__(self, graph: BlockGraph, pass_fds: Sequence[int]) -> None:
        self.graph = graph
        self.before = _mounted_now(graph)
        self.spawned = spawn(
            graph.command_line(), pass_fds=pass_fds, descriptors=graph.descriptors()
        )
        log.debug("qemu-storage-daemon pid %d started", self.spawned.process.pid)
        self.pidfd = os.pidfd_open(self.spawned.process.pid)
        self.buffer = bytearray()
        self.greeting: dict[str, object] | None = None

    def abandon(self) -> None:
        """Stop it, reap it, detach its mounts: SIGTERM if it has greeted (its images are open
        and its exports mounted: it closes them in order), else SIGKILL (nothing of it is in use
        yet; it may hang in an open)."""
        process = self.spawned.process
        if process.poll() is None:
            if self.greeting is None:
                process.kill()
            else:
                process.terminate()
                if not select.select([self.pidfd], [], [], STOP_TIMEOUT)[0]:
                    process.kill()
        process.wait()
        os.close(self.pidfd)
        _close(self.spawned)
        _detach_new(self.graph, self.before)


def start_all(
    graphs: Sequence[BlockGraph],
    *,
    pass_fds: Sequence[Sequence[int]] = (),
    watch: Sequence[Watch] = (),
) -> list[Daemon]:
    """Start one qemu-storage-daemon per graph, all at once; return once every export of every
    graph is live, or none is.

    A watch that calls the setup off (a stop signal) does not stop the wait at once: the daemons
    are mid-way through their options, and answer within milliseconds; they are then stopped.
    One that has not answered within `SETUP_GRACE` is killed.

    :param pass_fds: per graph, descriptors its daemon inherits (a secret's pipe, the pid file
        watcher's).
    :param watch: what may call the setup off.
    :raise Interrupted: a watch called the setup off (nothing is left mounted).
    :raise QemuError: a daemon refused an option or died (nothing is left mounted).
    :raise RequirementError, UsageError: a limit of the system would stop a daemon half-way
        (`limits`); nothing was started.
    """
    fds = list(pass_fds) or [()] * len(graphs)
    for graph in graphs:
        limits.check_fuse_exports(len(graph.exports))
    started = time.monotonic()
    starting: list[_Starting] = []
    poller = select.poll()
    waiter_watch = [w for w in watch if w.fileno >= 0]
    stopped: str | None = None
    try:
        for graph, passed in zip(graphs, fds, strict=True):
            one = _Starting(graph, passed)
            starting.append(one)
            for fd in (one.spawned.qmp_socket.fileno(), one.pidfd, one.spawned.stderr.fd):
                poller.register(fd, select.POLLIN)
        for w in waiter_watch:
            poller.register(w.fileno, select.POLLIN)
        deadline: float | None = None
        while any(one.greeting is None for one in starting):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = {fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)}
            if stopped is None:
                for w in waiter_watch:
                    if (why := w.reason()) is not None:
                        stopped = why
                        log.info("%s during setup: rolling back once every daemon is up", why)
                        deadline = time.monotonic() + SETUP_GRACE
                        # They stay readable (a peeked "cancel", an undrained wakeup): polled
                        # further, they would turn this wait into a spin.
                        for watched in waiter_watch:
                            poller.unregister(watched.fileno)
                        break
            for one in starting:
                stderr = one.spawned.stderr
                if stderr.fd in ready and not stderr.pump():
                    poller.unregister(stderr.fd)
                socket_fd = one.spawned.qmp_socket.fileno()
                if one.greeting is None and socket_fd in ready:
                    one.greeting = _read_greeting(one.spawned.qmp_socket, one.buffer)
                    if one.greeting is not None:
                        poller.unregister(socket_fd)  # it says nothing more (until EOF)
                # Greeted or not, a daemon that dies before all are up fails them all (and a
                # readable pidfd left registered would turn this wait into a spin).
                if one.pidfd in ready:
                    raise _died(one.spawned, one.graph, one.before, stopped)
            if deadline is not None and time.monotonic() >= deadline:
                late = [one.spawned.process.pid for one in starting if one.greeting is None]
                if late:
                    log.warning("qemu-storage-daemon (pid %s) does not answer; killing it",
                                ", ".join(map(str, late)))  # fmt: skip
                    raise Interrupted(stopped or "SIGINT")  # killed and detached just below
    except BaseException:
        for one in starting:
            one.abandon()
        raise
    log.debug("live: %.1f ms after spawn", (time.monotonic() - started) * 1000)
    daemons = []
    at = mounts.topmost(mounts.read_mounts())
    for one in starting:
        one.spawned.stderr.release()
        assert one.greeting is not None
        daemon = Daemon(one.spawned, one.pidfd, one.graph, _version(one.greeting))
        daemon.mounts = [e for x in one.graph.exports if (e := at.get(x.mountpoint)) is not None]
        daemons.append(daemon)
    if stopped is not None:
        stop_all(daemons)
        raise Interrupted(stopped)
    return daemons


def _died(spawned: Spawned, graph: BlockGraph, before: set[int], stopped: str | None) -> FdeError:
    status = spawned.process.wait()
    lines = spawned.stderr.since(0)
    for line in lines:
        log.debug("qemu-storage-daemon said: %s", line)
    detached = _detach_new(graph, before)
    if detached:
        log.debug("detached what it had mounted: %s", ", ".join(detached))
    if stopped is not None and status < 0:
        return Interrupted(stopped)
    error = explain(lines, graph)
    if error is None:
        said = f": {lines[-1]}" if lines else ""
        # A crash (an assertion in a format driver) names no option; with one image, it is that.
        images = {e.image for e in graph.exports}
        error = QemuError(
            f"qemu-storage-daemon {describe_exit(status)} during setup{said}",
            path=images.pop() if len(images) == 1 else None,
        )
    return error


class Unmounted:
    """A `Watch` on the daemons' exports in the mount table: called off once one of them has
    left it, unmounted by someone else (``umount``, ``fusermount3 -u``).  The daemon does not
    notice: it then spins on its FUSE device for good (every QEMU, 7.2 to 11.1 measured), and
    from 10.0 on writes "Failed to read from FUSE device" to stderr at each turn."""

    def __init__(self, daemons: Sequence[Daemon]) -> None:
        self._daemons = daemons
        # The table's descriptor turns POLLPRI at each of its changes (not POLLIN: always set).
        self._fd = os.open(mounts.MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)

    @property
    def fileno(self) -> int:
        return self._fd

    def reason(self) -> str | None:
        recorded = [e for d in self._daemons for e in d.mounts]
        now = mounts.where_now(recorded)
        gone = [e.mount_point for e, there in zip(recorded, now, strict=True) if there is None]
        if not gone:
            return None
        for daemon in self._daemons:
            daemon._spawned.stderr.unmounted(gone)
        return f"{', '.join(gone)} unmounted from outside"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def serve(*daemons: Daemon, watch: Sequence[Watch] = ()) -> tuple[Watch, str]:
    """Serve until a watch calls it off, or an export is unmounted from outside (`Unmounted`);
    return that watch and its reason.  The daemons are still running: `stop_all` them.

    :raise QemuError: a daemon died while serving (its mounts have been detached; the others
        still run).
    """
    waiter = _Waiter(daemons, watch)
    exports = Unmounted(daemons)
    try:
        waiter.poller.register(exports.fileno, select.POLLPRI)
        # Unmounted between live and now: the table has changed since, but not since `exports`.
        if (why := exports.reason()) is not None:
            return exports, why
        while True:
            called = waiter.called_off()
            if called is not None:
                return called
            ready = waiter.poll()
            # Before their stderr: what a daemon says once its export is gone is expected.
            if exports.fileno in ready and (why := exports.reason()) is not None:
                waiter.pump(ready)
                return exports, why
            waiter.pump(ready)
            for daemon in daemons:
                if daemon._pidfd in ready:
                    raise _died_serving(daemon)
    finally:
        exports.close()


def _died_serving(daemon: Daemon) -> QemuError:
    """The error of a daemon that has died while serving (its pidfd turned readable), once it
    is reaped and its dead mounts are detached."""
    status = daemon.process.wait()
    left = _detach_new(daemon.graph, set(), daemon.mounts)
    log.debug("detached the dead mounts on %s", ", ".join(left))
    return QemuError(
        f"qemu-storage-daemon (pid {daemon.pid}) {describe_exit(status)} while serving; "
        f"unmounted {', '.join(daemon.mountpoints)}"
    )


def stop_all(daemons: Sequence[Daemon], *, reap: bool = True) -> None:
    """`stop` every daemon; they all unmount at once (SIGTERM to each first).

    :param reap: wait for each to exit as well.  Without, this returns once each has closed its
        exports and images; `reap_all` must follow (before we exit: no daemon outlives us).
    """
    for daemon in daemons:
        _terminate(daemon)
    _each(daemons, lambda daemon: stop(daemon, reap=reap))


def reap_all(daemons: Sequence[Daemon]) -> None:
    """Wait for the exit of every daemon `stop_all` stopped without reaping."""
    _each(daemons, stop)


def _each(daemons: Sequence[Daemon], step: Callable[[Daemon], object]) -> None:
    """``step`` every daemon, even after one failed; then raise the first failure."""
    failed: list[QemuError] = []
    for daemon in daemons:
        try:
            step(daemon)
        except QemuError as e:
            failed.append(e)
    if failed:
        raise failed[0]


def _terminate(daemon: Daemon) -> bool:
    """SIGTERM, once; whether the daemon was still running."""
    if daemon.process.poll() is not None:
        return False
    if not daemon._terminated:
        daemon.process.send_signal(signal.SIGTERM)
        daemon._terminated = True
    return True


def _wait(daemon: Daemon, timeout: float, *, closed: bool = False) -> bool:
    """Wait up to ``timeout`` s for the daemon's exit or, with ``closed``, for it to close its
    monitor; pass on what it writes meanwhile.  Whether that came."""
    if daemon._pidfd < 0:
        return True
    waiter = _Waiter([daemon], ())
    monitor = daemon._spawned.qmp_socket
    if closed and monitor.fileno() >= 0:
        waiter.poller.register(monitor.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready = waiter.wait(left)
        if daemon._pidfd in ready:
            return True
        if closed and monitor.fileno() in ready and _at_eof(monitor):
            return True
    return False


def _at_eof(sock: socket.socket) -> bool:
    try:
        return not sock.recv(65536, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True


def _still_mounted(graph: BlockGraph) -> bool:
    """Whether something is still mounted on one of the graph's mount points.

    Not from mountinfo: reading it waits for the daemon's exit (measured: 3-5 ms for 128
    images), the very wait this spares.  A path that is a mount point has another device than
    its folder; a FUSE mount whose daemon closed it fails (ENOTCONN) at once.
    """
    folders: dict[str, int] = {}
    try:
        for export in graph.exports:
            folder = os.path.dirname(export.mountpoint)
            if folder not in folders:
                folders[folder] = os.lstat(folder).st_dev
            if os.lstat(export.mountpoint).st_dev != folders[folder]:
                return True
    except OSError:
        return True
    return False


def stop(daemon: Daemon, timeout: float = STOP_TIMEOUT, *, reap: bool = True) -> int | None:
    """Stop the daemon, reap it, and return its ``Popen.returncode``; whatever it left mounted
    is detached.  Stopping one that has stopped already just returns its status.

    Without ``reap``, this may return None as soon as the daemon has closed its monitor with
    none of its exports left mounted: qemu-storage-daemon closes its monitor only after it has
    removed every export (unmounted) and flushed and closed every node (the images unlocked);
    the exit that follows takes it milliseconds more (128 images: 3-5 ms).  That order is in
    its main() from 6.0, the first release with FUSE exports, onwards: commit "block: move
    blk_exp_close_all() to qemu_cleanup()" (Feb 2021) shows blk_exp_close_all,
    bdrv_drain_all_begin and bdrv_close_all after its main loop, and monitor_cleanup and
    qemu_chr_cleanup (which closes our socket) follow them in every release since.  A second
    `stop` (or `reap_all`) then reaps it.

    :raise QemuError: it did not answer SIGTERM within ``timeout`` and was killed (after the
        rest was done): what it had not flushed may be lost, which is no clean revert.
    """
    process = daemon.process
    killed = _terminate(daemon) and not _wait(daemon, timeout, closed=not reap)
    if killed:
        process.kill()
    if not reap and process.poll() is None and not _still_mounted(daemon.graph):
        return None
    if process.poll() is None and not _wait(daemon, timeout):
        log.warning("qemu-storage-daemon (pid %d) did not exit; killing it", process.pid)
        process.kill()
    daemon._close()
    status = process.returncode
    left = _detach_new(daemon.graph, set(), daemon.mounts)
    if left:
        # Expected of a daemon we killed: the error below says so.
        (log.debug if killed else log.warning)(
            "a mount was left on %s; detached it", ", ".join(left)
        )
    log.debug("qemu-storage-daemon %s", describe_exit(status))
    if killed:
        raise QemuError(
            f"qemu-storage-daemon (pid {process.pid}) did not stop within {timeout:g} s of "
            f"SIGTERM and was killed: writes to {', '.join(daemon.mountpoints)} that it had not "
            "yet flushed to the images may be lost"
        )
    return status
