"""Make writable FUSE exports safe on the QEMU at hand, or say what is not — before live."""

from __future__ import annotations

import logging
import os
import threading

from fuse_disk_export import mounts
from fuse_disk_export.engine import versions
from fuse_disk_export.engine.graph import BlockGraph, ExportPlan

log = logging.getLogger(__name__)


def _arm(mountpoint: str) -> bool:
    # Closing a descriptor sends the kernel's FUSE flush, and QEMU flushes the export's nodes:
    # the event that arms the guard's filter (graph.py) comes first.  That flush's error is
    # close's, and is taken for "not armed" (a warning too many, never one too few); it writes
    # to disk only what opening the image wrote.
    try:
        os.close(os.open(mountpoint, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        log.debug("%s: cannot arm the punched-hole guard: %s", mountpoint, e.strerror)
        return False
    log.debug("%s: punched holes refused (EOPNOTSUPP): callers write zeroes", mountpoint)
    return True


def _arm_all(mountpoints: list[str], workers: int = 8) -> set[str]:
    """Arm every guard; return the mount points that could not be armed.  Each is two FUSE
    round trips (open, flush; the release is not waited for): with many exports, several run at
    once."""
    failed: list[str] = []

    def arm(share: list[str]) -> None:
        missed = [m for m in share if not _arm(m)]
        failed.extend(missed)

    if len(mountpoints) <= 2:
        arm(mountpoints)
        return set(failed)
    threads = [
        threading.Thread(target=arm, args=(mountpoints[i::workers],)) for i in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return set(failed)


def protect(graph: BlockGraph, version: versions.QemuVersion) -> None:
    """Serialize the writes of every writable export where QEMU can mix up concurrent ones, and
    warn (once per export) about what cannot be made safe: the warnings name the export's path."""
    writable = [e for e in graph.exports if e.writable]
    if not writable:
        return
    # Serialized first, then armed: done at once, in threads, the two took longer (the threads'
    # requests and this thread's writes competed for the interpreter lock).
    _serialize(graph, writable, version)
    unarmed = _arm_all([e.mountpoint for e in writable if e.hole_guard])
    if versions.punch_hole_may_keep_data(version):
        for export in writable:
            if export.hole_guard and export.mountpoint not in unarmed:
                continue
            log.warning(
                "%s: QEMU %s turns a punched hole into an advisory discard, which may keep the "
                "old data: tools that zero by punching holes (qemu-img convert -n, nbdcopy, "
                "fallocate -p) can leave wrong data without an error; QEMU 8.0 or later fixes "
                "this (Debian 12: bookworm-backports)",
                export.mountpoint,
                versions.describe(version),
            )


def _serialize(
    graph: BlockGraph, writable: list[ExportPlan], version: versions.QemuVersion
) -> None:
    if not graph.write_guard:
        # This QEMU has the fix, or the user said so (--no-write-guard).
        log.debug("write guard off on QEMU %s", versions.describe(version))
        return
    # Two writes in flight can store each other's data: keep them one at a time.
    table = mounts.topmost(mounts.read_mounts())
    for export in writable:
        problem = mounts.limit_background_requests(table.get(export.mountpoint))
        if problem:
            log.warning(
                "%s: cannot serialize writes (%s); with QEMU %s, concurrent AIO or O_DIRECT "
                "writes through the export may be stored wrongly",
                export.mountpoint,
                problem,
                versions.describe(version),
            )
        else:
            log.debug("%s: writes serialized (max_background=1)", export.mountpoint)
