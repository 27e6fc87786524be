"""Bring a graph up from qemu-storage-daemon's command line, without asyncio or qemu.qmp.

The daemon creates every ``--object``, ``--blockdev`` and ``--export`` before its main loop, and
its QMP monitor, given last, greets only once all of them are up: so the greeting, seen waiting on
our end of the socketpair (``poll``, then ``MSG_PEEK`` so that qemu.qmp still reads it itself
later), *is* "every export is mounted".  Until then this waits on the daemon's exit (a pidfd), its
stderr (passed on as it comes, so that it never blocks on a full pipe), stop signals (a wakeup fd)
and the waiting parent of a ``-d`` run calling the setup off.

If an option fails, the daemon prints why and exits 1, leaving as dead mounts the exports it had
already mounted: those are detached, and the error names the image the failed option was for.
"""

import contextlib
import json
import os
import select
import signal
import socket
import time
from collections.abc import Iterator, Mapping
from typing import NamedTuple, Protocol

from fuse_disk_export import lazylog, mounts, stopsignals
from fuse_disk_export.engine import wakeups
from fuse_disk_export.engine.graph import BlockGraph
from fuse_disk_export.engine.process import Spawned, describe_exit, qemu_error, spawn
from fuse_disk_export.engine.versions import QemuVersion
from fuse_disk_export.errors import FdeError, Interrupted, QemuError, UsageError

log = lazylog.get(__name__)

#: How long a stop signal during setup waits for the daemon to finish what it is creating (it
#: takes milliseconds), before a daemon that does not answer is killed: QEMU can hang in an open
#: for good (7.2 and 10.0.2 did, opening a vmdk's extents with io_uring).
SETUP_GRACE = 3.0


class Cancellable(Protocol):
    """Someone who may call the setup off: the waiting parent of a ``-d`` run."""

    @property
    def fileno(self) -> int:
        """Turns readable when `cancelled` may have news."""

    def cancelled(self) -> str | None:
        """The stop signal's name (or why), once the setup is called off; else None."""


class Up(NamedTuple):
    """A daemon with every export of its graph mounted; its QMP greeting not yet read."""

    spawned: Spawned
    version: QemuVersion


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


def _greeting(sock: socket.socket) -> dict[str, object] | None:
    """The QMP greeting, if all of it has arrived (left in the socket for qemu.qmp)."""
    data = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if not data.endswith(b"\n"):
        return None
    try:
        greeting = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return {}
    return greeting if isinstance(greeting, dict) else {}


def _version(greeting: Mapping[str, object]) -> QemuVersion:
    qmp = greeting.get("QMP")
    version = qmp.get("version") if isinstance(qmp, dict) else None
    qemu = version.get("qemu") if isinstance(version, dict) else None
    if not isinstance(qemu, dict):
        return (0, 0, 0)
    return (int(qemu.get("major", 0)), int(qemu.get("minor", 0)), int(qemu.get("micro", 0)))


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
                image = step.image if not step.image.startswith("secret ") else None
                return qemu_error(reason, path=image)
    return None


def _detach_new(graph: BlockGraph, before: set[int]) -> list[str]:
    """Detach the mounts the daemon made (not there before it started); return their paths."""
    table = mounts.read_mounts()
    detached = []
    for export in graph.exports:
        entry = mounts.mount_at(export.mountpoint, table)
        if entry is not None and entry.mount_id not in before:
            mounts.lazy_unmount(export.mountpoint)
            detached.append(export.mountpoint)
    return detached


def bring_up(
    graph: BlockGraph,
    *,
    pass_fds: list[int] | None = None,
    cancel: Cancellable | None = None,
    watch_signals: bool = True,
) -> Up:
    """Start a qemu-storage-daemon that brings ``graph`` up; return once every export is live.

    A stop signal recorded meanwhile does not stop the wait (the daemon is mid-way through its
    options; it answers within milliseconds), unless the daemon does not finish within
    `SETUP_GRACE`: then it is killed.  The caller reverts a daemon that came up after a stop
    signal, and reports the interruption.

    :raise Interrupted: stopped by a signal and killed (nothing is left mounted).
    :raise QemuError: the daemon refused an option or died (nothing is left mounted).
    """
    table = mounts.read_mounts()
    before = {
        e.mount_id for x in graph.exports if (e := mounts.mount_at(x.mountpoint, table)) is not None
    }
    started = time.monotonic()
    spawned = spawn(graph.command_line(), pass_fds=pass_fds or [], descriptors=graph.descriptors())
    log.debug("qemu-storage-daemon pid %d started", spawned.process.pid)
    pidfd = os.pidfd_open(spawned.process.pid)
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    old_wakeup = None
    if watch_signals:
        # Outside the main thread, signals are someone else's business.
        with contextlib.suppress(ValueError):
            old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    poller = select.poll()
    watched = [spawned.qmp_socket.fileno(), pidfd, wake_r.fileno(), spawned.stderr.fd]
    if cancel is not None and cancel.fileno >= 0:
        watched.append(cancel.fileno)
    for fd in watched:
        poller.register(fd, select.POLLIN)
    deadline: float | None = None
    stopped: str | None = None
    try:
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = dict(poller.poll(None if timeout is None else timeout * 1000))
            if spawned.stderr.fd in events and not spawned.stderr.pump():
                poller.unregister(spawned.stderr.fd)
            if wake_r.fileno() in events:
                wake_r.recv(256)
            if cancel is not None and cancel.fileno in events:
                why = cancel.cancelled()
                if why is not None:
                    poller.unregister(cancel.fileno)
                    stopsignals.note(why)
                    stopped = stopped or why
            if watch_signals:
                stopped = stopped or stopsignals.first()
            if stopped is not None and deadline is None:
                log.info("%s during setup: rolling back once qemu-storage-daemon is up", stopped)
                deadline = time.monotonic() + SETUP_GRACE
            if spawned.qmp_socket.fileno() in events:
                greeting = _greeting(spawned.qmp_socket)
                if greeting is not None:
                    log.debug("live: %.1f ms after spawn", (time.monotonic() - started) * 1000)
                    spawned.unpin()
                    spawned.stderr.release()
                    return Up(spawned, _version(greeting))
            if pidfd in events:
                raise _died(spawned, graph, before)
            if deadline is not None and time.monotonic() >= deadline:
                log.warning(
                    "qemu-storage-daemon (pid %d) does not answer; killing it", spawned.process.pid
                )
                raise Interrupted(stopped or "SIGINT")  # killed and detached just below
    except BaseException:
        if spawned.process.poll() is None:
            spawned.process.kill()
        spawned.abandon()
        _detach_new(graph, before)
        raise
    finally:
        if old_wakeup is not None:
            signal.set_wakeup_fd(old_wakeup)
        wake_r.close()
        wake_w.close()
        os.close(pidfd)


def _died(spawned: Spawned, graph: BlockGraph, before: set[int]) -> FdeError:
    status = spawned.process.wait()
    lines = spawned.stderr.since(0)
    for line in lines:
        log.debug("qemu-storage-daemon said: %s", line)
    detached = _detach_new(graph, before)
    if detached:
        log.debug("detached what it had mounted: %s", ", ".join(detached))
    stopped = stopsignals.first()
    error = explain(lines, graph)
    if error is None:
        said = f": {lines[-1]}" if lines else ""
        error = QemuError(f"qemu-storage-daemon {describe_exit(status)} during setup{said}")
    if stopped is not None and status < 0:
        return Interrupted(stopped)
    return error


def terminate(up: Up, graph: BlockGraph, timeout: float = 5.0) -> int:
    """Stop a daemon without QMP and return its exit status.

    SIGTERM makes qemu-storage-daemon do what ``quit`` does: remove every export, then flush and
    close every node.  Whatever it leaves mounted is detached.
    """
    process = up.spawned.process
    if process.poll() is None:
        pidfd = os.pidfd_open(process.pid)
        try:
            with wakeups.prompt():
                process.send_signal(signal.SIGTERM)
                if not select.select([pidfd], [], [], timeout)[0]:
                    log.warning(
                        "qemu-storage-daemon (pid %d) did not stop; killing it", process.pid
                    )
                    process.kill()
        finally:
            os.close(pidfd)
    status = process.wait()
    up.spawned.abandon()
    left = _detach_new(graph, set())
    if left:
        log.warning("a mount was left on %s; detached it", ", ".join(left))
    log.debug("qemu-storage-daemon %s", describe_exit(status))
    return status
