"""What differs between the QEMU versions we run on (6.0 and later), in one place.

QEMU's QMP schema (``query-qmp-schema``, `qemuinfo`) shows features that come and go; most
differences here are behaviour behind an unchanged schema, so they are version gates, each with
its evidence.  A gate errs on the safe side: a version not known to be fixed is treated as
affected.
"""

from __future__ import annotations

QemuVersion = tuple[int, int, int]

# Concurrent writes: every release up to at least 10.2 hands ``exp->fuse_buf`` straight to
# ``blk_pwrite()`` in ``fuse_write()``, so a second write in flight overwrites the first one's data
# (fio libaio QD16 verify: 15 bad blocks in 64 MiB on 7.2 and on 10.0.2).  The fix, "fuse: Copy
# write buffer content before polling", is patch 1 of Hanna Czenczek's series "export/fuse: Use
# coroutines and multi-threading" (v4 posted 2026-02-18, pulled for upstream 2026-03-10), whose
# later patches make an export's ``iothread`` a list.  That schema change is what we look for
# (`qemuinfo.QemuInfo.multiqueue_fuse`): a feature probe rather than a version, because the first
# release with it is not established here (the pull predates 11.0.0, 2026-04-22; no release tag
# was checked), and a distribution may carry the series on an older base.  Measured: 11.1.3 has
# the list and 0 bad blocks without the guard (tests/integration/test_qemu_versions.py).

#: First release whose FUSE export turns ``fallocate(FALLOC_FL_PUNCH_HOLE)`` into a write of zeroes
#: (``BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK``) instead of a discard, which formats without
#: discard support (and qcow2 ranges short of whole clusters) ignore while reporting success:
#: upstream commit 1703eb1c27a6 "block/fuse: Let PUNCH_HOLE write zeroes" (QEMU issue #1507,
#: merged March 2023), first released in 8.0.0; QEMU's iotest 308 checks it ("write zeroes by
#: unmapping").  Measured: qemu-img convert -n into an export differs from its source for seven
#: formats on 7.2.22 and for none on 10.0.2.
PUNCH_HOLE_WRITES_ZEROES: QemuVersion = (8, 0, 0)


#: First release seen completing an ``aio=io_uring`` read that the end of a file cuts short, as
#: in a file whose size is not a multiple of 512: 7.2.22 and 10.0.2 never complete it, and the
#: reader, the mount and the daemon hang for good (SIGTERM included).  Reading the last bytes of a
#: raw file of 3458752 bytes does it, and so does opening a vmdk (its text descriptor); 11.1.3
#: reads both (measured, tests/integration/test_access.py).  The upstream change is not known to
#: us, so every release before the one measured is taken as hanging: the safe side is the thread
#: pool.
IO_URING_SHORT_READS: QemuVersion = (11, 1, 3)


def needs_write_guard(multiqueue_fuse: bool) -> bool:
    """Whether two writes in flight on one FUSE export can store each other's data: unless the
    QEMU has the fix, known by the multi-queue FUSE export that came with it (see above)."""
    return not multiqueue_fuse


def io_uring_short_read_may_hang(version: QemuVersion | None) -> bool:
    """Whether a short read through ``aio=io_uring`` may hang this QEMU (unknown: yes)."""
    return version is None or version < IO_URING_SHORT_READS


def punch_hole_may_keep_data(version: QemuVersion) -> bool:
    """Whether a punched hole in a writable FUSE export may leave the old data in place."""
    return version < PUNCH_HOLE_WRITES_ZEROES


def from_greeting(greeting: object) -> QemuVersion | None:
    """The version a QMP greeting names (``{"QMP": {"version": {"qemu": {...}}}}``), or None."""
    qmp = greeting.get("QMP") if isinstance(greeting, dict) else None
    version = qmp.get("version") if isinstance(qmp, dict) else None
    qemu = version.get("qemu") if isinstance(version, dict) else None
    if not isinstance(qemu, dict):
        return None
    try:
        return (int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"]))
    except (KeyError, TypeError, ValueError):
        return None


def describe(version: QemuVersion) -> str:
    return ".".join(map(str, version))
