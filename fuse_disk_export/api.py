"""The Python API: a disk image's raw view for the duration of a ``with`` block.

    from fuse_disk_export import exported

    with exported("disk.qcow2", read_only=True) as raw:    # pathlib.Path of the raw view, live
        subprocess.run(["parted", "-s", raw, "print"], check=True)
    # reverted here, also when the block raised

The same engine as the command line, without its process-wide parts: no signal handlers are
installed, no pid file, no registry entry (``--list`` does not show these exports), nothing is
printed or asked.  No asyncio is used either, so it works alike from plain code and from a
coroutine (it blocks for the few milliseconds the setup takes).  The qemu-storage-daemon it starts
follows the calling process: should that die, even by SIGKILL, the daemon unmounts and exits —
tied, as Linux ties a parent-death signal, to the thread that entered the block.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from fuse_disk_export.engine.graph import AllowOther, Backing
from fuse_disk_export.options import Aio, Cache, DetectZeroes, Discard, Options

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def exported_many(
    images: Sequence[PathLike],
    *,
    read_only: bool = False,
    format: str | None = None,
    mountpoint_dir: PathLike | None = None,
    partition: int | None = None,
    snapshot: bool = False,
    load_snapshot: str | None = None,
    backing: Backing = "safe",
    passphrase: str | None = None,
    passphrase_file: PathLike | None = None,
    allow_other: AllowOther = "auto",
    discard: Discard = "unmap",
    detect_zeroes: DetectZeroes = "off",
    cache: Cache = "writeback",
    aio: Aio | None = None,
    nbd_socket: PathLike | None = None,
    write_guard: bool = True,
) -> Iterator[list[Path]]:
    """Export every image of ``images`` (one qemu-storage-daemon, all or nothing) for the block;
    yield the paths of their raw views, in order.  The options are the command line's.

    :raise FdeError: (and its subclasses, `ImageError`, `QemuError`, ...) nothing could be
        exported; nothing is left of the attempt.
    """
    options = Options(
        images=tuple(os.fspath(i) for i in images),
        read_only=read_only,
        format=format,
        backing=backing,
        allow_other=allow_other,
        mountpoint_dir=os.fspath(mountpoint_dir) if mountpoint_dir is not None else None,
        partition=partition,
        nbd_socket=os.fspath(nbd_socket) if nbd_socket is not None else None,
        snapshot=snapshot,
        load_snapshot=load_snapshot,
        passphrase=passphrase,
        passphrase_file=os.fspath(passphrase_file) if passphrase_file is not None else None,
        discard=discard,
        detect_zeroes=detect_zeroes,
        cache=cache,
        aio=aio,
        write_guard=write_guard,
    )
    yield from _exported(options)


def _exported(options: Options) -> Iterator[list[Path]]:
    from fuse_disk_export.export import live
    from fuse_disk_export.request import build_request

    request = build_request(options)
    with live(request, watch_signals=False, register=False):
        yield [Path(r.spec.mountpoint) for r in request.images]


@contextlib.contextmanager
def exported(
    image: PathLike,
    *,
    mountpoint: PathLike | None = None,
    read_only: bool = False,
    format: str | None = None,
    partition: int | None = None,
    snapshot: bool = False,
    load_snapshot: str | None = None,
    backing: Backing = "safe",
    passphrase: str | None = None,
    passphrase_file: PathLike | None = None,
    allow_other: AllowOther = "auto",
    discard: Discard = "unmap",
    detect_zeroes: DetectZeroes = "off",
    cache: Cache = "writeback",
    aio: Aio | None = None,
    nbd_socket: PathLike | None = None,
    write_guard: bool = True,
) -> Iterator[Path]:
    """Export ``image`` for the block; yield the path of its raw view (the image's own path,
    or ``mountpoint``).  The options are the command line's (``mountpoint`` is ``-m``).

    :raise FdeError: (and its subclasses) nothing could be exported; nothing is left of it.
    """
    options = Options(
        images=(os.fspath(image),),
        read_only=read_only,
        format=format,
        backing=backing,
        allow_other=allow_other,
        mountpoint=os.fspath(mountpoint) if mountpoint is not None else None,
        partition=partition,
        nbd_socket=os.fspath(nbd_socket) if nbd_socket is not None else None,
        snapshot=snapshot,
        load_snapshot=load_snapshot,
        passphrase=passphrase,
        passphrase_file=os.fspath(passphrase_file) if passphrase_file is not None else None,
        discard=discard,
        detect_zeroes=detect_zeroes,
        cache=cache,
        aio=aio,
        write_guard=write_guard,
    )
    for paths in _exported(options):
        yield paths[0]
