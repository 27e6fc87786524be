"""``--doctor``: will exporting work on this machine, and with what?

Each check reads the machine as the export would meet it and says what it found; a failed one
says how to fix it.  Nothing is exported or mounted: the one process started is a
qemu-storage-daemon asked for its version and schema over stdio (`qemuinfo.probe`), and images
are only inspected (`images.resolve`).  Loaded only with ``--doctor``.
"""

import os
import resource
import shutil
import stat
from collections.abc import Sequence
from typing import NamedTuple

from fuse_disk_export import choices, mounts
from fuse_disk_export.engine import limits, qemuinfo, versions
from fuse_disk_export.engine.graph import AllowOther, ImageSpec, Layer, Tuning, default_aio
from fuse_disk_export.errors import FdeError
from fuse_disk_export.images import ImageOptions
from fuse_disk_export.mountfs.drivers import DRIVERS
from fuse_disk_export.preflight import FUSE_DEVICE, not_the_fuse_device
from fuse_disk_export.registry import registry_dir

FUSE_CONF = "/etc/fuse.conf"


class Check(NamedTuple):
    """One thing looked at: what was found and, when it is not right, how to fix it."""

    name: str
    ok: bool
    detail: str
    remedy: str = ""
    #: A default export needs it: a failure makes ``--doctor`` exit 1.  Others (what
    #: ``--mount-fs`` or ``--allow-other on`` need) are reported and do not count.
    needed: bool = True
    #: What ``--json`` shows beside the words.
    facts: dict[str, object] = {}  # noqa: RUF012  (a NamedTuple default, never mutated)


def _apt(*packages: str) -> str:
    return f"apt-get install {' '.join(packages)} (as root)"


def fuse_device(device: str = FUSE_DEVICE) -> Check:
    """/dev/fuse: present, and readable and writable by us."""
    try:
        st = os.stat(device)
    except FileNotFoundError:
        return Check(
            device,
            False,
            "missing",
            "load the kernel's FUSE module (modprobe fuse), or start the container with the "
            "device (docker run --device /dev/fuse)",
        )
    except OSError as e:
        return Check(device, False, f"cannot be used: {e.strerror}", "check the device node")
    mode = stat.S_IMODE(st.st_mode)
    facts: dict[str, object] = {"mode": f"{mode:04o}", "uid": st.st_uid, "gid": st.st_gid}
    found = f"mode {mode:04o}, owner uid {st.st_uid} gid {st.st_gid}"
    if (wrong := not_the_fuse_device(st)) is not None:
        return Check(device, False, f"{wrong} ({found})", f"mknod {device} c 10 229 (as root)")
    if not os.access(device, os.R_OK | os.W_OK):
        return Check(
            device,
            False,
            f"{found}: no read and write access for us",
            f"chmod 0666 {device} (as root; Debian's default)",
            facts=facts,
        )
    return Check(device, True, f"{found}; read and write access", facts=facts)


def fusermount(*, root: bool) -> Check:
    """fusermount3 (and setuid root): what mounts FUSE without root."""
    path = mounts.fusermount()
    needed = not root
    if path is None:
        detail = "not found" + ("; root mounts without it" if root else "")
        return Check("fusermount3", root, detail, _apt("fuse3"), needed=needed)
    st = os.stat(path)
    setuid = bool(st.st_mode & stat.S_ISUID) and st.st_uid == 0
    facts: dict[str, object] = {"path": path, "setuid_root": setuid}
    if setuid or root:
        what = "setuid root" if setuid else "not setuid; root mounts without it"
        return Check("fusermount3", True, f"{path}, {what}", needed=needed, facts=facts)
    return Check(
        "fusermount3",
        False,
        f"{path} is not setuid root: without root, it cannot mount",
        f"chmod u+s {path} (as root; Debian's fuse3 installs it so)",
        needed=needed,
        facts=facts,
    )


def allow_other(*, root: bool, mode: AllowOther, conf: str = FUSE_CONF) -> Check:
    """user_allow_other in /etc/fuse.conf: other users can see a rootless export."""
    try:
        with open(conf, encoding="utf-8", errors="replace") as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
        allowed = "user_allow_other" in lines
    except FileNotFoundError:
        allowed = False
    except OSError as e:
        return Check(
            "user_allow_other",
            False,
            f"{conf}: {e.strerror}",
            f"chmod a+r {conf} (as root; fusermount3 reads it too)",
            needed=mode == "on",
        )
    name = "user_allow_other"
    if root:
        return Check(name, True, "not needed as root: other users can see the exports")
    if allowed:
        return Check(name, True, f"set in {conf}: other users can see the exports")
    return Check(
        name,
        False,
        f"not set in {conf}: only you see the exports (--allow-other auto falls back to that; "
        "--allow-other on fails)",
        f"add a line 'user_allow_other' to {conf} (as root)",
        needed=mode == "on",
    )


def user(*, root: bool) -> Check:
    """Who we run as, and what that changes."""
    if root:
        detail = (
            "root: mounts without fusermount3, other users see the exports, fusectl is "
            "mounted when missing; registry in /run unless XDG_RUNTIME_DIR is set"
        )
    else:
        detail = (
            f"uid {os.geteuid()}, not root: mounts through fusermount3; exports are yours "
            "unless user_allow_other is set; only images you can read (and write) are exported"
        )
    return Check("user", True, detail, facts={"uid": os.geteuid(), "root": root})


def qemu(binary: str = "qemu-storage-daemon") -> tuple[Check, qemuinfo.QemuInfo | None]:
    """qemu-storage-daemon: found, its version, and whether it has FUSE exports."""
    name = "qemu-storage-daemon"
    path = shutil.which(binary)
    if path is None:
        return Check(
            name,
            False,
            "not found on PATH",
            _apt("qemu-system-common") + "; from QEMU 10 on it is in qemu-utils",
        ), None
    info = qemuinfo.probe(path)
    if info is None:
        return Check(
            name,
            False,
            f"{path} did not answer on its monitor",
            f"run '{path} --version' to see why it does not start",
            facts={"path": path},
        ), None
    version = versions.describe(info.version)
    facts: dict[str, object] = {
        "path": path,
        "version": version,
        "fuse_export": info.fuse_export,
        "multiqueue_fuse": info.multiqueue_fuse,
    }
    if info.fuse_export is False:
        return Check(
            name,
            False,
            f"{path}, QEMU {version}, built without FUSE exports",
            "install a QEMU built with FUSE (Debian's qemu-system-common is; QEMU 6.0 or later)",
            facts=facts,
        ), info
    fuse = "FUSE exports" if info.fuse_export else "FUSE exports not told by its schema"
    queues = "multi-queue" if info.multiqueue_fuse else "single-queue"
    return Check(name, True, f"{path}, QEMU {version}, {fuse} ({queues})", facts=facts), info


def chosen(info: qemuinfo.QemuInfo | None) -> Check:
    """What an export with default options would choose on this QEMU (`choices.for_qemu`)."""
    tuning = choices.for_qemu(Tuning(), info, iothreads=None)

    def aio(fmt: str, *, writable: bool) -> str:
        spec = ImageSpec(fmt, (Layer(fmt, fmt),), fmt, writable=writable)
        return default_aio(spec, tuning) or "threads"

    facts: dict[str, object] = {
        "write_guard": tuning.write_guard,
        "hole_guard": tuning.hole_guard,
        "aio_read_only": aio("qcow2", writable=False),
        "aio_writable": aio("qcow2", writable=True),
        "aio_vmdk": aio("vmdk", writable=False),
        "iothreads": tuning.iothreads,
        "multiqueue": tuning.multiqueue,
    }
    guard = "on (writes one at a time)" if tuning.write_guard else "off (QEMU has the fix)"
    detail = (
        f"write guard {guard}; aio {facts['aio_read_only']} read-only, "
        f"{facts['aio_writable']} writable, {facts['aio_vmdk']} near a vmdk; "
        f"{tuning.iothreads} iothreads"
    )
    if tuning.hole_guard:
        detail += "; punched holes refused (QEMU < 8.0 may keep their data)"
    return Check("choices", True, detail, facts=facts)


def fusectl(info: qemuinfo.QemuInfo | None, *, root: bool) -> Check:
    """fusectl, through which the write guard limits a FUSE connection (QEMU without the fix)."""
    mounted = any(entry.fstype == "fusectl" for entry in mounts.read_mounts())
    needed = choices.for_qemu(Tuning(), info, iothreads=None).write_guard
    why = "the write guard needs it on this QEMU" if needed else "not needed on this QEMU"
    if mounted:
        return Check("fusectl", True, f"mounted on {mounts.FUSECTL}", needed=needed)
    if root or not needed:
        mounter = "root mounts it when needed" if needed else "no export needs it"
        return Check("fusectl", True, f"not mounted; {mounter} ({why})", needed=needed)
    return Check(
        "fusectl",
        False,
        f"not mounted on {mounts.FUSECTL}: {why}; writable exports then warn that concurrent "
        "writes may be stored wrongly",
        f"mount -t fusectl fusectl {mounts.FUSECTL} (as root; systemd does it at boot)",
        needed=needed,
    )


def mount_fs_drivers() -> Check:
    """The userspace filesystem drivers --mount-fs runs."""
    found = {d.fs: shutil.which(d.program) for d in DRIVERS.values()}
    have = [f"{d.program} ({d.fs})" for d in DRIVERS.values() if found[d.fs]]
    missing = [d for d in DRIVERS.values() if not found[d.fs]]
    facts: dict[str, object] = {fs: path for fs, path in found.items()}
    detail = ", ".join(have) or "none"
    if not missing:
        return Check("--mount-fs drivers", True, detail, needed=False, facts=facts)
    lacking = ", ".join(f"{d.fs} ({d.program})" for d in missing)
    return Check(
        "--mount-fs drivers",
        False,
        f"{detail}; missing for {lacking}",
        _apt(*sorted({d.package for d in missing})),
        needed=False,
        facts=facts,
    )


def registry() -> Check:
    """The runtime registry that --list and --stop read: writable where it is, or can be made."""
    where = registry_dir()
    existing = where
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if os.access(existing, os.W_OK | os.X_OK) and os.path.isdir(existing):
        detail = where if existing == where else f"{where} (made on first export)"
        return Check("registry", True, detail, facts={"path": where})
    return Check(
        "registry",
        False,
        f"{where}: {existing} is not writable for us",
        "set XDG_RUNTIME_DIR to a folder of yours (systemd's /run/user/UID)",
        facts={"path": where},
    )


def open_files(info: qemuinfo.QemuInfo | None) -> Check:
    """RLIMIT_NOFILE: each export holds descriptors in qemu-storage-daemon, which inherits it:
    its file, and /dev/fuse once per queue (`BlockGraph.descriptors`)."""
    tuning = choices.for_qemu(Tuning(), info, iothreads=None)
    per_export = 1 + (tuning.iothreads if tuning.multiqueue else 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def shown(n: int) -> str:
        return "unlimited" if n == resource.RLIM_INFINITY else str(n)

    facts: dict[str, object] = {"soft": soft, "hard": hard}
    # Each daemon serves at most SHARD_SIZE images and gets the soft limit they need, up to the
    # hard limit (engine/limits.py): the hard limit is what counts.
    need = limits.descriptors_needed(per_export * limits.SHARD_SIZE)
    ok = hard == resource.RLIM_INFINITY or hard >= need
    if ok:
        detail = (
            f"soft {shown(soft)}, hard {shown(hard)}: any number of images (each "
            f"qemu-storage-daemon, of at most {limits.SHARD_SIZE}, gets the {need} it needs)"
        )
    else:
        most = max(0, (hard - limits.BASE_DESCRIPTORS) * 10 // 11 // per_export)
        detail = f"soft {shown(soft)}, hard {shown(hard)}: at most about {most} images at once"
    remedy = (
        ""
        if ok
        else f"raise the hard limit to {need} or more (ulimit -Hn as root; systemd: LimitNOFILE=)"
    )
    return Check("open files", ok, detail, remedy, needed=False, facts=facts)


def machine(*, allow_other_mode: AllowOther = "auto") -> list[Check]:
    """Every check of the machine, in the order a user reads them."""
    root = os.geteuid() == 0
    daemon, info = qemu()
    return [
        fuse_device(),
        fusermount(root=root),
        allow_other(root=root, mode=allow_other_mode),
        user(root=root),
        daemon,
        *([chosen(info)] if info is not None else []),
        fusectl(info, root=root),
        mount_fs_drivers(),
        registry(),
        open_files(info),
    ]


def image(path: str, options: ImageOptions) -> Check:
    """What detection says of one image, and how a default export would open it."""
    from fuse_disk_export import images, logs

    with logs.WarningCollector() as warnings, mounts.one_reading():
        try:
            resolved = images.resolve(path, options)
        except FdeError as e:
            return Check(path, False, e.reason if e.path else str(e), _IMAGE_REMEDY)
    spec, info = resolved.spec, resolved.info
    read_only = not spec.writable
    # What an export would say once live, too.
    said = [*warnings.messages, *([f"{spec.image}: {resolved.note}"] if resolved.note else [])]
    facts: dict[str, object] = {
        "path": spec.image,
        "format": spec.layers[0].format,
        "virtual_size": info.virtual_size,
        "backing": list(resolved.chain),
        "encrypted": info.encrypted,
        "read_only": read_only,
        "warnings": said,
    }
    size = f"{info.virtual_size} bytes" if info.virtual_size is not None else "size unknown"
    parts = [spec.layers[0].format, size]
    if resolved.chain:
        parts.append("backing " + " -> ".join(resolved.chain))
    elif info.backing_file:
        parts.append(f"backing {info.backing_file!r} (--backing {spec.backing})")
    if info.encrypted:
        parts.append("encrypted (a passphrase is asked for)")
    if read_only:
        why = "; ".join(said) or "as asked"
        parts.append(f"exported read-only: {why}")
    else:
        parts.append("exported writable")
    return Check(spec.image, True, ", ".join(parts), facts=facts)


_IMAGE_REMEDY = "see the reason; fuse-disk-export -v IMAGE shows more"


def healthy(checks: Sequence[Check]) -> bool:
    """Everything a default export needs works."""
    return all(c.ok for c in checks if c.needed)


def as_json(checks: Sequence[Check], images: Sequence[Check]) -> dict[str, object]:
    """What ``--doctor --json`` prints."""

    def one(c: Check) -> dict[str, object]:
        return {
            "name": c.name,
            "ok": c.ok,
            "needed": c.needed,
            "detail": c.detail,
            "remedy": c.remedy or None,
            **c.facts,
        }

    return {
        "ok": healthy([*checks, *images]),
        "checks": [one(c) for c in checks],
        "images": [one(c) for c in images],
    }


def lines(checks: Sequence[Check], *, marks: tuple[str, str] = ("✔", "✘")) -> list[str]:
    """Each check on one line, its remedy under a failed one: the plain-text report."""
    out: list[str] = []
    for c in checks:
        optional = "" if c.ok or c.needed else " (not needed for a default export)"
        out.append(f"{marks[0] if c.ok else marks[1]} {c.name}: {c.detail}{optional}")
        if not c.ok and c.remedy:
            out.append(f"    fix: {c.remedy}")
    return out
