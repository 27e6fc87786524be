"""``--list`` and ``--stop``: the live exports of this machine, from the runtime registry.

Only processes found in our registry (`fuse_disk_export.registry`) are ever signalled, and only
through a pidfd opened before checking that the pid is still the process that registered, so a
recycled pid is never hit.  This module imports psutil and rich; nothing on the path to live
imports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

from fuse_disk_export import logs, mounts, registry
from fuse_disk_export.columns import plain_columns
from fuse_disk_export.errors import FdeError, MountError
from fuse_disk_export.registry import ExportRecord

log = logging.getLogger(__name__)

#: How long ``--stop`` waits for an export to be reverted: a healthy one takes milliseconds.
STOP_TIMEOUT = 30.0

COLUMNS = ("PID", "FORMAT", "SIZE", "MODE", "SINCE", "MOUNT POINT", "IMAGE")


def human_size(size: int | None) -> str:
    """``68719476736`` -> ``"64 GiB"``, ``1536`` -> ``"1.5 KiB"``, as qemu-img writes sizes."""
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            break
        value /= 1024
    return f"{value:.3g} {unit}" if unit != "B" else f"{size} B"


def _since(timestamp: float) -> str:
    """The time of day for today, else the date too: a listing is read by people."""
    when = time.localtime(timestamp)
    today = time.localtime()
    same_day = (when.tm_year, when.tm_yday) == (today.tm_year, today.tm_yday)
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M", when)


def _row(record: ExportRecord) -> tuple[str, ...]:
    return (
        str(record.pid),
        record.format,
        human_size(record.virtual_size),
        "rw" if record.writable else "ro",
        _since(record.since),
        _where(record),
        record.image,
    )


def _where(record: ExportRecord) -> str:
    """The mount point; with ``--mount-fs``, the filesystem's directory, its type and driver."""
    if record.fs_dir:
        return f"{record.fs_dir} ({record.fs_type} by {record.fs_driver})"
    return record.mountpoint


def format_plain(records: Sequence[ExportRecord]) -> str:
    """Aligned columns with a header line, like ps(1); paths last, so nothing follows them."""
    return plain_columns([COLUMNS, *map(_row, records)])


def list_exports(*, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print every live export: a table on a terminal, plain columns otherwise, or JSON."""
    out = out or sys.stdout
    records = registry.live_records()
    if not records and not as_json:
        print("no live exports", file=sys.stderr)
        return 0
    try:
        if as_json:
            out.write(json.dumps([r._asdict() for r in records], indent=2) + "\n")
        elif out.isatty():
            _print_table(records, out)
        else:
            out.write(format_plain(records))
        out.flush()
        if not as_json:
            # Apart from the columns, which scripts parse; --json has them as "warnings".
            for record in records:
                for warning in record.warnings:
                    print(f"fuse-disk-export: warning: {warning}", file=sys.stderr)
    except BrokenPipeError:
        # Read by something like head(1) that has seen enough: not an error.  Python would
        # complain again while flushing at exit, unless stdout goes nowhere from now on.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    return 0


def _print_table(records: Sequence[ExportRecord], out: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in COLUMNS:
        table.add_column(
            name,
            justify="right" if name in ("PID", "SIZE") else "left",
            no_wrap=name not in ("MOUNT POINT", "IMAGE"),
            overflow="fold",
        )
    for record in records:
        table.add_row(*_row(record), style=None if record.writable else "dim")
    Console(file=out).print(table)


@dataclass
class _Stop:
    """One serving process to stop, and what it serves."""

    pid: int
    started: float | None
    mountpoints: list[str]
    pidfd: int = -1


def _lookup(target: str, records: Sequence[ExportRecord]) -> list[ExportRecord]:
    """The registered exports ``target`` (a path or a pid) names; handles a dead mount itself.

    :raise FdeError: ``target`` names nothing we serve.
    """
    if target.isdigit() and not os.path.lexists(target):
        found = [r for r in records if r.pid == int(target)]
        if not found:
            raise FdeError(
                f"pid {target} serves no export: it is not a fuse-disk-export process, or its "
                "revert has begun (see --list)"
            )
        return found
    path = os.path.abspath(target)
    names = [path]
    found = [r for r in records if path in (r.mountpoint, r.image, r.fs_dir)]
    if not found:
        # Only now touch the path (a mount whose server hangs would hang us): a symlink to it?
        real = os.path.realpath(path)
        names += [real] if real != path else []
        found = [r for r in records if real in (r.mountpoint, r.image, r.fs_dir)]
    if found:
        return found
    for name in names:
        entry = mounts.mount_at(name)
        if entry is None:
            continue
        if entry.is_fuse and _cleanup_dead(name):
            return []
        raise MountError(
            f"is a mount point ({entry.fstype} from {entry.source}), but no fuse-disk-export "
            "in the registry serves it",
            path=target,
        )
    raise MountError("is not exported (see --list)", path=target)


def _cleanup_dead(path: str) -> bool:
    """Lazily unmount ``path`` if it is a FUSE mount whose server is gone; say so."""
    if not mounts.is_dead(path):
        return False
    mounts.lazy_unmount(path)
    if mounts.wait_unmounted([path], 5.0):
        raise MountError("is a dead FUSE mount and could not be unmounted", path=path)
    log.warning("%s: was a dead FUSE mount (its server had gone); unmounted it lazily", path)
    return True


def _signal(stop: _Stop) -> bool:
    """Send SIGINT to the process, pinned by a pidfd; False if it is gone already."""
    try:
        stop.pidfd = os.pidfd_open(stop.pid)
    except ProcessLookupError:
        return False
    # Checked after opening the pidfd: from here on the fd names this very process.
    if registry.is_running(stop.pid, stop.started):
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(stop.pidfd, signal.SIGINT)
            return True
    # Exited (a zombie counts), or the pid now belongs to another process: nothing to wait for.
    os.close(stop.pidfd)
    stop.pidfd = -1
    return False


def _wait_exits(stops: Iterable[_Stop], deadline: float) -> list[_Stop]:
    """Wait until every process has exited (a zombie has); return those still running."""
    waiting = {s.pidfd: s for s in stops if s.pidfd >= 0}
    poller = select.poll()
    for fd in waiting:
        poller.register(fd, select.POLLIN)
    while waiting:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for fd, _ in poller.poll(remaining * 1000):
            poller.unregister(fd)
            del waiting[fd]
    return list(waiting.values())


def stop(targets: Sequence[str], *, timeout: float = STOP_TIMEOUT, quiet: bool = False) -> int:
    """Revert the exports serving each target (an exported path or a registered pid).

    Sends SIGINT to each serving process once, waits until it has exited and its mounts are gone,
    and lazily unmounts a dead FUSE mount left by a crash.  Returns 0 when every target was
    handled, else 1 (each failure is logged as one line).
    """
    records = registry.live_records()
    stops: dict[int, _Stop] = {}
    status = 0
    for target in targets:
        try:
            found = _lookup(target, records)
        except FdeError as e:
            log.error("%s", e)
            status = 1
            continue
        for record in found:
            # Stopping one export of an invocation stops all of them: they share one process.
            stops.setdefault(
                record.pid,
                _Stop(
                    record.pid,
                    record.started,
                    [
                        m
                        for r in records
                        if r.pid == record.pid
                        for m in (r.mountpoint, r.fs_dir)
                        if m
                    ],
                ),
            )
    try:
        for s in stops.values():
            if not _signal(s):
                log.info("pid %d had already exited", s.pid)
        deadline = time.monotonic() + timeout
        stuck = _wait_exits(stops.values(), deadline)
        for s in stuck:
            log.error("pid %d did not stop within %gs", s.pid, timeout)
            status = 1
        stopped = [s for s in stops.values() if s not in stuck]
        paths = [p for s in stopped for p in s.mountpoints]
        left = mounts.wait_unmounted(paths, max(0.0, deadline - time.monotonic()))
        for path in left:
            try:
                if not _cleanup_dead(path):
                    raise MountError("is still mounted after its server exited", path=path)
            except FdeError as e:
                log.error("%s", e)
                status = 1
        for s in stopped:
            done = [p for p in s.mountpoints if p not in left]
            if done and not quiet:
                logs.say(f"Reverted {', '.join(done)} (pid {s.pid})")
    finally:
        for s in stops.values():
            if s.pidfd >= 0:
                os.close(s.pidfd)
    return status
