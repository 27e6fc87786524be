"""The Python API: a disk image's raw view for the duration of a ``with`` block.

    from fuse_disk_export import exported

    with exported("disk.qcow2", read_only=True) as raw:    # pathlib.Path of the raw view, live
        subprocess.run(["parted", "-s", raw, "print"], check=True)
    # reverted here, also when the block raised

The same engine as the command line, without its process-wide parts: no signal handlers are
installed, no pid file, no registry entry (``--list`` does not show these exports), nothing is
printed or asked.  It works alike from plain code and from a coroutine (it blocks for the few
milliseconds the setup takes).  The qemu-storage-daemon it starts
follows the calling process: should that die, even by SIGKILL, the daemon unmounts and exits —
tied, as Linux ties a parent-death signal, to the thread that entered the block.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypedDict, Unpack

from fuse_disk_export.engine.graph import AllowOther, Backing
from fuse_disk_export.options import Aio, Cache, DetectZeroes, Discard, Options

PathLike = str | os.PathLike[str]

# A library prints nothing unless its caller configures logging: without a handler of ours,
# logging's last resort would print our warnings to stderr.
logging.getLogger("fuse_disk_export").addHandler(logging.NullHandler())


class ExportOptions(TypedDict, total=False):
    """The options `exported` and `exported_many` share: the command line's, by their long
    names, with its defaults."""

    read_only: bool
    format: str | None
    partition: int | None
    snapshot: bool
    overlay: PathLike | None
    load_snapshot: str | None
    backing: Backing
    passphrase: str | None
    passphrase_file: PathLike | None
    allow_other: AllowOther
    discard: Discard
    detect_zeroes: DetectZeroes
    cache: Cache
    aio: Aio | None
    nbd_socket: PathLike | None
    write_guard: bool
    iothreads: int | None


def _path(value: PathLike | None) -> str | None:
    return os.fspath(value) if value is not None else None


def _options(
    images: Sequence[PathLike],
    mountpoint: PathLike | None,
    mountpoint_dir: PathLike | None,
    given: ExportOptions,
) -> Options:
    paths = {"passphrase_file", "nbd_socket", "overlay"}
    return Options(
        images=tuple(os.fspath(i) for i in images),
        mountpoint=_path(mountpoint),
        mountpoint_dir=_path(mountpoint_dir),
        **{k: _path(v) if k in paths else v for k, v in given.items()},  # type: ignore[arg-type]
    )


@contextlib.contextmanager
def _exported(options: Options) -> Iterator[list[Path]]:
    from fuse_disk_export.engine.process import describe_exit
    from fuse_disk_export.errors import QemuError
    from fuse_disk_export.lifecycle import live
    from fuse_disk_export.request import build_request

    request = build_request(options)
    with live(request, register=False) as now:
        yield [Path(r.spec.mountpoint) for r in request.images]
    # The block went well, unless a daemon died under it (what was written since is lost): by
    # now each is reaped, and one our SIGTERM ended exited 0 (7.2 to 11.1).  Its status, not a
    # look at the block's end: a daemon still exiting then counts too.
    for daemon in now.daemons:
        status = daemon.process.returncode
        if status != 0:
            raise QemuError(
                f"qemu-storage-daemon (pid {daemon.pid}) {describe_exit(status)} while serving; "
                f"unmounted {', '.join(daemon.mountpoints)}"
            )


@contextlib.contextmanager
def exported_many(
    images: Sequence[PathLike],
    *,
    mountpoint_dir: PathLike | None = None,
    **options: Unpack[ExportOptions],
) -> Iterator[list[Path]]:
    """Export every image of ``images`` (one qemu-storage-daemon, all or nothing) for the block;
    yield the paths of their raw views, in order.  The options are the command line's
    (`ExportOptions`), ``mountpoint_dir`` is ``--mountpoint-dir``.

    :raise FdeError: (and its subclasses, `ImageError`, `QemuError`, ...) nothing could be
        exported; nothing is left of the attempt.
    :raise QemuError: on leaving the block, which raised nothing: a daemon died in it (the
        others are stopped as usual).
    """
    with _exported(_options(images, None, mountpoint_dir, options)) as paths:
        yield paths


@contextlib.contextmanager
def exported(
    image: PathLike,
    *,
    mountpoint: PathLike | None = None,
    **options: Unpack[ExportOptions],
) -> Iterator[Path]:
    """Export ``image`` for the block; yield the path of its raw view (the image's own path,
    or ``mountpoint``).  The options are the command line's (`ExportOptions`), ``mountpoint``
    is ``-m``.

    :raise FdeError: (and its subclasses) nothing could be exported; nothing is left of it.
    :raise QemuError: on leaving the block, which raised nothing: the daemon died in it.
    """
    with _exported(_options((image,), mountpoint, None, options)) as paths:
        yield paths[0]
