"""From parsed options to an `ExportRequest`: every path absolute, every image inspected.

This runs in the invoking process, before any ``-d`` detach, so that relative paths resolve
against the caller's directory and a bad image is reported right where the user is looking.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys

from fuse_disk_export.engine.graph import Tuning
from fuse_disk_export.errors import ImageError, MountError, UsageError
from fuse_disk_export.export import ExportRequest
from fuse_disk_export.images import SECRET_ID, ImageOptions, Resolved, resolve, resolve_all
from fuse_disk_export.prepare import Preparation

log = logging.getLogger(__name__)

# qemu-nbd's --cache values, as (cache.direct, cache.no-flush, export writethrough).
CACHE = {
    "none": (True, False, False),
    "writeback": (False, False, False),
    "writethrough": (False, False, True),
    "directsync": (True, False, True),
    "unsafe": (False, True, False),
}


def _tuning(args: argparse.Namespace) -> Tuning:
    direct, no_flush, writethrough = CACHE[args.cache]
    if args.aio == "native" and not direct:
        raise UsageError("--aio native needs --cache none or directsync (O_DIRECT)")
    if args.detect_zeroes == "unmap" and args.discard != "unmap":
        raise UsageError("--detect-zeroes unmap needs --discard unmap")
    return Tuning(
        allow_other=args.allow_other,
        cache_direct=direct,
        cache_no_flush=no_flush,
        writethrough=writethrough,
        aio=args.aio,
        discard=args.discard,
        detect_zeroes=args.detect_zeroes,
        nbd_socket=_nbd_socket(args.nbd_socket) if args.nbd_socket else None,
        write_guard=not args.no_write_guard,
    )


def _nbd_socket(path: str) -> str:
    path = os.path.abspath(path)
    # QEMU unlinks whatever is at the socket path before binding: never let it meet a file.
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    what = "a socket (in use or left over)" if stat.S_ISSOCK(mode) else "an existing file"
    raise UsageError(f"--nbd-socket: {path} is {what}; give a path that does not exist")


def _mountpoints(args: argparse.Namespace) -> list[str | None]:
    if args.mountpoint and args.mountpoint_dir:
        raise UsageError("-m/--mountpoint and --mountpoint-dir exclude each other")
    if args.mountpoint:
        if len(args.images) > 1:
            raise UsageError(
                "-m/--mountpoint takes one image; use --mountpoint-dir DIR for several"
            )
        return [args.mountpoint]
    if args.mountpoint_dir:
        directory = os.path.abspath(args.mountpoint_dir)
        if not os.path.isdir(directory):
            raise MountError("is not a directory", path=directory)
        return [os.path.join(directory, os.path.basename(image)) for image in args.images]
    return [None] * len(args.images)


def _options(args: argparse.Namespace) -> ImageOptions:
    if args.snapshot and args.load_snapshot:
        raise UsageError("-l/--load-snapshot exports read-only; it cannot be used with --snapshot")
    return ImageOptions(
        format=args.format,
        read_only=args.read_only,
        backing=args.backing,
        snapshot=args.snapshot,
        load_snapshot=args.load_snapshot,
    )


def _secrets(args: argparse.Namespace, images: list[Resolved]) -> dict[str, str]:
    """The passphrase for encrypted images: first line of --passphrase-file, or asked."""
    locked = [r.spec.image for r in images if r.spec.key_secret]
    if not locked:
        return {}
    if args.passphrase_file:
        try:
            with open(args.passphrase_file, encoding="utf-8") as f:
                passphrase = f.read().split("\n", 1)[0]
        except OSError as e:
            raise UsageError(f"cannot read: {e.strerror}", path=args.passphrase_file) from None
    elif sys.stdin.isatty():
        import getpass

        from fuse_disk_export import stopsignals

        with stopsignals.interruptible():  # a Ctrl-C at the prompt must not wait for Enter
            passphrase = getpass.getpass(f"Passphrase for {', '.join(locked)}: ")
    else:
        raise UsageError("is encrypted: give --passphrase-file FILE", path=locked[0])
    return {SECRET_ID: passphrase}


def _preparations(args: argparse.Namespace, images: list[Resolved]) -> list[Preparation]:
    if not (args.snapshot or args.load_snapshot):
        return []
    needs = []
    for r in images:
        size = None
        if args.snapshot:
            probed = r.spec.layers[0].format == r.info.format
            size = r.info.virtual_size if probed else os.path.getsize(r.spec.image)
            if size is None:
                raise ImageError(
                    "--snapshot needs the image's virtual size, which is not known for "
                    f"{r.info.format} images",
                    path=r.spec.image,
                )
        needs.append(Preparation(overlay_size=size, load_snapshot=args.load_snapshot))
    return needs


def _with_partitions(
    images: list[Resolved], number: int, secrets: dict[str, str]
) -> list[Resolved]:
    from fuse_disk_export.tables import partition_slice, read_tables

    tables = read_tables([r.spec for r in images], secrets)
    return [
        r._replace(spec=r.spec._replace(slice=partition_slice(t, number, r.spec.image)))
        for r, t in zip(images, tables, strict=True)
    ]


def _note_raw(args: argparse.Namespace, images: list[Resolved]) -> None:
    """A user who typed the wrong file learns it: a raw image's export shows the same bytes."""
    changes_view = (
        args.partition is not None
        or args.snapshot
        or args.mountpoint
        or args.mountpoint_dir
        or args.nbd_socket
        or args.load_snapshot
    )
    if args.format or changes_view:
        return
    for r in images:
        if r.spec.layers[0].format == "raw":
            log.warning(
                "%s: note: already a raw image; it is exported with its bytes unchanged",
                r.spec.image,
            )


def build_request(args: argparse.Namespace) -> ExportRequest:
    """Inspect every image and decide how to export it.

    :raise FdeError: a bad image, option or mount point (nothing has been started).
    """
    from fuse_disk_export import preflight

    preflight.check_daemon()
    preflight.check_fuse()
    options = _options(args)
    pid_file = os.path.abspath(args.pid_file) if args.pid_file else None
    if pid_file:
        from fuse_disk_export.pidfile import check_free

        check_free(pid_file)
    targets = _mountpoints(args)
    if any(targets):
        images = [
            resolve(i, options, mountpoint=m) for i, m in zip(args.images, targets, strict=True)
        ]
        seen = [r.spec.mountpoint for r in images]
        if len(set(seen)) != len(seen):
            raise UsageError("two images would be exported on the same mount point")
    else:
        images = resolve_all(args.images, options)
    if args.aio == "io_uring":
        for r in images:
            if any(layer.format == "vmdk" for layer in r.spec.layers):
                raise UsageError(
                    "--aio io_uring: qemu-storage-daemon (7.2 and 10.0.2) can hang opening vmdk "
                    "extents with it",
                    path=r.spec.image,
                )
    _note_raw(args, images)
    secrets = _secrets(args, images)
    if args.partition is not None:
        if args.load_snapshot:
            raise UsageError("-P/--partition cannot be combined with -l/--load-snapshot")
        images = _with_partitions(images, args.partition, secrets)
    return ExportRequest(
        images=images,
        tuning=_tuning(args),
        pid_file=pid_file,
        quiet=args.quiet,
        preparations=_preparations(args, images),
        secrets=secrets,
    )


def list_partitions(args: argparse.Namespace) -> int:
    """``--list-partitions``: print each image's table; export nothing."""
    from fuse_disk_export import preflight
    from fuse_disk_export.partitions import TABLE_HEADINGS, format_table
    from fuse_disk_export.tables import read_tables

    preflight.check_daemon()
    preflight.check_fuse()
    options = _options(args)._replace(read_only=True)
    images = [resolve(image, options) for image in args.images]
    tables = read_tables([r.spec for r in images], _secrets(args, images))
    for r, table in zip(images, tables, strict=True):
        rows = format_table(table)
        scheme = table.scheme.upper() if table.scheme != "none" else "no"
        title = f"{r.spec.image}: {scheme} partition table"
        if sys.stdout.isatty():
            from rich.console import Console
            from rich.table import Table

            view = Table(*TABLE_HEADINGS, title=title)
            for row in rows:
                view.add_row(*row)
            Console().print(view)
        else:
            from fuse_disk_export.columns import plain_columns

            print(title)
            print(plain_columns([TABLE_HEADINGS, *rows]), end="")
    return 0
