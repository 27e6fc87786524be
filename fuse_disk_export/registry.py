"""The runtime registry of live exports: one JSON file per running fuse-disk-export.

It lives under ``$XDG_RUNTIME_DIR/fuse-disk-export`` (or ``/run/fuse-disk-export`` for root
without one) so that ``--list`` and ``--stop`` can find exports, and a refusal to mount over a live
export can name the pid serving it.
Entries whose process is gone (or a zombie, or a new process that reuses the pid) are ignored and
removed when read.  Writing is on the path to live and uses the standard library only; reading
checks processes with psutil, imported there.
"""

import contextlib
import json
import os
from typing import NamedTuple


class ExportRecord(NamedTuple):
    """One live export, as ``--list`` shows it."""

    image: str
    format: str
    virtual_size: int | None
    mountpoint: str
    writable: bool
    pid: int
    daemon_pid: int
    since: float
    #: When process ``pid`` started (seconds since the epoch, as psutil's ``create_time``), so
    #: that a later process with the same pid is not taken for it.
    started: float | None = None
    #: What went wrong or is risky about this export, as warned when it was set up.
    warnings: tuple[str, ...] = ()
    #: ``--mount-fs``: where the filesystem inside is mounted, its type, and its driver.
    fs_dir: str | None = None
    fs_type: str | None = None
    fs_driver: str | None = None
    #: The QEMU that serves it and what was chosen for it (`choices.describe`).
    qemu: dict[str, object] | None = None


# Plain os.path and os.open here, not pathlib and tempfile: this is on the path to live, where
# their imports cost more than everything this module does (docs/archive/, rounds 2-3).


def registry_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "fuse-disk-export")
    if os.geteuid() == 0:
        return "/run/fuse-disk-export"
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"fuse-disk-export-{os.geteuid()}")


def write_atomically(path: str, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` so that readers see either nothing or all of it."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _entry_path(pid: int) -> str:
    return os.path.join(registry_dir(), f"{pid}.json")


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started, computed as psutil's ``create_time`` does; None if gone.

    Read straight from /proc because this runs on the path to live, where importing psutil would
    cost more than everything else this module does (docs/archive/, rounds 2-3).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open("/proc/stat", "rb") as f:
            btime = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
        # Field 22, starttime, counted after the command name, which may contain anything.
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return ticks / os.sysconf("SC_CLK_TCK") + btime


def register(records: list[ExportRecord]) -> None:
    """Record this process's live exports."""
    os.makedirs(registry_dir(), mode=0o700, exist_ok=True)
    pid = records[0].pid if records else os.getpid()
    started = process_start_time(pid)
    records = [r if r.started is not None else r._replace(started=started) for r in records]
    write_atomically(_entry_path(pid), json.dumps([r._asdict() for r in records]), 0o600)


def unregister(pid: int | None = None) -> None:
    with contextlib.suppress(OSError):
        os.unlink(_entry_path(os.getpid() if pid is None else pid))


# How far psutil's create_time may drift from the one recorded: both add the boot time, which the
# kernel derives from the wall clock.  Taking a new process for ours would need it to reuse the
# pid within that second, after ours had gone live, crashed, and the pids wrapped around.
_START_TOLERANCE = 1.0


def is_running(pid: int, started: float | None = None) -> bool:
    """Whether ``pid`` runs (a zombie has exited) and, given ``started``, is the one recorded."""
    import psutil  # type: ignore[import-untyped]

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < _START_TOLERANCE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _read_entry(file: str) -> list[ExportRecord]:
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
        return [
            ExportRecord(**{**item, "warnings": tuple(item.get("warnings", ()))}) for item in raw
        ]
    except (OSError, ValueError, TypeError):
        return []


def live_records() -> list[ExportRecord]:
    """Every export whose serving process still runs; stale entries are removed."""
    records: list[ExportRecord] = []
    directory = registry_dir()
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return records
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext != ".json" or not stem.isdigit():
            continue
        file = os.path.join(directory, name)
        entry = _read_entry(file)
        if not entry:
            continue  # gone meanwhile, or not ours to judge (entries are written atomically)
        if not is_running(int(stem), entry[0].started):
            with contextlib.suppress(OSError):
                os.unlink(file)
            continue
        records.extend(entry)
    return sorted(records, key=lambda r: r.since)


def find_by_mountpoint(path: str) -> ExportRecord | None:
    for record in live_records():
        if record.mountpoint == path:
            return record
    return None
