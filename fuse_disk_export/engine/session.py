"""Serve a live graph until a stop signal or the daemon's death, then revert.

`bringup` brings the graph up without asyncio; this module takes the live daemon over through
qemu.qmp (which reads the greeting `bringup` left waiting) and is the one place that guarantees no
mount is left behind: whatever happens, `Session.serve` ends by stopping the daemon (``quit``
removes every export, then flushes and closes every node) and by checking /proc/self/mountinfo for
every mount point of the graph.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from fuse_disk_export import mounts, stopsignals
from fuse_disk_export.engine.bringup import Up
from fuse_disk_export.engine.daemon import StorageDaemon
from fuse_disk_export.engine.graph import BlockGraph
from fuse_disk_export.engine.process import describe_exit
from fuse_disk_export.errors import QemuError

log = logging.getLogger(__name__)


class Session:
    """One invocation's live daemon, from taking it over to the last unmount check.

    :param graph: what the daemon brought up.
    :param up: the daemon, every export mounted, its QMP greeting unread.
    :param on_stop: called once, when a stop signal arrives (systemd's STOPPING=1).
    """

    def __init__(
        self, graph: BlockGraph, up: Up, *, on_stop: Callable[[], object] | None = None
    ) -> None:
        self.graph = graph
        self.up = up
        self.on_stop = on_stop
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
        try:
            await asyncio.wait((stop, death), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            death.cancel()
        if daemon.exited:
            raise self._died(daemon.process.wait())

    def _died(self, status: int) -> QemuError:
        self._detach(self.mountpoints)
        return QemuError(
            f"qemu-storage-daemon (pid {self.up.spawned.process.pid}) {describe_exit(status)} "
            f"while serving; unmounted {', '.join(self.mountpoints)}"
        )

    async def _revert(self, daemon: StorageDaemon) -> None:
        """Stop the daemon (it unmounts, flushes and closes everything), then check the mounts."""
        try:
            code = await daemon.stop()
            log.debug("qemu-storage-daemon %s", describe_exit(code))
        finally:
            left = mounts.wait_unmounted(self.mountpoints, 0)
            if left:
                log.warning("a mount was left on %s; detaching it", ", ".join(left))
                self._detach(left)

    @staticmethod
    def _detach(paths: list[str]) -> list[str]:
        detached = []
        for path in paths:
            if mounts.mount_at(path) is not None:
                mounts.lazy_unmount(path)
                detached.append(path)
        return detached
