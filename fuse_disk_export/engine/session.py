"""Serve a live graph until a stop signal or the daemon's death, then revert.

`bringup` brings the graph up without asyncio; this module takes the live daemon over through
qemu.qmp (which reads the greeting `bringup` left waiting).  Whatever happens, `Session.serve` ends
by unmounting a ``--mount-fs`` filesystem and stopping the daemon (SIGTERM: it removes every export,
then flushes and closes every node); `export.live`, around it, then checks /proc/self/mountinfo
for every mount point of the graph (`bringup.terminate`).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

from fuse_disk_export import fsmount, lazylog, mounts, stopsignals
from fuse_disk_export.engine.bringup import Up
from fuse_disk_export.engine.daemon import StorageDaemon
from fuse_disk_export.engine.graph import BlockGraph
from fuse_disk_export.engine.process import describe_exit
from fuse_disk_export.errors import QemuError
from fuse_disk_export.fsmount import FsError, Mounted

log = lazylog.get(__name__)


class Session:
    """One invocation's live daemon, from taking it over to the last unmount check.

    :param graph: what the daemon brought up.
    :param up: the daemon, every export mounted, its QMP greeting unread.
    :param on_stop: called once, when a stop signal arrives (systemd's STOPPING=1).
    :param filesystem: the ``--mount-fs`` driver on top of the export: watched like the daemon,
        and unmounted first.
    """

    def __init__(
        self,
        graph: BlockGraph,
        up: Up,
        *,
        on_stop: Callable[[], object] | None = None,
        filesystem: Mounted | None = None,
    ) -> None:
        self.graph = graph
        self.up = up
        self.on_stop = on_stop
        self.filesystem = filesystem
        self.stop_signal: str | None = None
        self._stop = asyncio.Event()

    @property
    def mountpoints(self) -> list[str]:
        return [e.mountpoint for e in self.graph.exports]

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

    async def serve(self) -> None:
        """Serve until a stop signal, then revert.

        :raise QemuError: the daemon died while serving (its mounts have been detached).
        """
        loop = asyncio.get_running_loop()
        for sig in stopsignals.STOP_SIGNALS:
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        try:
            # Signals recorded since live was reported (while asyncio and qemu.qmp loaded).
            for name in stopsignals.caught():
                self.request_stop(name)
            try:
                daemon = await StorageDaemon.connect(self.up.spawned)
            except QemuError:
                # It died before we could take it over: as a death while serving.
                raise self._died(self.up.spawned.process.wait()) from None
            try:
                await self._wait(daemon)
            finally:
                await self._revert(daemon)
        finally:
            for sig in stopsignals.STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            stopsignals.resume()

    async def _wait(self, daemon: StorageDaemon) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        death = asyncio.ensure_future(daemon.wait_exit())
        waits = [stop, death]
        driver_gone = asyncio.Event()
        loop = asyncio.get_running_loop()
        pidfd = -1
        if self.filesystem is not None:
            pidfd = os.pidfd_open(self.filesystem.process.pid)
            loop.add_reader(pidfd, driver_gone.set)
            waits.append(asyncio.ensure_future(driver_gone.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            if pidfd >= 0:
                loop.remove_reader(pidfd)
                os.close(pidfd)
        if daemon.exited:
            raise self._died(daemon.process.wait())
        if driver_gone.is_set() and self.filesystem is not None:
            raise self._driver_died(self.filesystem)

    def _driver_died(self, mounted: Mounted) -> FsError:
        status = mounted.process.wait()
        said = mounted.stderr.since(0)
        fsmount.unmount(mounted)  # detaches the dead mount
        why = f": {said[-1]}" if said else ""
        return FsError(
            f"{mounted.driver.program} (pid {mounted.process.pid}) {describe_exit(status)} while "
            f"serving{why}; detached it, and reverted the export",
            path=mounted.directory,
        )

    def _died(self, status: int) -> QemuError:
        self._detach()
        return QemuError(
            f"qemu-storage-daemon (pid {self.up.spawned.process.pid}) {describe_exit(status)} "
            f"while serving; unmounted {', '.join(self.mountpoints)}"
        )

    async def _revert(self, daemon: StorageDaemon) -> None:
        """Unmount the filesystem on top first, then stop the daemon (it unmounts, flushes and
        closes everything)."""
        if self.filesystem is not None:
            fsmount.unmount(self.filesystem)
        code = await daemon.stop()
        log.debug("qemu-storage-daemon %s", describe_exit(code))

    def _detach(self) -> None:
        """Detach the dead mounts a killed daemon left."""
        table = mounts.read_mounts()
        for path in self.mountpoints:
            if mounts.mount_at(path, table) is not None:
                mounts.lazy_unmount(path)
