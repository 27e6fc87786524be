"""From the paths a user typed to checked `ImageSpec`s the planner can use.

Each image is looked up in mountinfo before anything touches it (an exported path reads as raw, a
dead mount fails every stat), resolved, probed, and its backing chain walked under the backing
policy, so that QEMU only ever opens files we have looked at, named by absolute path.
"""

import logging
import os
import stat
from collections.abc import Sequence
from typing import NamedTuple

from fuse_disk_export import detect, mounts, registry
from fuse_disk_export.engine.graph import Backing, ImageSpec, Layer, Slice
from fuse_disk_export.errors import BackingError, ImageError, MountError, UsageError
from fuse_disk_export.formats.common import READ_ONLY_DRIVER

log = logging.getLogger(__name__)

# Formats we can recognise by content; a -f naming one of these must agree with the content.
PROBED_FORMATS = frozenset(
    {
        "qcow2",
        "qcow",
        "vmdk",
        "vdi",
        "vhdx",
        "vpc",
        "qed",
        "parallels",
        "luks",
        "dmg",
        "bochs",
        "cloop",
    }
)
# Formats QEMU can only open read-only.
READ_ONLY_FORMATS = frozenset({"dmg", "bochs", "cloop"})
# QMP id of the secret object that holds the passphrase of encrypted images.
SECRET_ID = "fde-secret0"
MAX_CHAIN = 64
# How long a FUSE server already mounted on a path we are given may take to answer.
MOUNT_CHECK_TIMEOUT = 0.3


class ImageOptions(NamedTuple):
    """How the user asked every image of an invocation to be opened."""

    format: str | None = None
    read_only: bool = False
    backing: Backing = "safe"
    #: Writes go to a temporary overlay: the image itself is opened read-only.
    snapshot: bool = False
    #: Writes go to this qcow2 overlay of the image (absolute; made if missing), kept after.
    overlay: str | None = None
    #: Export this internal snapshot (read-only) instead of the image's current state.
    load_snapshot: str | None = None


class Resolved(NamedTuple):
    """One image after inspection: the spec to plan, plus what ``--list`` and ``-v`` show."""

    spec: ImageSpec
    info: detect.ImageInfo
    chain: tuple[str, ...] = ()
    #: The mount point does not exist yet: create it before mounting, remove it after.
    creates_mountpoint: bool = False
    #: ``spec.overlay`` does not exist yet: create it over the image, of this virtual size.
    new_overlay_size: int | None = None
    #: Why it is exported read-only though asked writable: said once it is live (said before, it
    #: would come as a second line with QEMU's refusal of a bad image).
    note: str | None = None


def as_made(r: Resolved) -> ImageSpec:
    """The spec whose disk a partition table is read from: an ``--overlay`` not made yet holds
    nothing, and cannot be opened."""
    return r.spec._replace(overlay=None) if r.new_overlay_size is not None else r.spec


def _serving_pid(path: str) -> int | None:
    record = registry.find_by_mountpoint(path)
    return record.pid if record else None


def check_not_mounted(path: str, *, what: str = "", owner: str | None = None) -> None:
    """Refuse a path that is already a mount point, naming who serves it when we know; ``owner``,
    if given, is the file the error names (the image whose backing file ``path`` is).

    :raise MountError: ``path`` is a mount point (live or dead).
    """
    entry = mounts.mount_at(path)
    if entry is None:
        return
    prefix = f"{what} " if what else ""
    # Never stat() it: a dead FUSE mount answers from the attribute cache, a stopped one hangs.
    health = mounts.fuse_state(path, MOUNT_CHECK_TIMEOUT) if entry.is_fuse else "live"
    if health == "dead":
        raise MountError(
            f"{prefix}is a dead FUSE mount (Transport endpoint is not connected); "
            f"clean it up with: fusermount3 -u -z '{path}'",
            path=owner or path,
        )
    pid = _serving_pid(path)
    if pid:
        by = f"exported by fuse-disk-export pid {pid}"
    else:
        servers = [
            f"pid {p} ({mounts.process_name(p) or '?'})" for p in mounts.fuse_server_pids(entry)
        ]
        by = f"{entry.fstype} from {entry.source}"
        by += f", served by {', '.join(servers)}" if servers else ""
    if health == "unresponsive":
        raise MountError(
            f"{prefix}is already a mount point ({by}) whose server does not answer "
            "(stopped or hung)",
            path=owner or path,
        )
    raise MountError(f"{prefix}is already a mount point: {by}", path=owner or path)


def _regular_file(
    path: str,
    *,
    error: type[ImageError] = ImageError,
    what: str = "",
    owner: str | None = None,
) -> None:
    """Refuse anything but a regular file; ``owner``, if given, is the file the error names.

    By stat, before anything opens the path, so that a device is never opened and the refusal is
    worded for an export.  `detect.probe` checks the file it opens once more: the path may have
    been replaced in between, and only its check is on the file actually read.
    """
    prefix = f"{what} " if what else ""
    about = owner or path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{prefix}no such file", path=about) from None
    except PermissionError:
        raise error(f"{prefix}permission denied", path=about) from None
    except OSError as e:
        raise error(f"{prefix}cannot be read: {e.strerror}", path=about) from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{prefix}is a directory, not an image file", path=about)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{prefix}is not a regular file (a device or special file)", path=about)
    # The kernel's filesystems are all on anonymous devices (major 0): a file on a disk's
    # filesystem needs no look at the mount table (a scan of it per file, with thousands of
    # exports mounted).
    kind = mounts.filesystem_of(os.path.realpath(path)) if os.major(st.st_dev) == 0 else None
    if kind in mounts.KERNEL_FILESYSTEMS:
        # A backing file /proc/self/environ would show our environment in the export.
        why = f"is a file of the kernel's {kind} filesystem, not an image"
        raise error(prefix + why, path=about)
    if owner is None and st.st_size == 0:
        # QEMU exports it as a 0-byte file that takes no write: almost surely not what was meant.
        raise error(f"{prefix}is empty (0 bytes); nothing to export", path=about)


#: Without root, FUSE mounts go through fusermount3, which mounts only on a file the user may
#: write: a read-only image is then exported read-only onto another file.
_READ_ONLY_ADVICE = "use -r to export it read-only"
_READ_ONLY_ADVICE_USER = (
    "use -r -m FILE to export it read-only onto a file of yours (without root, mounting on a "
    "file needs write access to it)"
)


def _read_only_advice() -> str:
    return _READ_ONLY_ADVICE if os.geteuid() == 0 else _READ_ONLY_ADVICE_USER


def _check_writable(path: str) -> None:
    mode = os.stat(path).st_mode
    # Root may write anything; a file with no write bit was still meant to stay read-only.
    if not mode & 0o222:
        raise ImageError(f"is read-only (no write permission); {_read_only_advice()}", path=path)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise ImageError(
            f"is not writable ({e.strerror}); {_read_only_advice()}", path=path
        ) from None
    os.close(fd)


def _check_mount_access(path: str) -> None:
    """Without root, fusermount3 mounts only on a file we may write (QEMU's error would be its
    bare "failed to open ...: Permission denied")."""
    if os.geteuid() != 0 and not os.access(path, os.W_OK):
        raise MountError(
            "without root, mounting on a file needs write access to it (fusermount3); "
            "export it onto a file of yours: -r -m FILE",
            path=path,
        )


def _check_mountpoint(path: str) -> bool:
    """Check a mount point named with -m; return whether it has to be created."""
    check_not_mounted(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(path)):
            raise MountError("cannot be created: its folder does not exist", path=path) from None
        return True
    if stat.S_ISDIR(st.st_mode):
        raise MountError("is a directory; the mount point must be a file", path=path)
    if not stat.S_ISREG(st.st_mode):
        raise MountError("is not a regular file; the mount point must be a file", path=path)
    return False


def _probe(
    path: str, *, error: type[ImageError] = ImageError, what: str = "", owner: str | None = None
) -> detect.ImageInfo:
    try:
        return detect.probe(path)
    except ImageError as e:
        prefix = f"{what} " if what else ""
        raise error(prefix + e.reason, path=owner or path) from None


def _plain_reference(ref: str, *, owner: str, kind: str) -> str:
    """Resolve a file name stored in an image header, refusing anything but a plain path."""
    if ref.startswith("json:"):
        raise BackingError(
            f"{kind} {ref!r} is a json: specification; refused "
            "(--backing=none exports the image alone, --backing=any lets QEMU follow it)",
            path=owner,
        )
    if ":" in ref.split("/", 1)[0]:
        raise BackingError(
            f"{kind} {ref!r} has a protocol prefix; refused "
            "(--backing=none exports the image alone, --backing=any lets QEMU follow it)",
            path=owner,
        )
    return os.path.realpath(os.path.join(os.path.dirname(owner), ref))


def _data_file(info: detect.ImageInfo, image: str) -> str | None:
    if info.data_file is None:
        return None
    return _file_beside(info.data_file, owner=image, kind="external data file")


def _file_beside(ref: str, *, owner: str, kind: str) -> str:
    """A file an image keeps its own data in: a plain path to a regular file in its folder."""
    path = _plain_reference(ref, owner=owner, kind=kind)
    if os.path.dirname(path) != os.path.dirname(owner):
        raise BackingError(
            f"{kind} {ref!r} lies outside the image's folder; refused "
            "(--backing=any lets QEMU follow it)",
            path=owner,
        )
    check_not_mounted(path, what=f"{kind} {ref!r}:", owner=owner)
    _regular_file(path, error=BackingError, what=f"{kind} {ref!r}:", owner=owner)
    return path


def _check_extents(image: str, backing: Backing) -> str:
    """Return why a VMDK descriptor's extents must not be written ("" where they may); unless
    ``backing`` is "any", first refuse extents that are anything but files beside it.

    QEMU opens every extent a descriptor names, absolute paths and devices included: for our
    purposes an extent is an external data file.  A sparse extent may be streamOptimized, which
    only its own header tells, whatever the backing policy; one we cannot read counts as one
    QEMU cannot write.
    """
    try:
        extents = detect.vmdk_extent_files(image)
    except ImageError as e:
        if backing != "any":
            raise BackingError(e.reason, path=image) from None
        return f"its extents cannot be read ({e.reason})"
    why_read_only = ""
    for ref in extents:
        if backing != "any":
            path = _file_beside(ref, owner=image, kind="vmdk extent")
        else:
            path = os.path.realpath(os.path.join(os.path.dirname(image), ref))
            if not os.path.isfile(path):
                continue  # a device or nothing: QEMU's to open, not ours to read
        if path == os.path.realpath(image):
            # QEMU would fail on its own lock ("locked by another process"), and a write would
            # land in the descriptor's text.
            raise ImageError(f"its extent {ref!r} is the descriptor itself", path=image)
        log.info("%s: vmdk extent %r -> %s", image, ref, path)
        try:
            extent = detect.probe(path)
        except ImageError as e:
            why = f"its extent {ref!r} cannot be read ({e.reason})"
        else:
            # A flat extent holds the guest's bytes, whatever format they look like.
            sparse_and_unsafe = extent.format == "vmdk" and extent.read_only
            why = f"its extent {ref!r}: {extent.read_only}" if sparse_and_unsafe else ""
        why_read_only = why_read_only or why
    return why_read_only


def _odd_sized(files: Sequence[str | None]) -> bool:
    """Whether a file's size is not a multiple of 512 (or cannot be told)."""
    for file in files:
        if file is None:
            continue
        try:
            if os.stat(file).st_size % 512:
                return True
        except OSError:
            return True
    return False


def _why_read_only(path: str, fmt: str, info: detect.ImageInfo | None, backing: Backing) -> str:
    """Why ``path`` must not be opened writable, or "": QEMU cannot write it, or cannot safely.

    ``info`` is None where the user's -f overrides the probed format.
    :raise BackingError: a vmdk extent the backing policy refuses (checked whatever else).
    """
    if fmt in READ_ONLY_FORMATS:
        return READ_ONLY_DRIVER
    if info is None:
        return ""
    extents = _check_extents(path, backing) if fmt == "vmdk" else ""
    return info.read_only or extents


def _walk_chain(top: str, info: detect.ImageInfo) -> tuple[Layer, ...]:
    """The backing files below ``top``, checked one by one, top first."""
    layers: list[Layer] = []
    seen = {top}
    owner, current = top, info
    while current.backing_file:
        if len(layers) >= MAX_CHAIN:
            raise BackingError(f"backing chain is longer than {MAX_CHAIN} files", path=top)
        ref = current.backing_file
        path = _plain_reference(ref, owner=owner, kind="backing file")
        if path in seen:
            raise BackingError(f"backing file {ref!r} makes the chain loop", path=owner)
        seen.add(path)
        what = f"backing file {ref!r}:"
        check_not_mounted(path, what=what, owner=owner)
        _regular_file(path, error=BackingError, what=what, owner=owner)
        below = _probe(path, error=BackingError, what=what, owner=owner)
        fmt = current.backing_format or below.format
        if fmt not in ("raw", below.format) and below.format != "raw":
            # QEMU would fail on it naming the backing file; the header that says so is ours.
            raise BackingError(
                f"backing file {ref!r} is a {below.format} image, but the header names it {fmt}",
                path=owner,
            )
        if fmt != below.format:
            # The header names the format (e.g. raw): QEMU opens it as that and follows nothing
            # from its content.
            below = detect.ImageInfo(fmt, None)
        if below.data_file is not None:
            raise BackingError(
                f"backing file {ref!r} has an external data file; refused "
                "(--backing=any lets QEMU follow it)",
                path=owner,
            )
        if fmt == "luks" or below.encrypted:
            raise BackingError(f"backing file {ref!r} is encrypted; not supported", path=owner)
        if fmt == "raw" and os.path.dirname(path) != os.path.dirname(owner):
            # Any file's bytes, exported as they are (a hostile image naming /etc/shadow would
            # show it): confined as data files and extents are.  An image of another format
            # must parse as one, and only what it describes is read.
            raise BackingError(
                f"backing file {ref!r} is a raw file outside the image's folder; refused "
                "(--backing=any lets QEMU follow it)",
                path=owner,
            )
        if fmt == "vmdk":
            _check_extents(path, "safe")  # opened read-only: only the policy matters here
        layers.append(Layer(path, fmt, read_only=True))
        log.info("%s: backing file %r -> %s (%s)", owner, ref, path, fmt)
        owner, current = path, below
    return tuple(layers)


def _check_overlay(path: str, image: str, fmt: str, size: int | None, *, read_only: bool) -> bool:
    """Check that ``path`` can be ``image``'s overlay; return whether it must be created.

    An existing file must be what we would have made: a qcow2 whose backing file is ``image``
    (format pinned), of its size, holding its data itself, so that QEMU's own tools
    (``qemu-img commit``, ``convert``) read the same disk from it after the revert.

    :raise ImageError: it cannot be, and why.
    """
    what = "--overlay:"
    if path == image:
        raise UsageError("--overlay must be another file than the image", path=path)
    if size is None:
        raise ImageError(
            f"--overlay needs the image's virtual size, which is not known for {fmt} images",
            path=image,
        )
    check_not_mounted(path, what=what)
    if not os.path.lexists(path):
        if read_only:
            raise ImageError(f"{what} no such file (-r reads an overlay made before)", path=path)
        if not os.path.isdir(os.path.dirname(path)):
            raise ImageError(f"{what} cannot be created: its folder does not exist", path=path)
        return True
    _regular_file(path, what=what)
    info = _probe(path, what=what)
    if info.format != "qcow2" or info.backing_file is None:
        raise ImageError(
            f"{what} is a {info.format} image, not a qcow2 overlay of {image}", path=path
        )
    below = os.path.realpath(os.path.join(os.path.dirname(path), info.backing_file))
    if below != image:
        raise ImageError(
            f"{what} is an overlay of {info.backing_file!r}, not of {image}", path=path
        )
    if info.backing_format != fmt:
        raise ImageError(
            f"{what} names its backing file's format as {info.backing_format or 'nothing'}, "
            f"not {fmt}",
            path=path,
        )
    if info.virtual_size != size:
        raise ImageError(f"{what} is {info.virtual_size} bytes, but the image is {size}", path=path)
    if info.encrypted or info.data_file is not None or info.read_only:
        raise ImageError(
            f"{what} is not a plain qcow2 overlay (encrypted, external data file or "
            "marked corrupt)",
            path=path,
        )
    if not read_only:
        _check_writable(path)
    return False


def resolve(
    image: str,
    options: ImageOptions,
    *,
    mountpoint: str | None = None,
    slice: Slice | None = None,
) -> Resolved:
    """Inspect one image and decide how to export it.

    :raise MountError: the image or the mount point is already a mount point.
    :raise ImageError: missing, not a regular file, unreadable, malformed, mismatched ``format``.
    :raise BackingError: the header names a file the backing policy refuses.
    """
    format, read_only, backing = options.format, options.read_only, options.backing
    named = os.path.abspath(image)
    check_not_mounted(named)
    real = os.path.realpath(named)
    if real != named:
        log.info("%s is a symlink; exporting its target %s", named, real)
        check_not_mounted(real)
    _regular_file(real)
    info = _probe(real)
    fmt = format or info.format
    if format in PROBED_FORMATS and format != info.format:
        raise ImageError(
            f"is not a {format} image (its content looks like {info.format})", path=real
        )
    probed = fmt == info.format
    encrypted = fmt == "luks" or (info.encrypted and probed)
    if options.load_snapshot is not None:
        if fmt != "qcow2":
            raise ImageError(f"is {fmt}; internal snapshots (-l) need qcow2", path=real)
        if not read_only:
            log.info("%s: an internal snapshot is exported read-only", real)
            read_only = True
    writes_elsewhere = options.snapshot or options.overlay is not None
    why_read_only = _why_read_only(real, fmt, info if probed else None, backing)
    note = None
    if why_read_only and not read_only and not writes_elsewhere:
        # Not refused: reading is what most users of such images want, and writes then fail
        # (EROFS, or EACCES on older QEMUs) before they reach the image (README "Which images
        # are written").
        note = (
            f"{why_read_only}; exporting read-only (-s or --overlay FILE take writes without "
            "touching it)"
        )
        read_only = True
    opened_read_only = read_only or writes_elsewhere
    if not opened_read_only:
        _check_writable(real)
    chain: tuple[Layer, ...] = ()
    data_file = None
    if fmt == info.format:
        if backing == "safe":
            chain = _walk_chain(real, info)
        if backing != "any":
            data_file = _data_file(info, real)
    overlay, new_overlay_size = None, None
    if options.overlay is not None:
        if encrypted:
            raise ImageError(
                "is encrypted: --overlay would keep its writes unencrypted; refused", path=real
            )
        size = info.virtual_size if probed else os.path.getsize(real)
        overlay = options.overlay
        if _check_overlay(overlay, real, fmt, size, read_only=read_only):
            new_overlay_size = size
    target = os.path.abspath(mountpoint) if mountpoint else real
    if overlay is not None and os.path.realpath(overlay) == os.path.realpath(target):
        raise UsageError("--overlay and the mount point must be different files", path=overlay)
    creates = target != real and _check_mountpoint(target)
    if not creates:
        _check_mount_access(target)
    spec = ImageSpec(
        image=real,
        layers=(Layer(real, fmt, read_only=opened_read_only), *chain),
        mountpoint=target,
        writable=not read_only,
        backing=backing,
        data_file=data_file,
        slice=slice,
        key_secret=SECRET_ID if encrypted else None,
        encryption=info.encryption if probed and info.encryption else "luks",
        overlay=overlay,
        odd_sized=_odd_sized([real, *(layer.path for layer in chain), data_file]),
        size=info.virtual_size if probed else None,
    )
    chained = tuple(layer.path for layer in chain)
    return Resolved(spec, info, chained, creates, new_overlay_size, note)


def resolve_all(images: Sequence[str], options: ImageOptions) -> list[Resolved]:
    """`resolve` every image; refuse the same file twice in one invocation."""
    resolved: list[Resolved] = []
    seen: dict[str, str] = {}
    for image in images:
        item = resolve(image, options)
        if item.spec.mountpoint in seen:
            raise UsageError(
                f"named twice in one invocation (also as {seen[item.spec.mountpoint]!r})",
                path=image,
            )
        seen[item.spec.mountpoint] = image
        resolved.append(item)
    return resolved
