"""One qemu-storage-daemon process we own, and its QMP connection (qemu.qmp)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess

from qemu.qmp import QMPClient, QMPError

from fuse_disk_export import lazylog
from fuse_disk_export.engine import wakeups
from fuse_disk_export.engine.process import Spawned, StderrTap
from fuse_disk_export.errors import QemuError

log = lazylog.get(__name__)


class StorageDaemon:
    """A running qemu-storage-daemon we own, driven through qemu.qmp.

    Create with `connect`; always end with `stop` (or `kill` when QMP is gone).
    """

    def __init__(self, process: subprocess.Popen[bytes], qmp: QMPClient, stderr: StderrTap) -> None:
        self.process = process
        self.qmp = qmp
        self.stderr = stderr
        self._exited = asyncio.Event()
        self._pidfd = os.pidfd_open(process.pid)
        loop = asyncio.get_running_loop()
        loop.add_reader(self._pidfd, self._on_exit)
        loop.add_reader(stderr.fd, self._on_stderr)

    def _on_stderr(self) -> None:
        if not self.stderr.pump():
            asyncio.get_running_loop().remove_reader(self.stderr.fd)

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def connect(cls, spawned: Spawned) -> StorageDaemon:
        """Connect QMP to a daemon started by `spawn`; it is ours from then on.

        :raise QemuError: QMP could not be established (the daemon has been ended).
        """
        qmp = QMPClient("qemu-storage-daemon")
        try:
            await qmp.connect(spawned.qmp_socket)
        except QMPError as e:
            spawned.abandon()
            said = spawned.stderr.since(0)
            raise QemuError(
                f"qemu-storage-daemon did not answer on QMP: {said[-1] if said else e}"
            ) from e
        log.debug("qemu-storage-daemon pid %d, QMP up", spawned.process.pid)
        return cls(spawned.process, qmp, spawned.stderr)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        self._exited.set()

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    async def wait_exit(self) -> int:
        """Wait until the process has ended and return its ``Popen.returncode``."""
        await self._exited.wait()
        return self.process.wait()

    async def stop(self, timeout: float = 5.0) -> int:
        """Stop the daemon (it removes every export, then flushes and closes every node), wait,
        and reap it.

        By SIGTERM, with our QMP connection closed first, rather than by ``quit``: both only set
        the daemon's ``exit_requested`` (``qemu_system_killed`` and ``qmp_quit`` in
        storage-daemon/qemu-storage-daemon.c).  But a client still connected is sent
        a BLOCK_EXPORT_DELETED event for each export, and was woken once per export while the
        daemon unmounted: 128 images reverted in 33-37 ms that way, 24 ms this way, 1 s after
        live (docs/benchmarks.md, "Round 5").  The unmounts wait on kernel threads, hence the
        CPU latency request (`wakeups`).
        """
        with wakeups.prompt():
            try:
                await self.qmp.disconnect()
            except Exception as e:  # whatever the connection's end was, the daemon is stopped
                log.debug("QMP connection ended with: %r", e)
            if not self.exited:
                self.process.send_signal(signal.SIGTERM)  # a no-op once it has been reaped
            try:
                await asyncio.wait_for(self._exited.wait(), timeout)
            except TimeoutError:
                log.warning("qemu-storage-daemon (pid %d) did not stop; killing it", self.pid)
                self.process.kill()
        await self.close()
        return self.process.wait()

    async def close(self) -> None:
        """Drop the QMP connection and the pidfd; the process is not touched."""
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self.qmp.disconnect()
        if self._pidfd >= 0:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self.stderr.fd >= 0:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self.stderr.fd)
            self.stderr.close()
