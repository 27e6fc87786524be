"""The block graph as pure data, and how qemu-storage-daemon is told to bring it up.

Nothing here starts a process or touches a file: given what the images are (already probed and
checked), `plan` decides node names, options and order.  `BlockGraph.command_line` renders it as
qemu-storage-daemon's ``--object``/``--blockdev``/``--nbd-server``/``--export`` options, each with
the same JSON a QMP command would take: the daemon brings everything up before it even answers
QMP.  Every path is absolute and travels inside JSON, so QEMU never parses it as its comma option
syntax or as a ``protocol:`` prefix; a secret travels as a ``/dev/fd/N`` to read it from, never as
text on a command line.
"""

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, NamedTuple

Backing = Literal["safe", "none", "any"]
AllowOther = Literal["auto", "on", "off"]

# Formats whose QEMU driver accepts a "backing" option.  For the others, naming one is an error.
BACKING_FORMATS = frozenset({"qcow2", "qcow", "qed", "vmdk"})


class Command(NamedTuple):
    """One QMP command, its name and arguments: rendered as the daemon option that does the same
    (`OPTIONS`), never sent over QMP."""

    name: str
    args: dict[str, object]


#: The qemu-storage-daemon option that does what each QMP command does.
OPTIONS = {
    "object-add": "--object",
    "blockdev-add": "--blockdev",
    "nbd-server-start": "--nbd-server",
    "block-export-add": "--export",
}


class Step(NamedTuple):
    """A command that adds something, and the image it is for (for errors).

    Nothing is removed one by one: stopping the daemon (SIGTERM, as ``quit``) removes every
    export, then flushes and closes every node, in that order.
    """

    image: str
    do: Command

    def option(self) -> tuple[str, str]:
        """This step as a qemu-storage-daemon option and its JSON argument."""
        args = self.do.args
        if self.do.name == "nbd-server-start":
            # The option takes NbdServerOptions, whose address is a flat SocketAddress.
            addr = args["addr"]
            assert isinstance(addr, dict) and isinstance(addr.get("data"), dict)
            args = {**args, "addr": {"type": addr["type"], **addr["data"]}}
        return OPTIONS[self.do.name], json.dumps(args, separators=(",", ":"))


class Layer(NamedTuple):
    """One file of an image's chain: absolute path, QEMU format driver, opened read-only or not."""

    path: str
    format: str
    read_only: bool = False


class Slice(NamedTuple):
    """A byte range of the virtual disk exported on its own (a partition)."""

    offset: int
    size: int


class ImageSpec(NamedTuple):
    """Everything the planner needs about one image to export.

    :param image: the image as the user named it, for messages.
    :param layers: the image first, then its backing files in order (only with backing="safe").
    :param backing: "safe" opens exactly ``layers``; "none" opens the top alone; "any" lets QEMU
        follow whatever the header names.
    :param mountpoint: absolute path the FUSE export is mounted on.
    """

    image: str
    layers: tuple[Layer, ...]
    mountpoint: str
    writable: bool
    backing: Backing = "safe"
    data_file: str | None = None
    slice: Slice | None = None
    #: QMP id of the secret object that unlocks the top layer (LUKS, or qcow/qcow2 encrypted).
    key_secret: str | None = None
    #: How a qcow/qcow2 top layer is encrypted ("luks" or "aes"): --blockdev wants it said.
    encryption: str = "luks"
    #: A qcow2 that takes every write: temporary and empty (``--snapshot``), or the user's
    #: (``--overlay FILE``).  Opened read-only where the export is.
    overlay: str | None = None
    #: Unix socket of a read-only NBD server standing in for ``layers`` (``--load-snapshot``).
    nbd_source: str | None = None
    #: A file of the image (a layer, its data file) has a size that is not a multiple of 512: a
    #: read of its end comes back short (`Tuning.io_uring_short_reads`).
    odd_sized: bool = False
    #: The virtual size in bytes, where the probe knows it (`_fixed_size`).
    size: int | None = None


class Tuning(NamedTuple):
    """Options that apply to every image of an invocation."""

    allow_other: AllowOther = "auto"
    cache_direct: bool = False
    cache_no_flush: bool = False
    #: Flush after every write (qemu-nbd's writethrough and directsync cache modes).
    writethrough: bool = False
    aio: str | None = None
    discard: str = "unmap"
    detect_zeroes: str = "off"
    #: Also serve every exported node over NBD on this Unix socket (absolute path).
    nbd_socket: str | None = None
    #: Keep writes one at a time: this QEMU's FUSE export can mix up concurrent writes.
    write_guard: bool = True
    #: Exports read through io_uring unless ``aio`` says otherwise (`default_aio`).
    io_uring: bool = True
    #: This QEMU completes an io_uring read cut short by the end of a file (`default_aio`).
    io_uring_short_reads: bool = False
    #: I/O threads every FUSE export runs in (0: the main loop, QEMU's default).
    iothreads: int = 0
    #: The FUSE export takes a list of iothreads and serves its queue from all of them (one
    #: iothread otherwise: the node moves into it).
    multiqueue: bool = False
    #: Make a punched hole in a writable FUSE export fail (EOPNOTSUPP) rather than keep old data
    #: (QEMU < 8.0 turns it into an advisory discard): see `_hole_guard`.
    hole_guard: bool = False


class ExportPlan(NamedTuple):
    """One FUSE export of the graph: what users will see and where."""

    export_id: str
    image: str
    node_name: str
    mountpoint: str
    writable: bool
    nbd_name: str | None = None
    #: Opening and closing the export once (a flush) arms the hole guard (`_hole_guard`).
    hole_guard: bool = False


class BlockGraph(NamedTuple):
    """Nodes and exports of one invocation, as phases of steps.

    Steps within a phase do not depend on one another's *success* being known in advance, so they
    can be sent back to back (QEMU runs them in order); a phase starts only when the previous one
    has fully succeeded.
    """

    phases: tuple[tuple[Step, ...], ...]
    exports: tuple[ExportPlan, ...] = ()
    #: See `Tuning.write_guard`.
    write_guard: bool = True
    #: Some node reads through io_uring that the user did not ask for (`default_aio`).
    default_io_uring: bool = False

    def all_steps(self) -> Iterable[Step]:
        for phase in self.phases:
            yield from phase

    def command_line(self) -> list[str]:
        """qemu-storage-daemon's options for the whole graph, in order: secrets and nodes first
        (most failures then happen before anything is mounted), the NBD server, the exports."""
        argv: list[str] = []
        for step in self.all_steps():
            argv.extend(step.option())
        return argv

    def describe(self) -> list[str]:
        """Human-readable lines for ``-v``: every option in order (secrets are file names)."""
        return [" ".join(s.option()) for s in self.all_steps()]

    def descriptors(self) -> int:
        """About how many descriptors qemu-storage-daemon holds for this graph: one per file or
        NBD connection it opens as a node, one per FUSE export and queue (/dev/fuse), one for
        the NBD server.  Files QEMU opens without a node of ours (vmdk extents, a backing chain it
        follows itself) are not counted.  The count sizes the daemon's descriptor table and its
        RLIMIT_NOFILE (`limits`), with a margin."""
        held = 0
        for step in self.all_steps():
            args = step.do.args
            if step.do.name == "blockdev-add":
                held += args.get("driver") in _HOLDS_A_DESCRIPTOR
            elif step.do.name == "block-export-add" and args.get("type") == "fuse":
                # A multi-queue export opens /dev/fuse once per iothread (11.1.3: 4 of 4).
                threads = args.get("iothread")
                held += len(threads) if isinstance(threads, list) else 1
            elif step.do.name == "nbd-server-start":
                held += 1
        return held


#: Block drivers whose node keeps a descriptor open (a file, a device, an NBD socket).
_HOLDS_A_DESCRIPTOR = frozenset({"file", "host_device", "host_cdrom", "nbd"})


def _node_prefix(index: int) -> str:
    # Node names are limited to 31 characters in QEMU; keep them short and unique per invocation.
    return f"fde{index}"


def _common(tuning: Tuning) -> dict[str, object]:
    # Options equal to QEMU's defaults are left out: each one costs QEMU time per node, which
    # adds up to tens of milliseconds with a hundred images (docs/archive/, round 1).
    args: dict[str, object] = {"discard": tuning.discard}  # QEMU's default is "ignore"
    if tuning.cache_direct or tuning.cache_no_flush:
        args["cache"] = {"direct": tuning.cache_direct, "no-flush": tuning.cache_no_flush}
    if tuning.detect_zeroes != "off":
        args["detect-zeroes"] = tuning.detect_zeroes
    return args


def _protocol_node(
    name: str, path: str, read_only: bool, tuning: Tuning, aio: str | None = None
) -> dict[str, object]:
    args: dict[str, object] = {
        "driver": "file",
        "node-name": name,
        "filename": path,
        "read-only": read_only,
        **_common(tuning),
    }
    aio = tuning.aio or aio
    if aio is not None:
        args["aio"] = aio
    return args


def default_aio(spec: ImageSpec, tuning: Tuning) -> str | None:
    """The AIO backend of a spec's files when the user chose none.

    io_uring: random reads at QD16 more than double (docs/performance.md).  Not for writable
    exports the write guard keeps to one request at a time (no gain), and not where a read can
    come back short (a vmdk's descriptor, a file whose size is not a multiple of 512) on a QEMU
    that then hangs for good (`Tuning.io_uring_short_reads`).  A QEMU or kernel without io_uring
    makes the setup fall back to the thread pool.
    """
    if tuning.aio is not None or not tuning.io_uring or (spec.writable and tuning.write_guard):
        return None
    if not tuning.io_uring_short_reads and may_read_short(spec):
        return None
    return "io_uring"


def may_read_short(spec: ImageSpec) -> bool:
    """Whether reading ``spec`` through QEMU may read past the end of one of its files."""
    return spec.odd_sized or any(layer.format == "vmdk" for layer in spec.layers)


def _format_node(
    name: str, layer: Layer, file_node: str, read_only: bool, tuning: Tuning
) -> dict[str, object]:
    return {
        "driver": layer.format,
        "node-name": name,
        "file": file_node,
        "read-only": read_only,
        **_common(tuning),
    }


#: ENOSYS: the kernel's FUSE client then answers every later fallocate on the mount with
#: EOPNOTSUPP itself, the answer every zeroing tool falls back from (to writing zeroes).
_ENOSYS = 38
#: blkdebug's rules are armed by an event on its node, which comes from the raw node above it: a
#: flush of the export, which closing a descriptor of it sends (writeguard arms every guard so,
#: before live; a read as well cost 1 ms more for 128 images).  An event that has no rules leaves
#: the armed ones as they are, so one rule keeps the guard armed for good; each rule more cost
#: about 15 µs per image in qemu-storage-daemon's start-up (scripts/bench).
_ARMING_EVENTS = ("flush_to_os",)


def _hole_guard(prefix: str, below: str) -> dict[str, object]:
    """A filter that fails every discard reaching it with ENOSYS.

    QEMU before 8.0 turns ``fallocate(PUNCH_HOLE)`` on a FUSE export into a discard, which formats
    without discard support (and qcow2 ranges short of a cluster) drop while reporting success:
    zeroing tools then leave old data in place.  ``bdrv_co_pdiscard`` swallows ENOTSUP, so the
    error must be another; with ENOSYS the kernel turns fallocate off for the mount, and callers
    (qemu-img convert -n, nbdcopy, loop devices) fall back to writing zeroes.
    """
    return {
        "driver": "blkdebug",
        "node-name": f"{prefix}-nohole",
        "image": below,
        # Discards must reach this node to be refused (the default "ignore" drops them above).
        "discard": "unmap",
        "inject-error": [
            {"event": event, "iotype": "discard", "errno": _ENOSYS} for event in _ARMING_EVENTS
        ],
    }


def _image_steps(index: int, spec: ImageSpec, tuning: Tuning) -> tuple[list[Step], str]:
    """Steps that open one image (bottom of the chain first) and the node to export."""
    prefix = _node_prefix(index)
    steps: list[Step] = []

    def add(args: dict[str, object]) -> str:
        name = str(args["node-name"])
        steps.append(Step(spec.image, Command("blockdev-add", args)))
        return name

    aio = default_aio(spec, tuning)
    below = add(_nbd_client(prefix, spec.nbd_source)) if spec.nbd_source else None
    layers = () if spec.nbd_source else spec.layers if spec.backing == "safe" else spec.layers[:1]
    # Open from the bottom of the chain up, so each overlay can name the node below it.
    for depth in range(len(layers) - 1, -1, -1):
        layer = layers[depth]
        top = depth == 0
        read_only = layer.read_only or not (top and spec.writable)
        file_node = add(_protocol_node(f"{prefix}-file{depth}", layer.path, read_only, tuning, aio))
        fmt = _format_node(f"{prefix}-fmt{depth}", layer, file_node, read_only, tuning)
        if layer.format in BACKING_FORMATS:
            if spec.backing == "none" or (spec.backing == "safe" and below is None):
                fmt["backing"] = None
            elif below is not None:
                fmt["backing"] = below
        if top and spec.data_file is not None:
            fmt["data-file"] = add(
                _protocol_node(f"{prefix}-data", spec.data_file, read_only, tuning, aio)
            )
        if top and spec.key_secret is not None:
            if layer.format == "luks":
                fmt["key-secret"] = spec.key_secret
            else:
                fmt["encrypt"] = {"format": spec.encryption, "key-secret": spec.key_secret}
        below = add(fmt)
    assert below is not None, "an image has at least one layer"
    if spec.overlay is not None:
        # The overlay's backing is the node already open, never a path: the image's own path
        # is about to be mounted over.
        read_only = not spec.writable
        overlay_file = add(_protocol_node(f"{prefix}-ovlfile", spec.overlay, read_only, tuning))
        below = add(
            {
                "driver": "qcow2",
                "node-name": f"{prefix}-overlay",
                "file": overlay_file,
                "backing": below,
                "read-only": read_only,
                **_common(tuning),
            }
        )
    hole_guard = tuning.hole_guard and spec.writable and tuning.nbd_socket is None
    if hole_guard:
        below = add(_hole_guard(prefix, below))
    fixed = _fixed_size(spec, tuning)
    if spec.slice is not None or hole_guard or fixed is not None:
        # A raw node on top: the partition's byte range, the size a truncate must not change,
        # and the events that arm the guard.
        view: dict[str, object] = {
            "driver": "raw",
            "node-name": f"{prefix}-part" if spec.slice is not None else f"{prefix}-top",
            "file": below,
            "read-only": not spec.writable,
        }
        if spec.slice is not None:
            view.update(offset=spec.slice.offset, size=spec.slice.size)
        elif fixed is not None:
            view.update(size=fixed, discard=tuning.discard)
        if hole_guard:
            view["discard"] = "unmap"
        below = add(view)
    return steps, below


#: Format drivers that QEMU does not keep safe when several I/O threads write at once (one
#: multi-queue export): QEMU 11.1.3 aborts writing a qed under fio with four ("Assertion
#: `s->allocating_acb == NULL' failed" in qed_aio_write_alloc: the daemon dies, the writes in
#: flight are lost); one thread writes it safely.
SINGLE_QUEUE_FORMATS = frozenset({"qed"})


def single_queue_image(specs: Sequence[ImageSpec]) -> str | None:
    """The first image that must be written from one I/O thread (`SINGLE_QUEUE_FORMATS`)."""
    for spec in specs:
        if spec.writable and spec.overlay is None and spec.layers[0].format in SINGLE_QUEUE_FORMATS:
            return spec.image
    return None


def _fixed_size(spec: ImageSpec, tuning: Tuning) -> int | None:
    """The size a writable FUSE export is held to, where the node it writes to is a qcow2 (the
    image, or an overlay): from QEMU 8.0 on a truncate of the export (``dd`` without
    ``conv=notrunc``, ``truncate``) resizes a qcow2 for good, and a raw node with a size refuses
    it (EOPNOTSUPP), as a disk would.  The other formats' drivers refuse it themselves, and
    before 8.0 the hole guard's raw node does.  The header's size, to whole sectors: QEMU's
    own length of the node."""
    if spec.size is None or not spec.writable or tuning.nbd_socket is not None:
        return None
    if spec.overlay is None and spec.layers[0].format != "qcow2":
        return None
    return spec.size // 512 * 512


def _nbd_client(prefix: str, socket_path: str) -> dict[str, object]:
    return {
        "driver": "nbd",
        "node-name": f"{prefix}-snap",
        "server": {"type": "unix", "path": socket_path},
        "read-only": True,
    }


def _secret_steps(secret_files: Mapping[str, str]) -> list[Step]:
    return [
        Step(
            f"secret {key}",
            Command("object-add", {"qom-type": "secret", "id": key, "file": path}),
        )
        for key, path in secret_files.items()
    ]


def nbd_names(specs: Sequence[ImageSpec]) -> list[str]:
    """NBD export names: each image's file name, made unique within the invocation.

    A single image is also the server's default export (`DEFAULT_NBD_NAME`, see `_nbd_steps`).
    """
    names: list[str] = []
    for spec in specs:
        name = os.path.basename(spec.mountpoint)
        candidate, n = name, 1
        while candidate in names:
            n += 1
            candidate = f"{name}.{n}"
        names.append(candidate)
    return names


def _nbd_steps(
    specs: Sequence[ImageSpec], tops: Sequence[str], tuning: Tuning, socket_path: str
) -> tuple[list[Step], list[str]]:
    names = nbd_names(specs)
    steps = [
        Step(
            socket_path,
            Command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": socket_path}}}),
        )
    ]
    for index, (spec, top, name) in enumerate(zip(specs, tops, names, strict=True)):
        export_id = f"{_node_prefix(index)}-nbd"
        args: dict[str, object] = {
            "type": "nbd",
            "id": export_id,
            "node-name": top,
            "name": name,
            "writable": spec.writable,
            "allocation-depth": True,
            "writethrough": tuning.writethrough,
        }
        steps.append(Step(spec.image, Command("block-export-add", args)))
        if len(specs) == 1:
            # What qemu-nbd serves without -x, and so what an URI without a name
            # ("nbd+unix:///?socket=...") asks for.  One node takes two NBD exports.
            default = {**args, "id": f"{export_id}-default", "name": DEFAULT_NBD_NAME}
            steps.append(Step(spec.image, Command("block-export-add", default)))
    return steps, names


#: The name of the NBD export a client gets when it names none.
DEFAULT_NBD_NAME = ""


def plan(
    specs: Sequence[ImageSpec],
    tuning: Tuning | None = None,
    secret_files: Mapping[str, str] | None = None,
) -> BlockGraph:
    """Plan the graph that exports every image in ``specs`` through one qemu-storage-daemon.

    Phase 1 opens every image; phase 2 mounts every export.  The image file is open before its
    own path is mounted over, which is what lets an image be exported on itself.

    :param secret_files: secret id -> file QEMU reads the passphrase from (``/dev/fd/N``).

    With ``tuning.nbd_socket``, each node is also exported over NBD.  QEMU 7.2 lets a writable
    FUSE export take the "resize" permission, which an NBD export never shares, so the two cannot
    both be on one node unless the FUSE side is read-only; the NBD side keeps the writes (a
    writable NBD export does not need "resize").
    """
    tuning = tuning or Tuning()
    opens: list[Step] = _secret_steps(secret_files or {})
    threads = [f"fde-io{i}" for i in range(tuning.iothreads)]
    opens[:0] = [
        Step("iothread", Command("object-add", {"qom-type": "iothread", "id": t})) for t in threads
    ]
    iothread: dict[str, object] = {}
    if threads:
        # A list is QEMU's multi-queue form: the export's queue is read by every thread at once.
        iothread["iothread"] = threads if tuning.multiqueue else threads[0]
    mounts: list[Step] = []
    exports: list[ExportPlan] = []
    tops: list[str] = []
    for index, spec in enumerate(specs):
        steps, top = _image_steps(index, spec, tuning)
        opens.extend(steps)
        tops.append(top)
        fuse_writable = spec.writable and tuning.nbd_socket is None
        export_id = f"{_node_prefix(index)}-export"
        mounts.append(
            Step(
                spec.image,
                Command(
                    "block-export-add",
                    {
                        "type": "fuse",
                        "id": export_id,
                        "node-name": top,
                        "mountpoint": spec.mountpoint,
                        "writable": fuse_writable,
                        "allow-other": tuning.allow_other,
                        "writethrough": tuning.writethrough,
                        **iothread,
                    },
                ),
            )
        )
        exports.append(
            ExportPlan(
                export_id,
                spec.image,
                top,
                spec.mountpoint,
                fuse_writable,
                hole_guard=tuning.hole_guard and fuse_writable,
            )
        )
    if tuning.nbd_socket is not None:
        # NBD exports go first: were they to fail, no FUSE mount has been made yet.
        nbd, names = _nbd_steps(specs, tops, tuning, tuning.nbd_socket)
        mounts[:0] = nbd
        exports = [e._replace(nbd_name=n) for e, n in zip(exports, names, strict=True)]
    return BlockGraph(
        (tuple(opens), tuple(mounts)),
        tuple(exports),
        tuning.write_guard,
        any(default_aio(spec, tuning) for spec in specs),
    )
