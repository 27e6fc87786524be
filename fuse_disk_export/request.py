"""From `Options` to an `ExportRequest`: every path absolute, every image inspected.

This runs in the invoking process, before any ``-d`` detach, so that relative paths resolve
against the caller's directory and a bad image is reported right where the user is looking.
Nothing here prints or prompts: a passphrase that must be asked for is asked through the
``ask_passphrase`` callback of the caller (the command line's prompt).
"""

import logging
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from fuse_disk_export import mounts
from fuse_disk_export import options as opts
from fuse_disk_export.engine.graph import Tuning
from fuse_disk_export.errors import ImageError, MountError, UsageError
from fuse_disk_export.images import (
    SECRET_ID,
    ImageOptions,
    Resolved,
    as_made,
    check_not_mounted,
    resolve,
    resolve_all,
)
from fuse_disk_export.options import Options
from fuse_disk_export.prepare import ImageExtras

if TYPE_CHECKING:  # mountfs, partitions, table_reader: only -P, --mount-fs, --list-partitions
    from fuse_disk_export.mountfs.plan import FsPlan
    from fuse_disk_export.table_reader import Disk

log = logging.getLogger(__name__)

#: Asks for the passphrase of the images named; None when nobody can be asked.
AskPassphrase = Callable[[Sequence[str]], str]


class ExportRequest(NamedTuple):
    """Everything one invocation exports, already resolved to absolute paths."""

    images: Sequence[Resolved]
    tuning: Tuning = Tuning()
    pid_file: str | None = None
    #: Per image: overlay and snapshot server to prepare (empty: none for any image).
    preparations: Sequence[ImageExtras] = ()
    #: Secret objects to create, id -> passphrase (they reach QEMU through pipes).
    secrets: Mapping[str, str] | None = None
    #: ``--mount-fs``: the filesystem to mount over the (one) export, which is on a private file.
    filesystem: "FsPlan | None" = None
    #: I/O threads of every FUSE export; None: the default for the QEMU that answers.
    iothreads: int | None = None


def _tuning(options: Options) -> Tuning:
    direct, no_flush, writethrough = opts.CACHE[options.cache]
    return Tuning(
        allow_other=options.allow_other,
        cache_direct=direct,
        cache_no_flush=no_flush,
        writethrough=writethrough,
        aio=options.aio,
        discard=options.discard,
        detect_zeroes=options.detect_zeroes,
        nbd_socket=_nbd_socket(options.nbd_socket) if options.nbd_socket else None,
        write_guard=options.write_guard,
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


def _mountpoints(options: Options) -> list[str | None]:
    if options.mountpoint:
        return [options.mountpoint]
    if options.mountpoint_dir:
        directory = os.path.abspath(options.mountpoint_dir)
        if not os.path.isdir(directory):
            raise MountError("is not a directory", path=directory)
        return [os.path.join(directory, os.path.basename(image)) for image in options.images]
    return [None] * len(options.images)


def _image_options(options: Options) -> ImageOptions:
    return ImageOptions(
        format=options.format,
        read_only=options.read_only,
        backing=options.backing,
        snapshot=options.snapshot,
        overlay=os.path.abspath(options.overlay) if options.overlay is not None else None,
        load_snapshot=options.load_snapshot,
    )


def _secrets(options: Options, images: list[Resolved], ask: AskPassphrase | None) -> dict[str, str]:
    """The passphrase for encrypted images: given, first line of its file, or asked."""
    locked = [r.spec.image for r in images if r.spec.key_secret]
    if not locked:
        return {}
    if options.passphrase is not None:
        passphrase = options.passphrase
    elif options.passphrase_file:
        try:
            with open(options.passphrase_file, encoding="utf-8") as f:
                passphrase = f.read().split("\n", 1)[0]
        except OSError as e:
            raise UsageError(f"cannot read: {e.strerror}", path=options.passphrase_file) from None
    elif ask is not None:
        passphrase = ask(locked)
    else:
        raise UsageError("is encrypted: give --passphrase-file FILE", path=locked[0])
    return {SECRET_ID: passphrase}


def _preparations(options: Options, images: list[Resolved]) -> list[ImageExtras]:
    if not (options.snapshot or options.load_snapshot or options.overlay is not None):
        return []
    needs = []
    for r in images:
        size = None
        if options.snapshot:
            probed = r.spec.layers[0].format == r.info.format
            size = r.info.virtual_size if probed else os.path.getsize(r.spec.image)
            if size is None:
                raise ImageError(
                    "--snapshot needs the image's virtual size, which is not known for "
                    f"{r.info.format} images",
                    path=r.spec.image,
                )
        needs.append(
            ImageExtras(
                overlay_size=size,
                load_snapshot=options.load_snapshot,
                new_overlay_size=r.new_overlay_size,
            )
        )
    return needs


def _with_partitions(
    images: list[Resolved], number: int, secrets: dict[str, str]
) -> list[Resolved]:
    from fuse_disk_export.table_reader import partition_slice, read_tables

    tables = read_tables([as_made(r) for r in images], secrets)
    return [
        r._replace(spec=r.spec._replace(slice=partition_slice(t, number, r.spec.image)))
        for r, t in zip(images, tables, strict=True)
    ]


def _note_raw(options: Options, images: list[Resolved]) -> None:
    """A user who typed the wrong file learns it: a raw image's export shows the same bytes."""
    if options.format or options.changes_view:
        return
    for r in images:
        if r.spec.layers[0].format == "raw":
            log.warning(
                "%s: note: already a raw image; it is exported with its bytes unchanged",
                r.spec.image,
            )


def _resolve(options: Options) -> list[Resolved]:
    image_options = _image_options(options)
    targets = _mountpoints(options)
    if not any(targets):
        images = resolve_all(options.images, image_options)
    else:
        images = [
            resolve(i, image_options, mountpoint=m)
            for i, m in zip(options.images, targets, strict=True)
        ]
        seen = [r.spec.mountpoint for r in images]
        if len(set(seen)) != len(seen):
            raise UsageError("two images would be exported on the same mount point")
    _check_chains(images)
    return images


def _check_chains(images: list[Resolved]) -> None:
    """Refuse a writable export of a file that another image of the invocation opens too: as
    its backing file, or as itself under another name (a hard link).  QEMU would answer
    "locked by another process": it is its own lock."""

    def file_of(path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    writable = {file_of(r.spec.image): r.spec.image for r in images if r.spec.writable}
    seen: dict[tuple[int, int], Resolved] = {}
    for r in images:
        same = seen.setdefault(file_of(r.spec.image), r)
        if same is not r and (r.spec.writable or same.spec.writable):
            raise UsageError(
                f"is the same file as {same.spec.image} (a hard link), exported in the same "
                "invocation: export it once, or both with -r",
                path=r.spec.image,
            )
        for path in r.chain:
            if file_of(path) in writable:
                raise UsageError(
                    f"is the backing file of {r.spec.image}, exported in the same invocation: "
                    "a write to it would change what that one shows; export it with -r, or on "
                    "its own",
                    path=path,
                )


def _preflight() -> None:
    from fuse_disk_export import preflight

    preflight.check_daemon()
    preflight.check_fuse()


def build_request(
    options: Options, *, ask_passphrase: AskPassphrase | None = None
) -> ExportRequest:
    """Inspect every image and decide how to export it.

    :raise FdeError: a bad image, option or mount point (nothing has been started).
    """
    opts.check(options)
    _preflight()
    pid_file = os.path.abspath(options.pid_file) if options.pid_file else None
    if pid_file:
        from fuse_disk_export.pidfile import check_free

        check_free(pid_file)
    with mounts.one_reading():
        images = _resolve(options)
    with mounts.one_reading():
        # Another invocation may have mounted one of them since that reading, and the probe
        # read its raw view: refused now, before anything is said of what was read.
        for path in dict.fromkeys(p for r in images for p in (r.spec.image, r.spec.mountpoint)):
            check_not_mounted(path)
    _note_raw(options, images)
    secrets = _secrets(options, images, ask_passphrase)
    filesystem = None
    if options.mount_fs is not None:
        from fuse_disk_export.mountfs import plan  # --mount-fs only

        images, filesystem = plan.with_filesystem(options, images, secrets)
    elif options.partition is not None:
        images = _with_partitions(images, options.partition, secrets)
    return ExportRequest(
        images=images,
        tuning=_tuning(options),
        pid_file=pid_file,
        preparations=_preparations(options, images),
        secrets=secrets,
        filesystem=filesystem,
        iothreads=options.iothreads,
    )


def partition_tables(
    options: Options, *, ask_passphrase: AskPassphrase | None = None
) -> list[tuple[str, "Disk"]]:
    """Each image's partition table and what its partitions (or the whole disk) hold
    (``--list-partitions``); nothing is exported."""
    from fuse_disk_export.table_reader import read_disks

    opts.check(options)
    _preflight()
    image_options = _image_options(options)._replace(read_only=True)
    images = [resolve(image, image_options) for image in options.images]
    disks = read_disks([r.spec for r in images], _secrets(options, images, ask_passphrase))
    return [(r.spec.image, d) for r, d in zip(images, disks, strict=True)]
