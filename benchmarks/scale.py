"""Many images in one invocation: live, revert, peak RSS per export, ``--list`` time.

fuse-disk-export -r -dp against qemu-storage-daemon by hand started the same way: one daemon per
`limits.SHARD_SIZE` images, all started at once with ``--daemonize``, live when all returned,
reverted by SIGTERM to all at once, gone when all have exited and nothing is mounted.  Read-only
on both sides: that is as safe by hand as through the tool on every QEMU (a writable export by
hand is not, before QEMU 11: the tool's write guard has a cost of its own, which the start-up
phase measures against a hand-written export made as safe).
"""

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence

from benchmarks.context import Ctx, median
from benchmarks.proc import BenchError, exited, mountpoints, read_pid_file, run, wait_all
from benchmarks.targets import QsdOptions, _communicate, qsd_argv, start_fde, stop
from fuse_disk_export.engine import limits

COUNTS = (128, 1000, 4000)
READ_ONLY = QsdOptions(
    file={"read-only": "on"}, fmt={"read-only": "on"}, export={"writable": "off"}
)
DOWN_TIMEOUT = 120.0


def _images(ctx: Ctx, count: int) -> list[str]:
    directory = ctx.path("scale", f"n{count}")
    os.makedirs(directory, exist_ok=True)
    first = os.path.join(directory, "img0.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", first, str(16 << 20)])
    images = [first]
    for i in range(1, count):
        image = os.path.join(directory, f"img{i}.qcow2")
        shutil.copyfile(first, image)  # thousands of qemu-img runs would take minutes
        images.append(image)
    return images


def _fde(ctx: Ctx, images: Sequence[str]) -> dict[str, float]:
    pid_file = ctx.path("run", "scale-fde.pid")
    live = start_fde(ctx, images, pid_file, extra=["-r"])
    rss = sum(live.hwm_kib().values())
    t0 = time.monotonic()
    run([*ctx.tool, "--list", "--json"], env=ctx.env, cwd=ctx.work)
    listed = time.monotonic() - t0
    met = stop(ctx, live, watch_mounts=False)
    return {
        "live_ms": live.live_s * 1000,
        "revert_ms": met["pid file gone"] * 1000,
        "rss_per_export_kib": rss / len(images),
        "list_ms": listed * 1000,
    }


def _by_hand(ctx: Ctx, images: Sequence[str]) -> dict[str, float]:
    size = limits.SHARD_SIZE
    shards = [images[i : i + size] for i in range(0, len(images), size)]
    ctx.janitor.mounts.update(images)
    pid_files = [ctx.path("run", f"scale-qsd{n}.pid") for n in range(len(shards))]
    t0 = time.monotonic()
    invoking = [
        ctx.janitor.spawn(
            qsd_argv([(i, i) for i in shard], pid_file, READ_ONLY),
            "qemu-storage-daemon --daemonize",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ctx.work,
        )
        for shard, pid_file in zip(shards, pid_files, strict=True)
    ]
    for owned in invoking:
        _communicate(ctx, owned, "qemu-storage-daemon --daemonize")
    live = time.monotonic() - t0
    daemons = [ctx.janitor.adopt(read_pid_file(p), "qemu-storage-daemon") for p in pid_files]
    missing = set(images) - mountpoints()
    if missing:
        raise BenchError(f"by hand: {len(missing)} image(s) not mounted")
    rss = 0
    for daemon in daemons:
        with open(f"/proc/{daemon.pid}/status") as f:
            rss += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    t0 = time.monotonic()
    for daemon in daemons:
        daemon.signal(signal.SIGTERM)
    wait_all([exited(d, f"exit {d.pid}") for d in daemons], DOWN_TIMEOUT, since=t0)
    revert = time.monotonic() - t0
    if set(images) & mountpoints():
        raise BenchError("by hand: still mounted after every daemon exited")
    for daemon in daemons:
        ctx.janitor.forget(daemon)
    return {
        "live_ms": live * 1000,
        "revert_ms": revert * 1000,
        "rss_per_export_kib": rss / len(images),
    }


def bench_scale(ctx: Ctx) -> dict[str, object]:
    os.makedirs(ctx.path("run"), exist_ok=True)
    counts = COUNTS if not ctx.quick else COUNTS[:1]
    reps = 1 if ctx.quick else 3
    rows: dict[str, dict[str, dict[str, float | None]]] = {}
    for n in counts:
        images = _images(ctx, n)
        ctx.log(f"scale: {n} images x {reps}, {-(-n // limits.SHARD_SIZE)} daemon(s) each")
        samples: dict[str, dict[str, list[float]]] = {"fde": {}, "qsd": {}}
        for rep in range(reps):
            order = ("fde", "qsd") if rep % 2 == 0 else ("qsd", "fde")
            for kind in order:
                met = _fde(ctx, images) if kind == "fde" else _by_hand(ctx, images)
                for key, value in met.items():
                    samples[kind].setdefault(key, []).append(value)
        rows[str(n)] = {
            kind: {key: median(values) for key, values in cells.items()}
            for kind, cells in samples.items()
        }
        shutil.rmtree(ctx.path("scale", f"n{n}"), ignore_errors=True)
    return {"counts": list(counts), "shard_size": limits.SHARD_SIZE, "rows": rows}
