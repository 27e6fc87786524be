"""What is mounted where, read from /proc/self/mountinfo, and how to get rid of a dead FUSE mount.

A path that is exported already reads as raw, and stat() on a dead FUSE mount fails with ENOTCONN,
so every decision about a path is taken from mountinfo before the path itself is touched.
"""

import contextlib
import ctypes
import errno
import os
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal, NamedTuple

from fuse_disk_export.errors import RequirementError

MOUNTINFO = "/proc/self/mountinfo"


class MountEntry(NamedTuple):
    """One line of mountinfo, reduced to what we decide on."""

    mount_id: int
    mount_point: str
    fstype: str
    source: str
    #: "major:minor" of the mounted file system (for FUSE, names the connection).
    device: str = ""

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")


def _unescape(field: str) -> str:
    # The kernel escapes only space, tab, newline and backslash, as three octal digits.
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse the text of a mountinfo file (see proc(5)); malformed lines are skipped."""
    entries: list[MountEntry] = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split(" ")
        rest = tail.split(" ")
        if not sep or len(fields) < 5 or len(rest) < 2:
            continue
        try:
            mount_id = int(fields[0])
        except ValueError:
            continue
        entries.append(
            MountEntry(
                mount_id, _unescape(fields[4]), _unescape(rest[0]), _unescape(rest[1]), fields[2]
            )
        )
    return entries


_held: list[list[MountEntry]] = []


def read_mounts() -> list[MountEntry]:
    """This process's mount table (inside `one_reading`, the one read when it began)."""
    if _held:
        return _held[-1]
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


@contextlib.contextmanager
def one_reading() -> Iterator[None]:
    """Within the block, the mount table is read once: for inspecting many paths (128 images
    each checked for a mount read it 128 times).  Not for waiting on a mount to change."""
    _held.append(read_mounts())
    try:
        yield
    finally:
        _held.pop()


#: The kernel's own filesystems: their files describe the system (``/proc/self/environ``), they
#: hold no disk image.
KERNEL_FILESYSTEMS = frozenset(
    {
        "proc", "sysfs", "debugfs", "tracefs", "securityfs", "configfs", "cgroup", "cgroup2",
        "bpf", "efivarfs", "pstore", "devpts", "fusectl", "binfmt_misc", "mqueue", "hugetlbfs",
    }
)  # fmt: skip


def filesystem_of(path: str, table: list[MountEntry] | None = None) -> str | None:
    """The type of the filesystem ``path`` (absolute, symlinks resolved) lies on."""
    best: MountEntry | None = None
    for entry in read_mounts() if table is None else table:
        root = entry.mount_point.rstrip("/") + "/"
        if (path == entry.mount_point or path.startswith(root)) and (
            best is None or len(entry.mount_point) >= len(best.mount_point)
        ):
            best = entry
    return best.fstype if best is not None else None


def _identity(entry: MountEntry) -> tuple[int, str, str, str]:
    return entry.mount_id, entry.device, entry.fstype, entry.source


def where_now(
    recorded: Sequence[MountEntry], table: list[MountEntry] | None = None
) -> list[MountEntry | None]:
    """Each mount of ``recorded`` as it is now, wherever it is (None: gone), in one pass over the
    table: a folder above it renamed (``mv``) takes the mount along, to another path.  The same
    mount ID, device, type and source.  Once it is gone, the kernel gives its ID and device to
    the next mounts at once: a FUSE mount found after its server has exited is another's if a
    process serves it (`served_connections`)."""
    now = {_identity(e): e for e in (read_mounts() if table is None else table)}
    return [now.get(_identity(r)) for r in recorded]


def same_mount(entry: MountEntry, table: list[MountEntry] | None = None) -> MountEntry | None:
    """`where_now` of one mount."""
    return where_now([entry], table)[0]


def mount_at(path: str, mounts: list[MountEntry] | None = None) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path`` (absolute), if any."""
    found = None
    for entry in read_mounts() if mounts is None else mounts:
        if entry.mount_point == path:
            found = entry
    return found


FuseState = Literal["live", "dead", "unresponsive"]

_AT_FDCWD = -100
_AT_STATX_FORCE_SYNC = 0x2000
_STATX_BASIC_STATS = 0x7FF


def _getattr_from_server(path: str) -> int:
    """stat ``path`` bypassing the kernel's attribute cache; 0 or the errno.

    A FUSE server answers getattr with a validity period (QEMU: one second), during which plain
    stat() succeeds from the cache even after the server has died.  statx(AT_STATX_FORCE_SYNC)
    always asks the server.
    """
    statx = getattr(ctypes.CDLL(None, use_errno=True), "statx", None)
    if statx is None:  # a C library without statx: fall back to the cached answer
        try:
            os.stat(path)
        except OSError as e:
            return e.errno or errno.EIO
        return 0
    buf = ctypes.create_string_buffer(256)  # struct statx is 256 bytes
    flags = _AT_STATX_FORCE_SYNC
    if statx(_AT_FDCWD, os.fsencode(path), flags, _STATX_BASIC_STATS, buf) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


def fuse_state(path: str, timeout: float = 1.0) -> FuseState:
    """Whether the FUSE server behind ``path`` answers ("live"), is gone ("dead": ENOTCONN), or
    does not answer within ``timeout`` seconds ("unresponsive": stopped, or hung).

    The request is made from a daemon thread, so that a server that never answers cannot hang us;
    the thread ends when the server answers, dies, or this process exits.
    """
    result: list[int] = []
    worker = threading.Thread(
        target=lambda: result.append(_getattr_from_server(path)), daemon=True, name="fuse-stat"
    )
    worker.start()
    worker.join(timeout)
    if not result:
        return "unresponsive"
    return "dead" if result[0] == errno.ENOTCONN else "live"


def is_dead(path: str, timeout: float = 1.0) -> bool:
    """Whether ``path`` is a FUSE mount whose server is gone (the kernel answers ENOTCONN)."""
    return fuse_state(path, timeout) == "dead"


def connection_id(entry: MountEntry) -> int | None:
    # fdinfo prints the connection as the kernel's dev_t: major << 20 | minor.
    major, sep, minor = entry.device.partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        return None
    return int(major) << 20 | int(minor)


def _fuse_servers() -> Iterator[tuple[int, int]]:
    """(pid, FUSE connection) for each /dev/fuse descriptor of the processes we can look at.

    Read from /proc/PID/fdinfo (its ``fuse_connection`` line, Linux 6.x); nothing where the kernel
    does not say.
    """
    for pid_dir in os.scandir("/proc"):
        if not pid_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid_dir.name}/fd"):
                with contextlib.suppress(OSError, ValueError):
                    if os.readlink(fd.path) != "/dev/fuse":
                        continue
                    with open(f"/proc/{pid_dir.name}/fdinfo/{fd.name}", encoding="ascii") as f:
                        for line in f:
                            key, _, value = line.partition(":")
                            if key == "fuse_connection":
                                yield int(pid_dir.name), int(value)


def fuse_server_pids(entry: MountEntry) -> list[int]:
    """The processes holding the /dev/fuse connection that serves ``entry``, where we can tell
    (`_fuse_servers`): empty also when nobody serves the mount."""
    wanted = connection_id(entry)
    if not entry.is_fuse or wanted is None:
        return []
    return sorted({pid for pid, connection in _fuse_servers() if connection == wanted})


def served_connections() -> set[int]:
    """The FUSE connections (`connection_id`) that a process we can look at still serves."""
    return {connection for _, connection in _fuse_servers()}


def loop_devices_on(paths: Iterable[str]) -> dict[str, list[str]]:
    """The loop devices (``/dev/loopN``) whose backing file is one of ``paths``, by path."""
    wanted = set(paths)
    found: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        for device in os.scandir("/sys/block"):
            if not device.name.startswith("loop"):
                continue
            try:  # only a bound loop device has it
                with open(f"{device.path}/loop/backing_file", encoding="utf-8") as f:
                    backing = f.read().removesuffix("\n")
            except (OSError, UnicodeDecodeError):
                continue
            if backing in wanted:
                found.setdefault(backing, []).append(f"/dev/{device.name}")
    return found


def process_name(pid: int) -> str | None:
    """The program process ``pid`` runs (base name of its argv[0]), if it still runs."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0]
        if argv0:
            return os.path.basename(os.fsdecode(argv0))
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None  # a kernel thread, or argv rewritten to nothing
    except OSError:
        return None


#: Where libfuse looks for fusermount3 before PATH (its FUSERMOUNT_DIR; Debian's fuse3), so
#: QEMU mounts without root even where PATH lacks it.
FUSERMOUNT = "/usr/bin/fusermount3"


def fusermount() -> str | None:
    """The fusermount3 that libfuse would run, or None."""
    if os.access(FUSERMOUNT, os.X_OK):
        return FUSERMOUNT
    return shutil.which("fusermount3") or shutil.which("fusermount")


def lazy_unmount(path: str) -> None:
    """Detach the mount on ``path`` even while files on it are open (``fusermount3 -u -z``)."""
    tool = fusermount()
    if tool is None:
        raise RequirementError("fusermount3 not found (Debian package fuse3)", path=path)
    subprocess.run(
        [tool, "-u", "-z", "-q", "--", path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


def wait_unmounted(paths: Iterable[str], timeout: float) -> list[str]:
    """Wait until none of ``paths`` is a mount point; return those still mounted at the deadline.

    The kernel flags mountinfo with POLLPRI whenever the mount table changes, so this sleeps until
    something happens rather than polling on a timer.
    """
    wanted = set(paths)
    deadline = time.monotonic() + timeout
    with open(MOUNTINFO, "rb") as f:
        poller = select.poll()
        poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
        while True:
            f.seek(0)
            text = f.read().decode("utf-8", "surrogateescape")
            left = sorted({e.mount_point for e in parse_mountinfo(text)} & wanted)
            remaining = deadline - time.monotonic()
            if not left or remaining <= 0:
                return left
            poller.poll(remaining * 1000)


FUSECTL = "/sys/fs/fuse/connections"


def topmost(mounts: list[MountEntry]) -> dict[str, MountEntry]:
    """The topmost mount of each mount point in ``mounts``: for looking up many paths at once."""
    return {entry.mount_point: entry for entry in mounts}


def limit_background_requests(entry: MountEntry | None) -> str | None:
    """Let the kernel have at most one background request of FUSE mount ``entry`` in flight.

    QEMU before 10.1 serves every FUSE request from one buffer that a nested request overwrites,
    so two writes in flight at once (AIO or O_DIRECT writers) can store each other's data.  The
    kernel sends writes of one file one at a time except background ones; limiting those to one
    closes the gap.  Returns None on success, else why it could not be done.
    """
    connection = connection_id(entry) if entry is not None else None
    if connection is None:
        return "its FUSE connection cannot be found"
    try:
        try:
            _limit(connection)
        except FileNotFoundError:
            if os.geteuid() != 0:
                raise
            # systemd mounts fusectl at boot; a container often has not.
            subprocess.run(
                ["mount", "-t", "fusectl", "fusectl", FUSECTL],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            _limit(connection)
    except OSError as e:
        return f"{FUSECTL}/{connection}: {e.strerror}"
    return None


def _limit(connection: int) -> None:
    for knob in ("max_background", "congestion_threshold"):
        fd = os.open(f"{FUSECTL}/{connection}/{knob}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)
