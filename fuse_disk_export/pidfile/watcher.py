"""Tidy up after us even when we are killed outright (SIGKILL, the OOM killer).

qemu-storage-daemon follows us through its parent-death signal and unmounts its exports, and
registry entries of dead processes are ignored and removed when read; what nobody else does is
remove the pid file.  So a watcher (a plain ``sh``, in a session of its own so that a terminal's
signals do not reach it) holds the read end of a pipe whose write end only we have — and the
processes we give it to: qemu-storage-daemon and a ``--mount-fs`` driver.  Once all of them have
exited, however they exit, the kernel has closed every write end; the watcher's ``read`` returns
and it removes the pid file if the file still names us.  So even then, a pid file that is gone
means the daemon has gone (its exports unmounted, the images unlocked).  The watcher may start
before the pid file is written; after a normal revert the file is already gone and it just exits.
"""

from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger(__name__)

_WATCH = 'read -r _ || :; [ "$(cat -- "$2" 2>/dev/null)" = "$1" ] && rm -f -- "$2"; exit 0'

# The write ends we hold, for as long as the process lives (never closed on purpose).
_held: list[int] = []


def remove_pid_file_when_gone(pid_file: str, pid: int | None = None) -> int | None:
    """Start a watcher that removes ``pid_file`` once process ``pid`` (default: us) has exited,
    and every process given the returned descriptor (``pass_fds``) too.

    The file is removed only if it still holds ``pid``: another instance may have taken the name.
    Returns the write end of the watcher's pipe (ours for good), or None without a watcher.
    Never raises: without the watcher, a SIGKILL leaves a stale pid file, nothing worse.
    """
    pid = os.getpid() if pid is None else pid
    read_end, write_end = os.pipe()  # both close-on-exec: no other child inherits our end
    try:
        subprocess.Popen(
            ["/bin/sh", "-c", _WATCH, "fde-guard", str(pid), os.path.abspath(pid_file)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as e:
        os.close(write_end)
        log.debug("no watcher for %s: %s", pid_file, e)
        return None
    finally:
        os.close(read_end)
    _held.append(write_end)
    return write_end
