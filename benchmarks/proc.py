"""Processes, mounts and waits for the benchmarks.

Every wait has a deadline and sleeps on a file descriptor that wakes it when the thing it waits
for happens: a pidfd (process exit), /proc/self/mountinfo (POLLPRI on any mount change) or inotify
(a pid file created or removed).  Processes are only ever signalled through a pidfd we opened on a
pid we started (directly, or as written in a pid file we asked for), never by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from fuse_disk_export.mounts import lazy_unmount, parse_mountinfo

MOUNTINFO = "/proc/self/mountinfo"


class BenchError(Exception):
    """A benchmark step failed; the message says which and why."""


class Timeout(BenchError):
    """A condition was not met before its deadline."""


# ---------------------------------------------------------------------------------------------
# mountinfo


def parse_mountpoints(text: str) -> list[str]:
    return [entry.mount_point for entry in parse_mountinfo(text)]


def mountpoints() -> set[str]:
    with open(MOUNTINFO, "rb") as f:
        return set(parse_mountpoints(f.read().decode("utf-8", "surrogateescape")))


class MountWatch:
    """An open mountinfo: `fileno` polls POLLPRI when the mount table changes; `current` re-reads
    through the same handle, which is what re-arms the notification."""

    def __init__(self) -> None:
        self._f = open(MOUNTINFO, "rb")  # noqa: SIM115 - closed in close()

    def fileno(self) -> int:
        return self._f.fileno()

    def current(self) -> set[str]:
        self._f.seek(0)
        return set(parse_mountpoints(self._f.read().decode("utf-8", "surrogateescape")))

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> MountWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# inotify (ctypes: the standard library has no binding)

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CLOSE_WRITE = 0x8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class DirWatch:
    """inotify on one directory: wakes a poll when names in it are created, removed or renamed."""

    MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE

    def __init__(self, directory: str) -> None:
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._fd: int = int(fd)
        if _libc.inotify_add_watch(fd, os.fsencode(directory), self.MASK) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {directory}")

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> None:
        while True:
            try:
                if not os.read(self._fd, 65536):
                    return
            except BlockingIOError:
                return

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DirWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# processes


def pid_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts as gone: PID 1 here reaps only every ~2 s)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" in line.split()[1]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return False


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/PID/task/*/children)."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                kids.extend(int(x) for x in f.read().split())
    return kids


def status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmHWM, VmRSS), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def read_pid_file(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


@dataclass
class Owned:
    """A process we started, held by pidfd so that signals can never reach a recycled pid."""

    pid: int
    name: str
    pidfd: int
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.pidfd < 0:
            return False
        ready, _, _ = select.select([self.pidfd], [], [], 0)
        return not ready

    def signal(self, sig: int) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def wait(self, timeout: float) -> bool:
        """Wait for exit; True if it exited in time.  Reaps it if it is our child."""
        if self.pidfd >= 0:
            ready, _, _ = select.select([self.pidfd], [], [], max(timeout, 0))
            if not ready:
                return False
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=1)
        return True

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


@dataclass
class Janitor:
    """Everything a run started or mounted, taken down in `cleanup` whatever happened."""

    root: str
    processes: list[Owned] = field(default_factory=list)
    mounts: set[str] = field(default_factory=set)

    def adopt(self, pid: int, name: str, popen: subprocess.Popen[bytes] | None = None) -> Owned:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = -1
        owned = Owned(pid, name, fd, popen)
        self.processes.append(owned)
        return owned

    def spawn(self, argv: Sequence[str], name: str, **kwargs: object) -> Owned:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen = subprocess.Popen(list(argv), **kwargs)  # type: ignore[call-overload]
        return self.adopt(popen.pid, name, popen)

    def forget(self, owned: Owned) -> None:
        """The process has exited and been accounted for."""
        owned.wait(0)
        owned.close()
        with contextlib.suppress(ValueError):
            self.processes.remove(owned)

    def cleanup(self) -> list[str]:
        """Stop what still runs (SIGTERM, then SIGKILL), detach what is still mounted; return
        a list of problems (empty when everything was already clean)."""
        problems: list[str] = []
        for owned in reversed(self.processes):
            if owned.alive():
                problems.append(f"{owned.name} (pid {owned.pid}) still running at cleanup")
                owned.signal(signal.SIGTERM)
                if not owned.wait(5):
                    owned.signal(signal.SIGKILL)
                    owned.wait(5)
            elif owned.popen is not None:
                owned.wait(0)
            owned.close()
        self.processes.clear()
        left = sorted(p for p in mountpoints() if p in self.mounts or under(p, self.root))
        for path in left:
            problems.append(f"mount left on {path}; detaching")
            lazy_unmount(path)
        if left:
            still = wait_unmounted(left, 5)
            problems.extend(f"could not detach {p}" for p in still)
        return problems


def under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


# ---------------------------------------------------------------------------------------------
# waiting on several conditions, with one deadline


@dataclass
class Cond:
    """Something to wait for: ``check`` says whether it holds now; ``fd`` (if any) wakes the wait
    when it may have changed; ``drain`` re-arms that fd."""

    name: str
    check: Callable[[], bool]
    fd: int | None = None
    events: int = select.POLLIN
    drain: Callable[[], None] | None = None


def wait_all(
    conds: Iterable[Cond], timeout: float, *, since: float | None = None
) -> dict[str, float]:
    """Wait until every condition holds; return, for each, the seconds from ``since`` (default:
    now) to the moment it was first seen to hold.

    :raise Timeout: some did not hold by the deadline (the message names them).
    """
    start = time.monotonic() if since is None else since
    deadline = time.monotonic() + timeout
    pending = list(conds)
    met: dict[str, float] = {}
    poller = select.poll()
    registered: dict[int, int] = {}
    for c in pending:
        if c.fd is not None:
            registered[c.fd] = registered.get(c.fd, 0) | c.events
    for fd, ev in registered.items():
        poller.register(fd, ev)
    while True:
        for c in list(pending):
            if c.drain is not None:
                c.drain()
        now = time.monotonic()
        for c in list(pending):
            if c.check():
                met[c.name] = now - start
                pending.remove(c)
        # Stop polling fds nobody waits on any more (a pidfd stays readable once it fired).
        wanted = {c.fd for c in pending if c.fd is not None}
        for fd in list(registered):
            if fd not in wanted:
                poller.unregister(fd)
                del registered[fd]
        if not pending:
            return met
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            names = ", ".join(c.name for c in pending)
            raise Timeout(f"not within {timeout:.1f} s: {names}")
        # A condition without an fd is re-checked every 2 ms; the others wake the poll.
        cap = 0.002 if any(c.fd is None for c in pending) else remaining
        poller.poll(min(remaining, cap) * 1000)


def exited(owned: Owned, name: str | None = None) -> Cond:
    return Cond(name or f"exit:{owned.name}", lambda: not owned.alive(), owned.pidfd)


def unmounted(watch: MountWatch, paths: Iterable[str], name: str = "unmounted") -> Cond:
    wanted = set(paths)
    return Cond(name, lambda: not (watch.current() & wanted), watch.fileno(), select.POLLPRI)


def mounted(watch: MountWatch, paths: Iterable[str], name: str = "mounted") -> Cond:
    wanted = set(paths)
    return Cond(name, lambda: wanted <= watch.current(), watch.fileno(), select.POLLPRI)


def file_gone(dirwatch: DirWatch, path: str, name: str = "pid file gone") -> Cond:
    return Cond(name, lambda: not os.path.exists(path), dirwatch.fileno(), drain=dirwatch.drain)


def file_present(dirwatch: DirWatch, path: str, name: str = "pid file") -> Cond:
    def check() -> bool:
        try:
            return os.path.getsize(path) > 0
        except OSError:
            return False

    return Cond(name, check, dirwatch.fileno(), drain=dirwatch.drain)


def wait_unmounted(paths: Sequence[str], timeout: float) -> list[str]:
    """Wait for ``paths`` to leave mountinfo; return those still there at the deadline."""
    with MountWatch() as watch:
        try:
            wait_all([unmounted(watch, paths)], timeout)
        except Timeout:
            return sorted(watch.current() & set(paths))
    return []


def run(
    argv: Sequence[str], *, timeout: float = 120, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run a helper command to completion, failing loudly with its stderr."""
    try:
        done: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{argv[0]} did not finish within {timeout} s") from e
    if done.returncode != 0:
        raise BenchError(
            f"{' '.join(argv[:3])}... failed ({done.returncode}): {done.stderr.strip()}"
        )
    return done


def errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))
