"""Starting qemu-storage-daemon (and a ``--mount-fs`` driver), and reading what they say.

It starts with the graph's options and then a QMP monitor on one end of a socketpair
(connecting to a listening socket races at start-up), in a session of its own (a terminal's
Ctrl-C reaches only us, and we revert in order) and with a parent-death signal (it never outlives
us).  Its stderr is passed on as it comes, and its latest lines kept for error messages.
"""

import collections
import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from fuse_disk_export.engine import limits
from fuse_disk_export.errors import LockedError, QemuError, RequirementError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(parent: int) -> None:
    """The one thing done in the child between fork and exec (CPython warns that code there is
    unsafe where the parent has threads, so nothing else is): SIGTERM when the thread that
    forked us dies.  There is no way to ask for it from outside the child."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The parent may have died before prctl; then nobody would ever signal us.
    if os.getppid() != parent:
        os._exit(1)


@contextlib.contextmanager
def room_for_descriptors(count: int) -> Iterator[None]:
    """While the block runs, a child forked in it starts with room for ``count`` descriptors.

    The kernel grows a descriptor table that is full by doubling it, and in a process with
    threads each growth waits for an RCU grace period (milliseconds).  qemu-storage-daemon has
    threads before it opens anything, and holds two descriptors per image (the file,
    /dev/fuse): from the default 64 slots to 512 for 128 images, three waits, 40 of its 87 ms to
    go live (docs/performance.md).  A forked child's table is a copy of ours as far as
    our highest open descriptor (``dup_fd``), and survives exec: so we hold one open that high
    across the fork (close-on-exec, and closed in the child with the others), nothing between
    fork and exec.  Our own table grows once and never shrinks.  Beyond RLIMIT_NOFILE, as far as
    the limit lets it.
    """
    highest = min(count, os.sysconf("SC_OPEN_MAX")) - 1
    fd = -1
    if highest >= _DEFAULT_TABLE:
        with contextlib.suppress(OSError):
            # The lowest free slot from there up.
            fd = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, highest)
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)


#: The slots a new process's descriptor table has (NR_OPEN_DEFAULT).
_DEFAULT_TABLE = 64


def describe_exit(status: int) -> str:
    """``Popen.returncode`` in words: "exited with status 1", "killed by SIGKILL"."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


#: How often a line of the daemon's that repeats itself is passed on after its first time: a
#: daemon whose export was unmounted from outside writes the same line at each turn of a busy
#: loop (QEMU 11.1: 95,000 lines a second), and a log file would take them all.
MAX_REPEATS = 2


class StderrTap:
    """qemu-storage-daemon's stderr: passed on, line by line, to where it would have gone (our
    stderr: the terminal, or a ``-d`` daemon's log), with its latest lines kept, so that an error
    can carry the specific cause QEMU or libfuse printed ("fuse: failed to open /dev/fuse: ...")
    behind a generic QMP error ("Failed to mount FUSE session to export")."""

    def __init__(self, fd: int, forward: int, keep: int = 16) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.forward = forward
        self._partial = b""
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.count = 0
        #: Until `release`, lines are held back: if the setup fails, what the daemon said is in
        #: the one-line error instead (and in the debug log), not printed twice.
        self._held: list[bytes] | None = []
        # A line that comes again and again is passed on only `MAX_REPEATS` times more.
        self._last: bytes | None = None
        self._repeats = 0
        self._gone: tuple[bytes, ...] = ()
        self._quiet = False

    def release(self) -> None:
        """Pass on what was held back, and everything from now on."""
        held, self._held = self._held, None
        if held:
            with contextlib.suppress(OSError):
                os.write(self.forward, b"".join(held))

    def pump(self) -> bool:
        """Take whatever the daemon has written; False once it has closed its end."""
        while self.fd >= 0:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                self._take(self._partial + b"\n" if self._partial else b"", end=True)
                self._partial = b""
                return False
            self._take(self._partial + data)
        return False

    def unmounted(self, paths: Sequence[str]) -> None:
        """``paths`` were unmounted from outside: what the daemon then says is expected, and
        is not passed on: its reads failing ("Failed to read from FUSE device: No such
        device", 10.0 and later), and its own unmount ("fuse: failed to unmount ...", "umount:
        ...: not mounted")."""
        self._gone = tuple(os.fsencode(p) for p in paths)

    def quiet(self) -> None:
        """From now on nothing is passed on (only logged for -v), and the latest lines are
        still kept for an error: what a process says after its end was decided is a consequence,
        not news, and some programs say nothing but chatter (fusefat)."""
        self._quiet = True

    def _expected(self, line: bytes) -> bool:
        if self._quiet:
            return True
        if not self._gone:
            return False
        if b"Failed to read from FUSE device" in line:
            return True
        return any(p in line for p in self._gone) and (b"unmount" in line or b"not mounted" in line)

    def _take(self, data: bytes, *, end: bool = False) -> None:
        *lines, self._partial = data.split(b"\n")
        out = []
        for line in lines:
            self._lines.append(line.decode(errors="replace").strip())
            self.count += 1
            if self._expected(line):
                log.debug("left out: %s", line.decode(errors="replace"))
                continue
            if line == self._last:
                self._repeats += 1
                if self._repeats > MAX_REPEATS:
                    continue
            else:
                out.append(self._repeated())
                self._last, self._repeats = line, 0
            out.append(line + b"\n")
        if end:  # say how often the last line came
            out.append(self._repeated())
        self._write(b"".join(out))

    def _repeated(self) -> bytes:
        """The note on lines left out since the last one passed on (none: empty)."""
        if self._repeats <= MAX_REPEATS:
            return b""
        left_out, self._repeats = self._repeats - MAX_REPEATS, MAX_REPEATS
        return f"qemu-storage-daemon: (the line above came {left_out} more times)\n".encode()

    def _write(self, data: bytes) -> None:
        if not data:
            return
        if self._held is not None:
            self._held.append(data)
        else:
            with contextlib.suppress(OSError):
                os.write(self.forward, data)

    def since(self, mark: int) -> list[str]:
        """The non-empty lines written since `count` was ``mark`` (the latest few of them)."""
        self.pump()
        new = (
            list(self._lines)[-min(self.count - mark, len(self._lines)) :]
            if self.count > mark
            else []
        )
        return [line.removeprefix("qemu-storage-daemon: ") for line in new if line]

    def close(self) -> None:
        if self.fd >= 0:
            self.pump()
            os.close(self.fd)
            self.fd = -1


class Spawned(NamedTuple):
    """A qemu-storage-daemon just started, our end of its QMP socket, and its stderr."""

    process: subprocess.Popen[bytes]
    qmp_socket: socket.socket
    stderr: StderrTap


def find_binary(binary: str = "qemu-storage-daemon") -> str:
    """The path of ``binary`` on PATH.

    :raise RequirementError: it is not installed.
    """
    path = shutil.which(binary)
    if path is None:
        raise RequirementError(
            f"{binary} not found (Debian package qemu-system-common; qemu-utils from QEMU 10)"
        )
    return path


def spawn(
    options: Sequence[str] = (),
    *,
    pass_fds: Sequence[int] = (),
    binary: str = "qemu-storage-daemon",
    stderr: int = 2,
    descriptors: int = 0,
) -> Spawned:
    """Start qemu-storage-daemon with ``options`` and then a QMP monitor on a socketpair.

    The monitor comes *last*: qemu-storage-daemon creates what its options ask for in order, so
    its QMP greeting arrives only once every node and export of ``options`` is up.

    :param options: ``--object``/``--blockdev``/``--nbd-server``/``--export`` and their JSON.
    :param descriptors: how many the options will have it hold (`BlockGraph.descriptors`).
    :param pass_fds: descriptors the options name (``/dev/fd/N`` of a secret's pipe).
    :param stderr: file descriptor the daemon's own messages are passed on to (default: ours).
    :raise RequirementError: the binary is not installed, or the hard limit on open files is
        too low for ``descriptors``.
    :raise UsageError: the options are longer than the kernel takes on a command line.
    """
    path = find_binary(binary)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fd = theirs.fileno()
        argv = [path, *options, "--chardev", f"socket,id=qmp0,fd={fd}", "--monitor", "chardev=qmp0"]
        limits.check_command_line(argv)
        # Room for the daemon's own as well (event notifiers, the monitor, io_uring, libraries).
        with (
            limits.nofile_for_child(limits.descriptors_needed(descriptors)),
            room_for_descriptors(_DEFAULT_TABLE + descriptors),
        ):
            process, tap = start_child(argv, pass_fds=(fd, *pass_fds), stderr=stderr)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return Spawned(process, ours, tap)


def start_child(
    argv: Sequence[str], *, pass_fds: Sequence[int] = (), stderr: int = 2
) -> tuple[subprocess.Popen[bytes], StderrTap]:
    """Start ``argv`` as a child that never outlives us: in a session of its own (a terminal's
    Ctrl-C reaches only us, and we stop it in order), with a parent-death signal, and its stderr
    tapped (passed on to ``stderr``, its latest lines kept for errors)."""
    log.debug("starting %s", " ".join(argv))
    parent = os.getpid()
    errors_r, errors_w = os.pipe()
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors_w,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),
        )
    except BaseException:
        os.close(errors_r)
        raise
    finally:
        os.close(errors_w)
    return process, StderrTap(errors_r, stderr)


def qemu_error(message: str, *, path: str | None = None) -> QemuError:
    """QEMU's error message as the error a user should see (lock and FUSE support explained)."""
    if "lock" in message and ("Failed to get" in message or "another process" in message):
        return LockedError(f"image is in use: locked by another process ({message})", path=path)
    if "does not accept value 'fuse'" in message:
        return QemuError(
            "this qemu-storage-daemon has no FUSE export support (built without --enable-fuse; "
            f"QEMU 6.0 or later with FUSE is needed): {message}",
            path=path,
        )
    return QemuError(message, path=path)
