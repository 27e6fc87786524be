"""What the tool chooses for the QEMU at hand: pure, so that each choice is tested in isolation.

The table "What the tool chooses on each QEMU" in docs/usage.md is this module in words, and
docs/performance.md holds the measurements behind each number.
"""

from __future__ import annotations

from fuse_disk_export.engine import versions
from fuse_disk_export.engine.graph import BlockGraph, Tuning
from fuse_disk_export.engine.qemuinfo import QemuInfo
from fuse_disk_export.errors import UsageError

#: I/O threads of a multi-queue FUSE export when the user names none: random 4 KiB reads at QD16
#: from one process grew with each thread up to 4 on 11.1.3, on 2 vCPUs (docs/performance.md).
DEFAULT_IOTHREADS = 4


def for_qemu(
    tuning: Tuning,
    info: QemuInfo | None,
    *,
    iothreads: int | None,
    single_queue: str | None = None,
) -> Tuning:
    """``tuning`` as the user asked, with what this QEMU needs and allows filled in.

    ``info`` None (the QEMU could not be asked) plans for the oldest QEMU: the guards on, no
    io_uring near a vmdk, no iothreads.  ``iothreads`` None: the default for this QEMU.
    ``single_queue``: an image that must be written from one thread
    (`graph.single_queue_image`).

    :raise UsageError: ``iothreads`` asks for more than this QEMU can do.
    """
    version = info.version if info is not None else None
    multiqueue = info is not None and info.multiqueue_fuse
    if iothreads is None:
        # One iothread without the multi-queue form only moves the work out of the main loop.
        several = multiqueue and tuning.nbd_socket is None and single_queue is None
        iothreads = DEFAULT_IOTHREADS if several else 0
    elif iothreads > 1 and single_queue is not None:
        raise UsageError(
            f"--iothreads {iothreads}: QEMU's qed driver aborts when several threads write it "
            f"(11.1.3 measured); use --iothreads 1 or 0, or -r",
            path=single_queue,
        )
    elif iothreads > 1 and not multiqueue:
        raise UsageError(
            f"--iothreads {iothreads}: QEMU {_name(version)} serves a FUSE export from one "
            "thread (it has no multi-queue FUSE exports; 11.1.3 has them); use --iothreads 1 or 0"
        )
    elif iothreads and tuning.nbd_socket is not None:
        raise UsageError("--iothreads cannot be combined with --nbd-socket")
    return tuning._replace(
        write_guard=tuning.write_guard and versions.needs_write_guard(multiqueue),
        hole_guard=version is None or versions.punch_hole_may_keep_data(version),
        io_uring_short_reads=not versions.io_uring_short_read_may_hang(version),
        iothreads=iothreads,
        multiqueue=multiqueue,
    )


def describe(graph: BlockGraph, tuning: Tuning, info: QemuInfo | None) -> dict[str, object]:
    """The choices, as ``--list --json`` and ``-v`` show them."""
    return {
        "version": _name(info.version if info is not None else None),
        "write_guard": tuning.write_guard,
        "hole_guard": tuning.hole_guard,
        "aio": tuning.aio or ("io_uring" if graph.default_io_uring else "threads"),
        "iothreads": tuning.iothreads,
        "multiqueue": tuning.multiqueue,
    }


def _name(version: versions.QemuVersion | None) -> str:
    return versions.describe(version) if version is not None else "unknown"
