"""Apply a block graph all-or-nothing, serve until a stop signal or the daemon's death, revert.

This is the one place that guarantees no mount is left behind on any path it touched: whatever
happens between start and exit, `Session.run` ends by taking down what it brought up, and by
checking /proc/self/mountinfo for every mount point it used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from fuse_disk_export import mounts, stopsignals
from fuse_disk_export.engine import versions
from fuse_disk_export.engine.daemon import StorageDaemon
from fuse_disk_export.engine.graph import BlockGraph, Step
from fuse_disk_export.engine.process import Spawned, describe_exit, spawn
from fuse_disk_export.errors import FdeError, Interrupted, QemuError

log = logging.getLogger(__name__)

# Generous bounds for things that take milliseconds when QEMU is healthy.
EXPORT_DELETE_TIMEOUT = 10.0
UNMOUNT_TIMEOUT = 5.0
# How long a stop signal during setup waits for QEMU to answer the commands in flight.
APPLY_GRACE = 3.0


class Cancellable(Protocol):
    """Someone who may call the setup off: the waiting parent of a ``-d`` run."""

    @property
    def fileno(self) -> int:
        """Turns readable when `cancelled` may have news."""

    def cancelled(self) -> str | None:
        """The stop signal's name (or why), once the setup is called off; else None."""


class Session:
    """One invocation's exports, from the first QMP command to the last unmount check.

    :param graph: what to bring up.
    :param on_live: called once, when every export is mounted (write the pid file, tell the
        waiting parent, print the "set up" line). An `FdeError` it raises reverts everything.
    :param spawned: a daemon already started with `spawn` (so that it boots while we import);
        the session owns it from then on.
    :param cancel: watched until live; when it says so, the setup is rolled back.
    """

    def __init__(
        self,
        graph: BlockGraph,
        *,
        on_live: Callable[[Session], None],
        on_stop: Callable[[], object] | None = None,
        spawned: Spawned | None = None,
        cancel: Cancellable | None = None,
    ) -> None:
        self.graph = graph
        self.on_live = on_live
        self.on_stop = on_stop
        self._spawned = spawned
        self._cancel = cancel
        self._hung = False
        self.daemon: StorageDaemon | None = None
        self.stop_signal: str | None = None
        self._stop = asyncio.Event()
        self._done: list[Step] = []

    def request_stop(self, signame: str) -> None:
        """Ask the session to revert (from a signal handler or a test)."""
        if self.stop_signal is None:
            log.info("%s received, reverting", signame)
            self.stop_signal = signame
            if signame not in stopsignals.caught():
                stopsignals.note(signame)
            if self.on_stop is not None:
                self.on_stop()
        self._stop.set()

    def _check_stop(self) -> None:
        if self.stop_signal is not None:
            raise Interrupted(self.stop_signal)

    @property
    def mountpoints(self) -> list[str]:
        return [str(s.do.args["mountpoint"]) for s in self._done if s.do.args.get("type") == "fuse"]

    async def run(self) -> None:
        """Bring the graph up, serve, revert.  Returns after a clean revert on a stop signal.

        :raise Interrupted: a stop signal arrived before every export was live.
        :raise QemuError: QEMU refused part of the graph (nothing is left of it), or the daemon
            died while serving (its mounts have been detached).
        """
        loop = asyncio.get_running_loop()
        for sig in stopsignals.STOP_SIGNALS:
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        # Signals recorded since the entry point (while we parsed, probed, spawned).
        for name in stopsignals.caught():
            self.request_stop(name)
        self._watch_cancel(loop, True)
        try:
            try:
                spawned, self._spawned = self._spawned, None
                self.daemon = await StorageDaemon.connect(spawned or spawn())
                self._check_stop()
                await self._apply_or_give_up()
                self._guard_writes()
                self._watch_cancel(loop, False)
                self._check_stop()
                self.on_live(self)
                await self._serve()
            finally:
                await self._revert()
        finally:
            self._watch_cancel(loop, False)
            for sig in stopsignals.STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            stopsignals.resume()

    def _watch_cancel(self, loop: asyncio.AbstractEventLoop, on: bool) -> None:
        """Watch (or stop watching) whoever may call the setup off, until live."""
        cancel = self._cancel
        if cancel is None or cancel.fileno < 0:
            return
        if not on:
            loop.remove_reader(cancel.fileno)
            return

        def check() -> None:
            why = cancel.cancelled()
            if why is not None:
                loop.remove_reader(cancel.fileno)
                self.request_stop(why)

        loop.add_reader(cancel.fileno, check)

    async def _apply(self) -> None:
        assert self.daemon is not None
        for phase in self.graph.phases:
            said = self.daemon.stderr.count
            # Sent back to back: QEMU runs them in order, so a failure makes the rest of the phase
            # fail too, and we report the first one.
            results = await asyncio.gather(
                *(self.daemon.execute(s.do.name, s.do.args) for s in phase), return_exceptions=True
            )
            failure: tuple[Step, BaseException] | None = None
            for step, result in zip(phase, results, strict=True):
                if not isinstance(result, BaseException):
                    self._done.append(step)
                elif failure is None:
                    failure = (step, result)
            if failure is not None:
                step, error = failure
                if isinstance(error, FdeError):
                    if error.path is None:
                        error.path = step.image
                    # QMP's reason can be generic ("Failed to mount FUSE session to export");
                    # what QEMU or libfuse printed meanwhile says why.
                    cause = [line for line in self.daemon.stderr.since(said) if line]
                    if cause and cause[-1] not in error.reason:
                        error.reason = f"{error.reason} ({cause[-1]})"
                raise error
            self._check_stop()
            log.debug("phase of %d commands applied", len(phase))

    async def _apply_or_give_up(self) -> None:
        """`_apply`, unless a stop signal finds QEMU not answering: then it is killed.

        QEMU can hang in a command for good (7.2 did, opening a vmdk's extents with io_uring);
        the user's Ctrl-C must still end the run, leaving nothing mounted.
        """
        apply = asyncio.ensure_future(self._apply())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait((apply, stop), return_when=asyncio.FIRST_COMPLETED)
            if not apply.done():
                done, _ = await asyncio.wait((apply,), timeout=APPLY_GRACE)
                if not done and self.daemon is not None:
                    log.warning(
                        "qemu-storage-daemon (pid %d) does not answer; killing it", self.daemon.pid
                    )
                    self._hung = True
                    self.daemon.kill()
            try:
                await apply
            except QemuError as e:
                if self._hung and self.stop_signal is not None:
                    raise Interrupted(self.stop_signal) from e
                raise
        finally:
            stop.cancel()

    def _guard_writes(self) -> None:
        """Make writable FUSE exports safe on this QEMU, or say what is not (before live)."""
        assert self.daemon is not None
        version = self.daemon.version
        writable = [e for e in self.graph.exports if e.writable]
        if not writable:
            return
        if versions.punch_hole_may_keep_data(version):
            for export in writable:
                log.warning(
                    "%s: QEMU %s turns a punched hole into an advisory discard, which may keep "
                    "the old data: tools that zero by punching holes (qemu-img convert -n, "
                    "nbdcopy, fallocate -p) can leave wrong data without an error; QEMU 8.0 or "
                    "later fixes this (Debian 12: bookworm-backports)",
                    export.mountpoint,
                    versions.describe(version),
                )
        if not versions.needs_write_guard(version):
            return
        if not self.graph.write_guard:
            log.debug("write guard off (--no-write-guard) on QEMU %s", versions.describe(version))
            return
        # Two writes in flight can store each other's data: keep them one at a time.
        table = mounts.read_mounts()
        for export in writable:
            problem = mounts.limit_background_requests(export.mountpoint, table)
            if problem:
                log.warning(
                    "%s: cannot serialize writes (%s); with QEMU %s, concurrent AIO or "
                    "O_DIRECT writes through the export may be stored wrongly",
                    export.mountpoint,
                    problem,
                    versions.describe(version),
                )
            else:
                log.debug("%s: writes serialized (max_background=1)", export.mountpoint)

    async def _serve(self) -> None:
        assert self.daemon is not None
        stop = asyncio.ensure_future(self._stop.wait())
        death = asyncio.ensure_future(self.daemon.wait_exit())
        try:
            await asyncio.wait((stop, death), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            death.cancel()
        if self.daemon.exited:
            status = self.daemon.process.wait()
            paths = self.mountpoints
            self._detach(paths)
            raise QemuError(
                f"qemu-storage-daemon (pid {self.daemon.pid}) {describe_exit(status)} while "
                f"serving; unmounted {', '.join(paths)}"
            )

    async def _revert(self) -> None:
        """Undo every step that succeeded, newest first, then stop the daemon and check mounts."""
        daemon, self.daemon = self.daemon, None
        touched = self.mountpoints
        if self._hung:
            # A mount QEMU made without answering is not in _done: check every planned one.
            touched = sorted({*touched, *(e.mountpoint for e in self.graph.exports)})
        try:
            if daemon is not None:
                if not daemon.exited:
                    await self._undo(daemon)
                code = await daemon.stop()
                log.debug("qemu-storage-daemon %s", describe_exit(code))
        finally:
            self._done.clear()
            left = mounts.wait_unmounted(touched, 0) if touched else []
            if left:
                log.warning("a mount was left on %s; detaching it", ", ".join(left))
                self._detach(left)

    async def _undo(self, daemon: StorageDaemon) -> None:
        # Exports are removed one by one, and their mounts seen gone, before anything else goes;
        # nodes and everything else are then closed (and flushed) by `StorageDaemon.stop`.
        exports = [s for s in self._done if s.undo is not None]
        if exports:
            ids = {str(s.do.args["id"]) for s in exports}
            with daemon.listen(["BLOCK_EXPORT_DELETED"]) as deleted:
                results = await asyncio.gather(
                    *(daemon.execute(s.undo.name, s.undo.args) for s in exports if s.undo),
                    return_exceptions=True,
                )
                for result in results:
                    if isinstance(result, BaseException):
                        log.warning("removing an export failed: %s", result)
                try:
                    async with asyncio.timeout(EXPORT_DELETE_TIMEOUT):
                        while ids:
                            data = (await deleted.get()).get("data")
                            if isinstance(data, dict):
                                ids.discard(str(data.get("id")))
                except TimeoutError:
                    log.warning("QEMU did not confirm removal of export(s) %s", ", ".join(ids))
            fuse = [str(s.do.args["mountpoint"]) for s in exports if s.do.args["type"] == "fuse"]
            left = await asyncio.to_thread(mounts.wait_unmounted, fuse, UNMOUNT_TIMEOUT)
            if left:
                log.warning("still mounted after export removal: %s", ", ".join(left))

    @staticmethod
    def _detach(paths: Sequence[str]) -> None:
        for path in paths:
            if mounts.mount_at(path) is not None:
                mounts.lazy_unmount(path)
