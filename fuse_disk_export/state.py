"""The runtime registry of live exports: one JSON file per running fuse-disk-export.

It lives under ``$XDG_RUNTIME_DIR/fuse-disk-export`` (or ``/run/fuse-disk-export`` for root
without one) so that ``--list`` and ``--stop`` can find exports, and a refusal to mount over a live
export can name the pid serving it.
Entries whose process is gone are ignored and removed when read.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ExportRecord:
    """One live export, as ``--list`` shows it."""

    image: str
    format: str
    virtual_size: int | None
    mountpoint: str
    writable: bool
    pid: int
    daemon_pid: int
    since: float


def registry_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "fuse-disk-export"
    if os.geteuid() == 0:
        return Path("/run/fuse-disk-export")
    return Path(tempfile.gettempdir()) / f"fuse-disk-export-{os.geteuid()}"


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` so that readers see either nothing or all of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _entry_path(pid: int) -> Path:
    return registry_dir() / f"{pid}.json"


def register(records: list[ExportRecord]) -> None:
    """Record this process's live exports."""
    directory = registry_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pid = records[0].pid if records else os.getpid()
    write_atomically(_entry_path(pid), json.dumps([asdict(r) for r in records]), 0o600)


def unregister(pid: int | None = None) -> None:
    with contextlib.suppress(OSError):
        _entry_path(os.getpid() if pid is None else pid).unlink()


def _alive(pid: int) -> bool:
    # A zombie still answers kill -0: look at its state instead.
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return False
    return False


def live_records() -> list[ExportRecord]:
    """Every export whose serving process still runs; stale entries are removed."""
    directory = registry_dir()
    records: list[ExportRecord] = []
    try:
        files = sorted(directory.glob("*.json"))
    except OSError:
        return records
    for file in files:
        try:
            pid = int(file.stem)
        except ValueError:
            continue
        if not _alive(pid):
            with contextlib.suppress(OSError):
                file.unlink()
            continue
        try:
            raw = json.loads(file.read_text())
            records.extend(ExportRecord(**item) for item in raw)
        except (OSError, ValueError, TypeError):
            continue
    return records


def find_by_mountpoint(path: str) -> ExportRecord | None:
    for record in live_records():
        if record.mountpoint == path:
            return record
    return None
