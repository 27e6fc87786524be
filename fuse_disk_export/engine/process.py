"""Starting qemu-storage-daemon: cheap enough to do before asyncio and qemu.qmp are imported.

The daemon boots (a few milliseconds) while this process is still importing what it needs to talk
to it, so the two costs overlap instead of adding up.  It starts with nothing but a QMP monitor on
one end of a socketpair (connecting to a listening socket races at start-up), in a session of its
own (a terminal's Ctrl-C reaches only us, and we revert in order) and with a parent-death signal
(it never outlives us).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass

from fuse_disk_export.errors import RequirementError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

#: The signals that revert an export (and roll back one being set up).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def catch_stop_signals() -> list[str]:
    """Record stop signals from now on, until a `Session` takes over; returns the record.

    Without this, a Ctrl-C while we are still importing would be a KeyboardInterrupt somewhere
    instead of an orderly rollback.
    """
    caught: list[str] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: caught.append(signal.Signals(signum).name))
    return caught


def _die_with_parent(libc: ctypes.CDLL, parent: int) -> None:
    """Runs in the child between fork and exec: SIGTERM when the thread that forked us dies."""
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The parent may have died before prctl; then nobody would ever signal us.
    if os.getppid() != parent:
        os._exit(1)


def describe_exit(status: int) -> str:
    """``Popen.returncode`` in words: "exited with status 1", "killed by SIGKILL"."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


@dataclass
class Spawned:
    """A qemu-storage-daemon just started, and our end of its QMP socket."""

    process: subprocess.Popen[bytes]
    qmp_socket: socket.socket

    def abandon(self) -> None:
        """End a daemon nobody has connected to yet (ours, by pid), and close our end."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        with contextlib.suppress(OSError):
            self.qmp_socket.close()


def spawn(*, binary: str = "qemu-storage-daemon", stderr: int | None = None) -> Spawned:
    """Start qemu-storage-daemon with a QMP monitor on a socketpair.

    :param stderr: file descriptor for the daemon's own messages (default: ours).
    :raise RequirementError: the binary is not installed.
    """
    path = shutil.which(binary)
    if path is None:
        raise RequirementError(f"{binary} not found (Debian package qemu-system-common)")
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fd = theirs.fileno()
        argv = [path, "--chardev", f"socket,id=qmp0,fd={fd}", "--monitor", "chardev=qmp0"]
        log.debug("starting %s", " ".join(argv))
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr if stderr is not None else 2,
            pass_fds=(fd,),
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(libc, parent),
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return Spawned(process, ours)
