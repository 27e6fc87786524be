"""What one invocation asks for, typed, and checked in one place.

The command line parses argv into an `Options`; the Python API (`fuse_disk_export.exported`)
builds one from keyword arguments.  Everything below takes this object, and `check` is the one
place where combinations of options are refused.
"""

from typing import Literal, NamedTuple

from fuse_disk_export.engine.graph import AllowOther, Backing
from fuse_disk_export.errors import UsageError

#: Most I/O threads a user may ask for; more only cost memory and wake-ups.
MAX_IOTHREADS = 64

Cache = Literal["none", "writeback", "writethrough", "directsync", "unsafe"]
Aio = Literal["threads", "native", "io_uring"]
Discard = Literal["ignore", "unmap"]
DetectZeroes = Literal["off", "on", "unmap"]

CACHE_MODES: tuple[Cache, ...] = ("none", "writeback", "writethrough", "directsync", "unsafe")
AIO_MODES: tuple[Aio, ...] = ("threads", "native", "io_uring")
DISCARD_MODES: tuple[Discard, ...] = ("ignore", "unmap")
DETECT_ZEROES_MODES: tuple[DetectZeroes, ...] = ("off", "on", "unmap")
BACKING_MODES: tuple[Backing, ...] = ("safe", "none", "any")
ALLOW_OTHER_MODES: tuple[AllowOther, ...] = ("auto", "on", "off")

#: qemu-nbd's cache modes as (cache.direct, cache.no-flush, export writethrough).
CACHE: dict[Cache, tuple[bool, bool, bool]] = {
    "none": (True, False, False),
    "writeback": (False, False, False),
    "writethrough": (False, False, True),
    "directsync": (True, False, True),
    "unsafe": (False, True, False),
}


class Options(NamedTuple):
    """One invocation's images and how to export them; the names are the command line's."""

    images: tuple[str, ...]
    read_only: bool = False
    format: str | None = None
    backing: Backing = "safe"
    allow_other: AllowOther = "auto"
    mountpoint: str | None = None
    mountpoint_dir: str | None = None
    partition: int | None = None
    nbd_socket: str | None = None
    snapshot: bool = False
    #: A qcow2 overlay of the image (created if missing) that takes every write, kept.
    overlay: str | None = None
    load_snapshot: str | None = None
    #: The passphrase's file (its first line), for LUKS images.
    passphrase_file: str | None = None
    #: The passphrase itself (the Python API; the command line never takes one in argv).
    passphrase: str | None = None
    discard: Discard = "unmap"
    detect_zeroes: DetectZeroes = "off"
    cache: Cache = "writeback"
    aio: Aio | None = None
    write_guard: bool = True
    #: I/O threads of every FUSE export (0: none); None: the default for the QEMU that answers.
    iothreads: int | None = None
    pid_file: str | None = None
    #: Mount the filesystem inside at this directory, through a userspace driver.
    mount_fs: str | None = None
    #: The filesystem's type, instead of detecting it (with ``mount_fs``).
    fs_type: str | None = None

    @property
    def changes_view(self) -> bool:
        """Whether the export shows something other than the image's own virtual disk on it."""
        return bool(
            self.partition is not None
            or self.snapshot
            or self.overlay
            or self.mountpoint
            or self.mountpoint_dir
            or self.nbd_socket
            or self.load_snapshot
            or self.mount_fs
        )


def _one_of(value: object, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise UsageError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")


def check(options: Options) -> None:
    """Refuse values and combinations that make no sense, before anything is looked at.

    :raise UsageError: the first problem found.
    """
    if not options.images:
        raise UsageError("no image given (see --help)")
    if "" in options.images:
        raise UsageError("an image name is empty")
    for value, what in (
        (options.pid_file, "-p/--pid-file"),
        (options.mountpoint, "-m/--mountpoint"),
        (options.mountpoint_dir, "--mountpoint-dir"),
        (options.nbd_socket, "--nbd-socket"),
        (options.passphrase_file, "--passphrase-file"),
        (options.mount_fs, "--mount-fs"),
        (options.overlay, "--overlay"),
    ):
        # Say "$UNSET": taken for the option's absence, it would mean something else (no pid
        # file for a script to wait for; the writes reaching the image instead of an overlay).
        if value == "":
            raise UsageError(f"{what} needs a path (it was given an empty one)")
    _one_of(options.cache, CACHE_MODES, "--cache")
    _one_of(options.discard, DISCARD_MODES, "--discard")
    _one_of(options.detect_zeroes, DETECT_ZEROES_MODES, "--detect-zeroes")
    _one_of(options.backing, BACKING_MODES, "--backing")
    _one_of(options.allow_other, ALLOW_OTHER_MODES, "--allow-other")
    if options.aio is not None:
        _one_of(options.aio, AIO_MODES, "--aio")
    if options.iothreads is not None and not 0 <= options.iothreads <= MAX_IOTHREADS:
        raise UsageError(f"--iothreads takes 0 to {MAX_IOTHREADS}, not {options.iothreads}")
    if options.aio == "native" and not CACHE[options.cache][0]:
        raise UsageError("--aio native needs --cache none or directsync (O_DIRECT)")
    if options.detect_zeroes == "unmap" and options.discard != "unmap":
        raise UsageError("--detect-zeroes unmap needs --discard unmap")
    if options.mountpoint and options.mountpoint_dir:
        raise UsageError("-m/--mountpoint and --mountpoint-dir exclude each other")
    if options.mountpoint and len(options.images) > 1:
        raise UsageError("-m/--mountpoint takes one image; use --mountpoint-dir DIR for several")
    if options.snapshot and options.load_snapshot:
        raise UsageError("-l/--load-snapshot exports read-only; it cannot be used with --snapshot")
    if options.overlay is not None:
        if len(options.images) > 1:
            raise UsageError("--overlay FILE takes one image")
        if options.snapshot or options.load_snapshot:
            raise UsageError("--overlay keeps the writes; it cannot be used with -s or -l")
    if options.partition is not None and options.load_snapshot:
        raise UsageError("-P/--partition cannot be combined with -l/--load-snapshot")
    if options.passphrase is not None and options.passphrase_file is not None:
        raise UsageError("give the passphrase or its file, not both")
    if options.fs_type is not None and options.mount_fs is None:
        raise UsageError("--fs-type goes with --mount-fs")
    if options.mount_fs is not None:
        from fuse_disk_export.mountfs.drivers import FS_TYPES

        if len(options.images) > 1:
            raise UsageError("--mount-fs takes one image")
        if options.mountpoint or options.mountpoint_dir or options.nbd_socket:
            raise UsageError(
                "--mount-fs exports on a private file: no -m, --mountpoint-dir or --nbd-socket"
            )
        if options.fs_type is not None:
            _one_of(options.fs_type, tuple(FS_TYPES), "--fs-type")
