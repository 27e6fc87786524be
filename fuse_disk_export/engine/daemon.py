"""One qemu-storage-daemon process we own, and its QMP connection (qemu.qmp)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import subprocess
from collections.abc import Iterator, Sequence

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from fuse_disk_export.engine.process import Spawned, StderrTap, qemu_error
from fuse_disk_export.errors import QemuError

log = logging.getLogger(__name__)


class _RedactSecrets(logging.Filter):
    """Keep passphrases out of ``-v`` output and logs: mask the data of secret objects."""

    _data = re.compile(r'("data":\s*)"(?:[^"\\]|\\.)*"')

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if '"secret"' in text and '"data"' in text:
            record.msg, record.args = self._data.sub(r'\1"***"', text), None
        return True


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

    @property
    def version(self) -> tuple[int, int, int]:
        """QEMU's version, from the QMP greeting."""
        greeting = self.qmp.greeting
        qemu = greeting.QMP.version.get("qemu") if greeting is not None else None
        if not isinstance(qemu, dict):
            return (0, 0, 0)
        return (int(qemu.get("major", 0)), int(qemu.get("minor", 0)), int(qemu.get("micro", 0)))

    @classmethod
    async def connect(cls, spawned: Spawned) -> StorageDaemon:
        """Connect QMP to a daemon started by `spawn`; it is ours from then on.

        :raise QemuError: QMP could not be established (the daemon has been ended).
        """
        qmp = QMPClient("qemu-storage-daemon")
        qmp.logger.addFilter(_RedactSecrets())
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

    async def execute(self, command: str, args: dict[str, object] | None = None) -> object:
        """Run one QMP command.

        :raise LockedError: QEMU could not take the image lock (another process has it open).
        :raise QemuError: QEMU refused the command, or the daemon is gone.
        """
        try:
            return await self.qmp.execute(command, args)
        except ExecuteError as e:
            raise qemu_error(str(e)) from e
        except QMPError as e:
            raise QemuError(f"qemu-storage-daemon stopped answering ({command}): {e}") from e

    @contextlib.contextmanager
    def listen(self, names: Sequence[str]) -> Iterator[EventListener]:
        """Collect events named ``names`` for the duration of the block."""
        with self.qmp.listener(names) as listener:
            yield listener

    async def stop(self, timeout: float = 5.0) -> int:
        """Ask the daemon to quit (it flushes and closes every node), wait, and reap it."""
        if not self.exited:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await self.qmp.execute("quit")
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            log.warning("qemu-storage-daemon (pid %d) did not quit; killing it", self.pid)
            self.process.kill()
        await self.close()
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL the daemon, if it still runs.  Only ever our own child, by pid."""
        if self.process.poll() is None:
            self.process.kill()

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
