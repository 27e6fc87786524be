"""The systems under test: a raw file, qemu-storage-daemon FUSE exports written by hand (with the
default options and with each candidate default), fuse-disk-export itself, and qemu-nbd + nbdfuse.

Each target brings its export up (`up` returns the path fio should use), and takes it down again
(`down`), waiting on the conditions that prove it: pid file, mountinfo, process exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from benchmarks.context import Ctx
from benchmarks.proc import (
    BenchError,
    DirWatch,
    MountWatch,
    Owned,
    children,
    exited,
    file_gone,
    file_present,
    mounted,
    mountpoints,
    read_pid_file,
    run,
    status_kib,
    unmounted,
    wait_all,
)

UP_TIMEOUT = 60.0
DOWN_TIMEOUT = 30.0


# ---------------------------------------------------------------------------------------------
# qemu-storage-daemon command lines, as a user writes them


def keyval(options: Mapping[str, object], prefix: str = "") -> list[str]:
    """QEMU's dotted key=value syntax: {"cache": {"direct": True}} -> ["cache.direct=on"]."""
    out: list[str] = []
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(keyval(value, f"{name}."))
        elif isinstance(value, bool):
            out.append(f"{name}={'on' if value else 'off'}")
        else:
            text = str(value)
            if "," in text:
                raise BenchError(f"a comma in {text!r} would break QEMU's option syntax")
            out.append(f"{name}={text}")
    return out


@dataclass(frozen=True)
class QsdOptions:
    """What differs between hand-written qemu-storage-daemon command lines."""

    file: Mapping[str, object] = field(default_factory=dict)
    fmt: Mapping[str, object] = field(default_factory=dict)
    export: Mapping[str, object] = field(default_factory=dict)
    objects: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"--object {o}" for o in self.objects]
        parts += [f"file: {','.join(keyval(self.file))}"] if self.file else []
        parts += [f"qcow2: {','.join(keyval(self.fmt))}"] if self.fmt else []
        parts += [f"export: {','.join(keyval(self.export))}"] if self.export else []
        return "; ".join(parts) or "defaults"


def qsd_argv(
    exports: Sequence[tuple[str, str]], pid_file: str, options: QsdOptions = QsdOptions()
) -> list[str]:
    """``qemu-storage-daemon --blockdev ... --export ... --daemonize --pidfile``: one file node,
    one qcow2 node and one writable FUSE export per (image, mountpoint), all paths absolute."""
    argv = ["qemu-storage-daemon"]
    for obj in options.objects:
        argv += ["--object", obj]
    for i, (image, mountpoint) in enumerate(exports):
        if not (os.path.isabs(image) and os.path.isabs(mountpoint)):
            raise BenchError("hand QEMU absolute paths only")
        file_node = {"driver": "file", "node-name": f"file{i}", "filename": image, **options.file}
        fmt_node = {"driver": "qcow2", "node-name": f"fmt{i}", "file": f"file{i}", **options.fmt}
        export = {
            "type": "fuse",
            "id": f"exp{i}",
            "node-name": f"fmt{i}",
            "mountpoint": mountpoint,
            "writable": True,
            **options.export,
        }
        argv += ["--blockdev", ",".join(keyval(file_node))]
        argv += ["--blockdev", ",".join(keyval(fmt_node))]
        argv += ["--export", ",".join(keyval(export))]
    return [*argv, "--daemonize", "--pidfile", pid_file]


# ---------------------------------------------------------------------------------------------
# start and stop, with the timings the start-up benchmark wants


@dataclass
class Live:
    """A running export: its serving process, that process's children, and the paths."""

    main: Owned
    others: list[Owned]
    paths: list[str]
    pid_file: str | None
    live_s: float

    def hwm_kib(self) -> dict[str, int]:
        """Peak RSS (VmHWM) of the serving process and of each child, in KiB."""
        out = {}
        for owned in [self.main, *self.others]:
            value = status_kib(owned.pid, "VmHWM")
            if value is not None:
                out[f"{owned.name} {owned.pid}"] = value
        return out


def _communicate(ctx: Ctx, owned: Owned, what: str) -> None:
    assert owned.popen is not None
    try:
        _, err = owned.popen.communicate(timeout=UP_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{what} did not return within {UP_TIMEOUT} s") from e
    ctx.janitor.forget(owned)
    if owned.popen.returncode != 0:
        text = err.decode(errors="replace").strip() if err else ""
        raise BenchError(f"{what} failed ({owned.popen.returncode}): {text}")


def _check_live(paths: Sequence[str], what: str) -> None:
    missing = sorted(set(paths) - mountpoints())
    if missing:
        raise BenchError(
            f"{what} returned, but {len(missing)} path(s) are not mounted: {missing[0]}"
        )


def start_fde(ctx: Ctx, images: Sequence[str], pid_file: str, extra: Sequence[str] = ()) -> Live:
    """``fuse-disk-export -dp PID_FILE IMAGE...``; live when the invoking process returns."""
    ctx.janitor.mounts.update(images)
    t0 = time.monotonic()
    invoking = ctx.janitor.spawn(
        [*ctx.tool, "-dp", pid_file, *extra, *images],
        "fuse-disk-export -dp",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ctx.env,
        cwd=ctx.work,
    )
    _communicate(ctx, invoking, "fuse-disk-export -dp")
    live_s = time.monotonic() - t0
    pid = read_pid_file(pid_file)
    main = ctx.janitor.adopt(pid, "fuse-disk-export")
    others = [ctx.janitor.adopt(k, "qemu-storage-daemon") for k in children(pid)]
    _check_live(images, "fuse-disk-export -dp")
    return Live(main, others, list(images), pid_file, live_s)


def start_qsd(
    ctx: Ctx, exports: Sequence[tuple[str, str]], pid_file: str, options: QsdOptions = QsdOptions()
) -> Live:
    """``qemu-storage-daemon ... --daemonize --pidfile``; live when the invoking process returns."""
    paths = [mp for _, mp in exports]
    ctx.janitor.mounts.update(paths)
    t0 = time.monotonic()
    invoking = ctx.janitor.spawn(
        qsd_argv(exports, pid_file, options),
        "qemu-storage-daemon --daemonize",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ctx.work,
    )
    _communicate(ctx, invoking, "qemu-storage-daemon --daemonize")
    live_s = time.monotonic() - t0
    main = ctx.janitor.adopt(read_pid_file(pid_file), "qemu-storage-daemon")
    _check_live(paths, "qemu-storage-daemon --daemonize")
    return Live(main, [], paths, pid_file, live_s)


def start_qsd_safe(ctx: Ctx, images: Sequence[str], pid_file: str) -> Live:
    """By hand, but just as safe as fuse-disk-export: the graph it gives qemu-storage-daemon
    (on QEMU before 8.0, the punched-hole guard's two nodes per image) on the command line, with
    ``--daemonize``; then, as a careful user must, the guard applied (a flush of every export
    arms it, and max_background=1 on every FUSE connection), which counts towards live."""
    from fuse_disk_export import choices, cli, registry
    from fuse_disk_export.engine import qemuinfo, writeguard
    from fuse_disk_export.engine.graph import plan
    from fuse_disk_export.engine.process import find_binary
    from fuse_disk_export.request import build_request

    binary = find_binary()
    info = qemuinfo.of(binary, os.path.join(registry.registry_dir(), qemuinfo.CACHE))
    version = info.version if info is not None else None
    options = cli.options_from(cli.build_parser().parse_args(list(images)))
    request = build_request(options, ask_passphrase=None)
    tuning = choices.for_qemu(request.tuning, info, iothreads=request.iothreads)
    graph = plan([r.spec for r in request.images], tuning)
    ctx.janitor.mounts.update(images)
    t0 = time.monotonic()
    invoking = ctx.janitor.spawn(
        [binary, *graph.command_line(), "--daemonize", "--pidfile", pid_file],
        "qemu-storage-daemon --daemonize (as safe)",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ctx.work,
    )
    _communicate(ctx, invoking, "qemu-storage-daemon --daemonize (as safe)")
    writeguard.protect(graph, version or (0, 0, 0))
    live_s = time.monotonic() - t0
    main = ctx.janitor.adopt(read_pid_file(pid_file), "qemu-storage-daemon")
    _check_live(list(images), "qemu-storage-daemon --daemonize (as safe)")
    return Live(main, [], list(images), pid_file, live_s)


def stop(
    ctx: Ctx, live: Live, sig: int = signal.SIGINT, *, watch_mounts: bool = True
) -> dict[str, float]:
    """Signal the serving process; return seconds from the signal to each of: its exit, each
    child's exit, the paths leaving mountinfo, the pid file's removal.

    :param watch_mounts: watch mountinfo for the paths leaving it.  Its every change wakes the
        watcher, which re-reads the whole table, under the lock each unmount takes, on one of
        the CPUs the unmounts need: 128 unmounts take about twice as long watched, whoever
        unmounts (docs/archive/2026-12-benchmarks-rounds-1-5.md, "Round 5").  Without, only the
        pid file and the exits are waited on, as a script does, and the paths must be unmounted
        by the time the pid file is gone (they are: each removes its pid file after
        unmounting); "unmounted" is then that moment.
    """
    if not watch_mounts and not live.pid_file:
        raise BenchError("a stop without watching mountinfo needs a pid file")
    pid_dir = os.path.dirname(live.pid_file) if live.pid_file else ctx.work
    with contextlib.ExitStack() as stack:
        dirwatch = stack.enter_context(DirWatch(pid_dir))
        conds = [exited(live.main, "exit")]
        if watch_mounts:
            conds.append(unmounted(stack.enter_context(MountWatch()), live.paths))
        conds += [exited(o, f"exit {o.name}") for o in live.others]
        if live.pid_file:
            conds.append(file_gone(dirwatch, live.pid_file))
        t0 = time.monotonic()
        live.main.signal(sig)
        met = wait_all(conds, DOWN_TIMEOUT, since=t0)
    if not watch_mounts:
        left = set(live.paths) & mountpoints()
        if left:
            raise BenchError(f"pid file gone, but still mounted: {sorted(left)[0]}")
        met["unmounted"] = met["pid file gone"]
    for owned in [live.main, *live.others]:
        ctx.janitor.forget(owned)
    return met


# ---------------------------------------------------------------------------------------------
# I/O targets


class Target:
    """Something fio runs against."""

    key = ""
    label = ""
    note = ""

    def __init__(self, cells: Sequence[str], default: bool = True) -> None:
        self.cells = tuple(cells)
        #: Part of a run without --targets.
        self.default = default

    def up(self, ctx: Ctx) -> str:
        raise NotImplementedError

    def down(self, ctx: Ctx) -> None:
        pass

    def check(self, path: str, size: int) -> None:
        """Before every fio run: the path must be the export, never the image beneath it."""
        if path not in mountpoints():
            raise BenchError(f"{self.label}: {path} is not mounted")
        if os.stat(path).st_size != size:
            raise BenchError(f"{self.label}: {path} is {os.stat(path).st_size} bytes, not {size}")


class RawTarget(Target):
    key = "raw"
    label = "raw file"
    note = "the raw image file itself on the same ext4 (the limit)"

    def up(self, ctx: Ctx) -> str:
        # Buffered reads of a local file come from the page cache: read it once so that the
        # buffered cell measures that, not the disk (the previous repetition's O_DIRECT writes
        # dropped cached pages).
        path = ctx.path("raw.img")
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
        return path

    def check(self, path: str, size: int) -> None:
        if os.stat(path).st_size != size:
            raise BenchError(f"{path} has the wrong size")


class QsdTarget(Target):
    """A qemu-storage-daemon FUSE export written by hand, on a separate empty file."""

    def __init__(
        self,
        key: str,
        label: str,
        cells: Sequence[str],
        options: QsdOptions,
        default: bool = True,
    ) -> None:
        super().__init__(cells, default)
        self.key, self.label, self.options = key, label, options
        self.note = options.describe()
        self._live: Live | None = None

    def up(self, ctx: Ctx) -> str:
        mount = ctx.path("export.raw")
        self._live = start_qsd(
            ctx, [(ctx.path("disk.qcow2"), mount)], ctx.path("run", "qsd.pid"), self.options
        )
        return mount

    def down(self, ctx: Ctx) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            stop(ctx, live)


class FdeTarget(Target):
    """fuse-disk-export -dp on the image itself, with its defaults or with ``extra`` options."""

    def __init__(
        self,
        cells: Sequence[str],
        extra: Sequence[str] = (),
        key: str = "fde",
        label: str = "fuse-disk-export",
        default: bool = True,
    ) -> None:
        super().__init__(cells, default)
        self.key, self.label, self.extra = key, label, tuple(extra)
        self.note = (
            f"fuse-disk-export -dp {' '.join(self.extra) or '(defaults)'} on the image itself"
        )
        self._live: Live | None = None

    def up(self, ctx: Ctx) -> str:
        image = ctx.path("disk.qcow2")
        self._live = start_fde(ctx, [image], ctx.path("run", "fde.pid"), self.extra)
        return image

    def down(self, ctx: Ctx) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            stop(ctx, live)


class NbdfuseTarget(Target):
    """qemu-nbd on a unix socket, nbdfuse mounting it on a separate empty file (nbdfuse >= 1.6
    mounts over a regular file)."""

    key = "nbdfuse"
    label = "qemu-nbd + nbdfuse"

    def __init__(self, cells: Sequence[str]) -> None:
        super().__init__(cells)
        self.note = "qemu-nbd -f qcow2 -t -e 4 --socket S --fork; nbdfuse -P P FILE --unix S"
        self._server: Owned | None = None
        self._fuse: Owned | None = None
        self.multi_conn: bool | None = None

    def up(self, ctx: Ctx) -> str:
        sock, mount = ctx.path("run", "nbd.sock"), ctx.path("export.raw")
        server_pid, fuse_pid = ctx.path("run", "qemu-nbd.pid"), ctx.path("run", "nbdfuse.pid")
        for stale in (sock, server_pid, fuse_pid):
            if os.path.exists(stale):
                os.unlink(stale)
        # --fork returns once the socket listens; --persistent so nbdinfo may connect first.
        run(
            [
                "qemu-nbd",
                "-f",
                "qcow2",
                "--persistent",
                "--shared=4",
                f"--socket={sock}",
                "--fork",
                f"--pid-file={server_pid}",
                ctx.path("disk.qcow2"),
            ],
            timeout=UP_TIMEOUT,
        )
        self._server = ctx.janitor.adopt(read_pid_file(server_pid), "qemu-nbd")
        if self.multi_conn is None:
            info = subprocess.run(
                ["nbdinfo", "--can", "multi-conn", f"nbd+unix:///?socket={sock}"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
            )
            self.multi_conn = info.returncode == 0
        ctx.janitor.mounts.add(mount)
        with MountWatch() as watch, DirWatch(ctx.path("run")) as dirwatch:
            self._fuse = ctx.janitor.spawn(
                ["nbdfuse", "-P", fuse_pid, mount, "--unix", sock],
                "nbdfuse",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            died = exited(self._fuse, "nbdfuse exited")
            try:
                wait_all([file_present(dirwatch, fuse_pid), mounted(watch, [mount])], UP_TIMEOUT)
            finally:
                if died.check():
                    raise BenchError("nbdfuse exited before mounting")
        return mount

    def down(self, ctx: Ctx) -> None:
        mount = ctx.path("export.raw")
        if self._fuse is not None:
            fuse, self._fuse = self._fuse, None
            with MountWatch() as watch:
                run(["fusermount3", "-u", mount], timeout=DOWN_TIMEOUT)
                wait_all([exited(fuse), unmounted(watch, [mount])], DOWN_TIMEOUT)
            ctx.janitor.forget(fuse)
        if self._server is not None:
            server, self._server = self._server, None
            server.signal(signal.SIGTERM)
            wait_all([exited(server)], DOWN_TIMEOUT)
            ctx.janitor.forget(server)
