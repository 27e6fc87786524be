"""Start-up and stop: fuse-disk-export -dp against qemu-storage-daemon --daemonize written by hand,
the peak memory of both, the phases of fuse-disk-export's time to live, and its import time."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence

from benchmarks.context import Ctx, median
from benchmarks.proc import BenchError, exited, run, wait_all
from benchmarks.targets import start_fde, start_qsd, start_qsd_safe, stop

COUNTS = (1, 8, 32, 128)
#: fuse-disk-export; qemu-storage-daemon by hand with QEMU's defaults; and by hand but as safe.
KINDS = ("fde", "qsd", "qsd-safe")
SMALL_IMAGE = str(64 << 20)
#: Seconds from live to SIGINT for the "after serving" revert.
SETTLE = 1.0


def _reps(ctx: Ctx, count: int) -> int:
    if ctx.quick:
        return 1
    # Multiples of 3: each kind goes first equally often.  This host's noise (10-20%) is larger
    # than the targets' margins, so the medians take 9 runs.
    return {1: 9, 8: 6, 32: 6}.get(count, 9)


def make_images(ctx: Ctx, count: int) -> list[str]:
    directory = ctx.path("start", f"n{count}")
    os.makedirs(directory, exist_ok=True)
    images = [os.path.join(directory, f"img{i}.qcow2") for i in range(count)]
    for image in images:
        run(["qemu-img", "create", "-q", "-f", "qcow2", image, SMALL_IMAGE])
    return images


def _cycle(
    ctx: Ctx, kind: str, images: Sequence[str], *, settle: float = 0.0, watch_mounts: bool = False
) -> dict[str, float]:
    """Bring ``images`` up with ``kind`` (one of `KINDS`), read peak RSS, SIGINT (``settle``
    seconds after live), time the stop (`targets.stop`): by default as a script waits for it,
    without a mountinfo watcher, which would slow what it measures."""
    pid_file = ctx.path("run", f"{kind}-start.pid")
    if kind == "fde":
        live = start_fde(ctx, images, pid_file)
    elif kind == "qsd-safe":
        live = start_qsd_safe(ctx, images, pid_file)
    else:
        live = start_qsd(ctx, [(i, i) for i in images], pid_file)
    try:
        hwm = live.hwm_kib()
    except Exception:
        stop(ctx, live)
        raise
    if settle:
        time.sleep(settle)  # the time a user serves: a measured pause, not a wait for anything
    met = stop(ctx, live, watch_mounts=watch_mounts)
    out = {
        "live_ms": live.live_s * 1000,
        "exit_ms": met["exit"] * 1000,
        "unmounted_ms": met["unmounted"] * 1000,
        "pidfile_gone_ms": met["pid file gone"] * 1000,
        "clean_ms": max(met["unmounted"], met["pid file gone"]) * 1000,
        "rss_kib": float(sum(hwm.values())),
    }
    daemon_exits = [v for k, v in met.items() if k.startswith("exit qemu-storage-daemon")]
    if daemon_exits:
        out["qsd_exit_ms"] = max(daemon_exits) * 1000
    if kind == "fde":
        out["rss_tool_kib"] = float(sum(v for k, v in hwm.items() if k.startswith("fuse")))
    return out


def bench_start_stop(ctx: Ctx) -> dict[str, object]:
    os.makedirs(ctx.path("run"), exist_ok=True)
    counts = COUNTS if not ctx.quick else (1, 8)
    images = {n: make_images(ctx, n) for n in counts}
    ctx.log("start/stop: warm-up (byte-code cache, page cache)")
    run([*ctx.tool, "--version"], env=ctx.env, cwd=ctx.work)
    _cycle(ctx, "fde", images[counts[0]])
    _cycle(ctx, "qsd", images[counts[0]])
    _cycle(ctx, "qsd-safe", images[counts[0]])
    rows: dict[str, dict[str, dict[str, list[float]]]] = {}
    for n in counts:
        rows[str(n)] = {kind: {} for kind in KINDS}
        reps = _reps(ctx, n)
        ctx.log(f"start/stop: {n} image(s) x {reps}")
        for rep in range(reps):
            # Rotate which goes first, so that none always follows another.
            order = KINDS[rep % 3 :] + KINDS[: rep % 3]
            for kind in order:
                for key, value in _cycle(ctx, kind, images[n]).items():
                    rows[str(n)][kind].setdefault(key, []).append(value)
    # The revert of the largest count again: after serving for a moment (by then
    # fuse-disk-export has QMP up, and reverts from its event loop), and at once under a
    # mountinfo watcher, as rounds 1 to 4 timed it.
    n = counts[-1]
    ctx.log(f"revert, 1 s after live and watched: {n} image(s) x {_reps(ctx, n)}")
    for rep in range(_reps(ctx, n)):
        order = KINDS[rep % 3 :] + KINDS[: rep % 3]
        for kind in order:
            for field, settle, watch in (("settled_ms", SETTLE, False), ("watched_ms", 0.0, True)):
                met = _cycle(ctx, kind, images[n], settle=settle, watch_mounts=watch)
                rows[str(n)][kind].setdefault(field, []).append(met["clean_ms"])
    return {"counts": list(counts), "rows": rows}


# ---------------------------------------------------------------------------------------------
# time-to-live breakdown, through benchmarks/probe.py

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe.py")


def _probe_once(ctx: Ctx, images: Sequence[str]) -> dict[str, float | None]:
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as errors:
        t_spawn = time.monotonic()
        try:
            probe = ctx.janitor.spawn(
                [ctx.python, PROBE, str(write_end), *images],
                "probe (fuse-disk-export, foreground)",
                pass_fds=(write_end,),
                stdout=subprocess.DEVNULL,
                stderr=errors,
                env=ctx.env,
                cwd=ctx.work,
            )
        finally:
            os.close(write_end)
        ctx.janitor.mounts.update(images)
        data = b""
        try:
            deadline = time.monotonic() + 60
            while b"live\n" not in data:
                remaining = deadline - time.monotonic()
                ready, _, _ = select.select([read_end], [], [], max(remaining, 0))
                if not ready:
                    raise BenchError("probe: not live within 60 s")
                chunk = os.read(read_end, 65536)
                if not chunk:
                    errors.seek(0)
                    text = errors.read().decode(errors="replace")[-500:]
                    raise BenchError(f"probe exited before going live: {text}")
                data += chunk
            t_sigint = time.monotonic()
            probe.signal(signal.SIGINT)
            met = wait_all([exited(probe, "exit")], 30, since=t_sigint)
            while chunk := os.read(read_end, 65536):
                data += chunk
        finally:
            os.close(read_end)
        ctx.janitor.forget(probe)
    marks: dict[str, float] = {}
    for line in data.decode().splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            marks.setdefault(str(item["mark"]), float(item["t"]))
    if "live" not in marks:
        raise BenchError("probe reported no phases")
    return _phases(marks, t_spawn, t_sigint, t_sigint + met["exit"])


def _phases(
    marks: dict[str, float], t_spawn: float, t_sigint: float, t_exit: float
) -> dict[str, float | None]:
    def ms(a: str | float | None, b: str | float | None) -> float | None:
        start = marks.get(a) if isinstance(a, str) else a
        end = marks.get(b) if isinstance(b, str) else b
        return None if start is None or end is None else (end - start) * 1000

    return {
        "interpreter start-up": ms(t_spawn, "interp"),
        "import fuse_disk_export.cli": ms("interp", "import_cli"),
        "argv, image probing (+ their imports)": ms("main", "request"),
        "plan (+ imports)": ms("request", "spawn"),
        "qemu-storage-daemon spawn": ms("spawn", "spawned"),
        "daemon brings the graph up (greeting)": ms("spawned", "greeting"),
        "after the greeting: guards, pid file, ready": ms("greeting", "live"),
        "total to live": ms(t_spawn, "live"),
        "SIGINT to handler": ms(t_sigint, "sigint"),
        "SIGTERM + reap daemon": ms("sigint", "daemon-exit"),
        "daemon exit to process exit": ms("daemon-exit", t_exit),
        "total stop": ms(t_sigint, t_exit),
    }


def bench_breakdown(ctx: Ctx) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for n in (1, 128) if not ctx.quick else (1,):
        images = (
            make_images(ctx, n)
            if not os.path.exists(ctx.path("start", f"n{n}"))
            else [ctx.path("start", f"n{n}", f"img{i}.qcow2") for i in range(n)]
        )
        reps = 1 if ctx.quick else 5 if n == 1 else 3
        ctx.log(f"time-to-live breakdown: {n} image(s) x {reps}")
        _probe_once(ctx, images)  # warm-up
        phases: dict[str, list[float]] = {}
        for _ in range(reps):
            for key, value in _probe_once(ctx, images).items():
                if value is not None:
                    phases.setdefault(key, []).append(value)
        out[str(n)] = phases
    return out


# ---------------------------------------------------------------------------------------------
# import time

_IMPORT_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)")

# What a -dp run imports beyond --version: everything the probe pre-imports, plus python-daemon.
# The older names (export, daemonize) are for --tree on a checkout from before they were renamed;
# a module a tree does not have is skipped.
FULL_IMPORTS = (
    "import importlib\n"
    "for m in ('fuse_disk_export.cli', 'fuse_disk_export.request', 'fuse_disk_export.images',\n"
    "          'fuse_disk_export.lifecycle', 'fuse_disk_export.export',\n"
    "          'fuse_disk_export.engine.daemon', 'fuse_disk_export.background',\n"
    "          'fuse_disk_export.daemonize', 'daemon'):\n"
    "    try:\n"
    "        importlib.import_module(m)\n"
    "    except ImportError:\n"
    "        pass\n"
)


def parse_importtime(stderr: str) -> list[tuple[str, int, int, int, str]]:
    """(module, depth, self µs, cumulative µs, imported by) for every line of ``-X importtime``
    output.  A module is printed after the modules it imports, one level deeper: its importer is
    the next line at a lower depth ("" for a top-level import)."""
    rows = []
    for line in stderr.splitlines():
        m = _IMPORT_LINE.match(line)
        if m:
            rows.append((m.group(4), (len(m.group(3)) - 1) // 2, int(m.group(1)), int(m.group(2))))
    out = []
    for i, (name, depth, self_us, cum_us) in enumerate(rows):
        parent = next((r[0] for r in rows[i + 1 :] if r[1] < depth), "")
        out.append((name, depth, self_us, cum_us, parent))
    return out


def _chain(lines: list[tuple[str, int, int, int, str]], name: str) -> str:
    parents = {n: p for n, _, _, _, p in lines}
    chain, seen = [], {name}
    while parents.get(name):
        name = parents[name]
        if name in seen:
            break
        seen.add(name)
        chain.append(name)
    return " <- ".join(chain)


def _importtime(ctx: Ctx, label: str, args: Sequence[str], reps: int) -> dict[str, object]:
    walls: list[float] = []
    totals: list[int] = []
    by_root: dict[str, list[int]] = {}
    cumulative: dict[str, list[int]] = {}
    own: dict[str, list[int]] = {}
    lines: list[tuple[str, int, int, int, str]] = []
    for _ in range(reps):
        t0 = time.monotonic()
        done = run([ctx.python, "-X", "importtime", *args], env=ctx.env, cwd=ctx.work)
        walls.append((time.monotonic() - t0) * 1000)
        lines = parse_importtime(done.stderr)
        totals.append(sum(r[2] for r in lines))
        roots: dict[str, int] = {}
        for name, _, self_us, cum_us, _ in lines:
            root = name.split(".")[0]
            roots[root] = roots.get(root, 0) + self_us
            cumulative.setdefault(name, []).append(cum_us)
            own.setdefault(name, []).append(self_us)
        for root, us in roots.items():
            by_root.setdefault(root, []).append(us)

    def ms(values: list[int]) -> float:
        return round((median(values) or 0) / 1000, 2)

    ranked_roots = sorted(by_root, key=lambda r: -ms(by_root[r]))
    # The costly imports that are not ours: each with its cumulative and own time and who
    # imported it (from the last repetition).
    theirs = [n for n in cumulative if not n.startswith("fuse_disk_export")]
    offenders = sorted(theirs, key=lambda n: -ms(cumulative[n]))[:15]
    ours = sorted((n for n in own if n.startswith("fuse_disk_export")), key=lambda n: -ms(own[n]))
    return {
        "command": f"python -X importtime {label}",
        "wall_ms": walls,
        "total_import_ms": ms(totals),
        "by_package_self_ms": [[r, ms(by_root[r])] for r in ranked_roots[:15]],
        "offenders": [
            {
                "module": n,
                "cumulative_ms": ms(cumulative[n]),
                "self_ms": ms(own[n]),
                "imported_by": _chain(lines, n),
            }
            for n in offenders
        ],
        "ours_self_ms": [[n, ms(own[n])] for n in ours[:10]],
    }


def bench_imports(ctx: Ctx) -> dict[str, object]:
    ctx.log("import time")
    reps = 2 if ctx.quick else 5
    bare = []
    for _ in range(reps):
        t0 = time.monotonic()
        run([ctx.python, "-c", "pass"], env=ctx.env, cwd=ctx.work)
        bare.append((time.monotonic() - t0) * 1000)
    version = []
    for _ in range(reps):
        t0 = time.monotonic()
        run([*ctx.tool, "--version"], env=ctx.env, cwd=ctx.work)
        version.append((time.monotonic() - t0) * 1000)
    return {
        "python -c pass, ms": bare,
        "fuse-disk-export --version, ms": version,
        "version": _importtime(
            ctx, "-m fuse_disk_export --version", ["-m", "fuse_disk_export", "--version"], reps
        ),
        "full": _importtime(
            ctx, "-c 'import <every module a -dp run imports>'", ["-c", FULL_IMPORTS], reps
        ),
    }
