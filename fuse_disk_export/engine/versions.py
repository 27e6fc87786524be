"""What differs between the QEMU versions we run on (6.0 and later), in one place.

QEMU's QMP schema (``query-qmp-schema``) shows features that come and go; the differences here are
behaviour behind an unchanged schema, so they are version gates, each with its evidence.  A gate
errs on the safe side: a version not known to be fixed is treated as affected.
"""

from __future__ import annotations

QemuVersion = tuple[int, int, int]

#: First release whose FUSE export copies a write's data out of its one request buffer before it
#: can read the next request.  Every release up to at least 10.2 hands ``exp->fuse_buf`` straight
#: to ``blk_pwrite()`` in ``fuse_write()``, so a second write in flight overwrites the first one's
#: data (fio libaio QD16 verify: 15 bad blocks in 64 MiB on 7.2 and on 10.0.2).  The fix, "fuse:
#: Copy write buffer content before polling" (patch 1 of Hanna Czenczek's "export/fuse: Use
#: coroutines and multi-threading", v4 posted 2026-02-18), reached upstream master after that
#: posting, and no release tag known to us contains it (10.2.0 predates it).  None: the guard is
#: on for every version until a release is named here with its commit.
FUSE_WRITE_BUFFER_FIXED: QemuVersion | None = None

#: First release whose FUSE export turns ``fallocate(FALLOC_FL_PUNCH_HOLE)`` into a write of zeroes
#: (``BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK``) instead of a discard, which formats without
#: discard support (and qcow2 ranges short of whole clusters) ignore while reporting success:
#: upstream commit 1703eb1c27a6 "block/fuse: Let PUNCH_HOLE write zeroes" (QEMU issue #1507,
#: merged March 2023), first released in 8.0.0; QEMU's iotest 308 checks it ("write zeroes by
#: unmapping").  Measured: qemu-img convert -n into an export differs from its source for seven
#: formats on 7.2.22 and for none on 10.0.2.
PUNCH_HOLE_WRITES_ZEROES: QemuVersion = (8, 0, 0)


def needs_write_guard(version: QemuVersion) -> bool:
    """Whether two writes in flight on one FUSE export can store each other's data."""
    return FUSE_WRITE_BUFFER_FIXED is None or version < FUSE_WRITE_BUFFER_FIXED


def punch_hole_may_keep_data(version: QemuVersion) -> bool:
    """Whether a punched hole in a writable FUSE export may leave the old data in place."""
    return version < PUNCH_HOLE_WRITES_ZEROES


def describe(version: QemuVersion) -> str:
    return ".".join(map(str, version))
