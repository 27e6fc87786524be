"""I/O through each target with fio: which cells, which targets, in which order.

Every target is brought up and taken down once per repetition, and the repetitions go round all
targets in turn, so slow drift on the machine (other jobs, the host's cache) spreads over every
target instead of landing on whichever ran last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.context import Ctx
from benchmarks.proc import BenchError, mountpoints, run
from benchmarks.targets import (
    FdeTarget,
    NbdfuseTarget,
    QsdOptions,
    QsdTarget,
    RawTarget,
    Target,
)

IMAGE_SIZE = 1 << 30


@dataclass(frozen=True)
class Cell:
    """One fio job: pattern, block size, queue depth, O_DIRECT or not, fsync after each write."""

    rw: str
    bs: str
    iodepth: int
    direct: bool
    unit: str  # "MB/s" or "IOPS"
    fsync: bool = False

    @property
    def title(self) -> str:
        kind = {"read": "seq read", "write": "seq write"}.get(self.rw, self.rw)
        mode = "direct" if self.direct else "buffered"
        extra = " +fsync" if self.fsync else ""
        return f"{kind} {self.bs} QD{self.iodepth} {mode}{extra}"


CELLS: dict[str, Cell] = {
    # First: the raw target warms its page cache in up(), and the O_DIRECT writes below drop
    # cached pages of the ranges they write.
    "randread-4k-qd1-buffered": Cell("randread", "4k", 1, False, "IOPS"),
    "seqread-1M-qd16-direct": Cell("read", "1M", 16, True, "MB/s"),
    "seqwrite-1M-qd16-direct": Cell("write", "1M", 16, True, "MB/s"),
    "randread-4k-qd1-direct": Cell("randread", "4k", 1, True, "IOPS"),
    "randread-4k-qd16-direct": Cell("randread", "4k", 16, True, "IOPS"),
    "randwrite-4k-qd16-direct": Cell("randwrite", "4k", 16, True, "IOPS"),
    "randwrite-4k-qd1-fsync": Cell("randwrite", "4k", 1, True, "IOPS", fsync=True),
}

MAIN_CELLS = tuple(CELLS)
# Candidate defaults are compared on the cells where they can make a difference.
ENGINE_CELLS = (
    "seqread-1M-qd16-direct",
    "randread-4k-qd1-direct",
    "randread-4k-qd16-direct",
    "randwrite-4k-qd16-direct",
)
DIRECT_CELLS = ("seqread-1M-qd16-direct", "randread-4k-qd16-direct", "randwrite-4k-qd16-direct")
READ_CELLS = ("seqread-1M-qd16-direct", "randread-4k-qd1-direct", "randread-4k-qd16-direct")
RANDOM_CELLS = ("randread-4k-qd1-direct", "randread-4k-qd16-direct", "randwrite-4k-qd16-direct")
FLUSH_CELLS = ("randwrite-4k-qd16-direct", "randwrite-4k-qd1-fsync")

DIRECT = {"cache": {"direct": True}}


def targets(quick: bool = False, only: Sequence[str] | None = None) -> list[Target]:
    """The comparison (raw, fuse-disk-export, hand-written default, nbdfuse); then candidate
    defaults through fuse-disk-export's own options (as shipped: on QEMU < 10.1 it lets a
    writable export have one background FUSE request at a time); then QEMU-level candidates as
    single changes to the hand-written command line (no such limit)."""
    main = MAIN_CELLS if not quick else ("randread-4k-qd16-direct", "randwrite-4k-qd1-fsync")

    def pick(cells: tuple[str, ...]) -> tuple[str, ...]:
        return cells if not quick else cells[-1:]

    def fde(key: str, extra: list[str], cells: tuple[str, ...], default: bool = True) -> FdeTarget:
        label = "fuse-disk-export " + " ".join(extra)
        return FdeTarget(pick(cells), extra, key, label, default)

    def qsd(
        key: str, label: str, cells: tuple[str, ...], options: QsdOptions, default: bool = True
    ) -> QsdTarget:
        return QsdTarget(key, label, pick(cells), options, default)

    chosen: list[Target] = [
        RawTarget(main),
        FdeTarget(main),
        QsdTarget("qsd", "qsd, defaults", main, QsdOptions()),
        NbdfuseTarget(main),
        fde("fde-io_uring", ["--aio", "io_uring"], ENGINE_CELLS),
        fde("fde-ro", ["-r"], READ_CELLS),
        fde("fde-ro-io_uring", ["-r", "--aio", "io_uring"], READ_CELLS),
        fde("fde-none", ["--cache", "none"], DIRECT_CELLS),
        fde("fde-native", ["--cache", "none", "--aio", "native"], DIRECT_CELLS),
        fde("fde-unsafe", ["--cache", "unsafe"], ("randwrite-4k-qd1-fsync",)),
        fde("fde-writethrough", ["--cache", "writethrough"], FLUSH_CELLS),
        qsd(
            "iothread",
            "qsd + iothread",
            RANDOM_CELLS,
            QsdOptions(objects=("iothread,id=io0",), export={"iothread": "io0"}),
        ),
        qsd("io_uring", "qsd aio=io_uring", RANDOM_CELLS, QsdOptions(file={"aio": "io_uring"})),
        # Not run by default: the same questions, asked through the tool above.
        qsd("direct", "qsd cache.direct=on", ENGINE_CELLS, QsdOptions(file=DIRECT), False),
        qsd(
            "native",
            "qsd aio=native,cache.direct=on",
            ENGINE_CELLS,
            QsdOptions(file={"aio": "native", **DIRECT}),
            False,
        ),
        qsd(
            "io_uring-direct",
            "qsd aio=io_uring,cache.direct=on",
            ENGINE_CELLS,
            QsdOptions(file={"aio": "io_uring", **DIRECT}),
            False,
        ),
        qsd(
            "no-flush",
            "qsd cache.no-flush=on",
            FLUSH_CELLS,
            QsdOptions(file={"cache": {"no-flush": True}}, fmt={"cache": {"no-flush": True}}),
            False,
        ),
        qsd(
            "writethrough",
            "qsd export writethrough=on",
            FLUSH_CELLS,
            QsdOptions(export={"writethrough": True}),
            False,
        ),
    ]
    if not only:
        return [t for t in chosen if t.default]
    unknown = set(only) - {t.key for t in chosen}
    if unknown:
        raise BenchError(f"unknown target(s) {', '.join(sorted(unknown))}")
    return [t for t in chosen if t.key in only]


def prepare_images(ctx: Ctx) -> None:
    """A 1 GiB qcow2 and a 1 GiB raw file, both fully written (preallocation=full), so that reads
    hit data, and an empty file for the hand-written exports to mount on."""
    os.makedirs(ctx.path("run"), exist_ok=True)
    for fmt, name in (("qcow2", "disk.qcow2"), ("raw", "raw.img")):
        create = ["qemu-img", "create", "-q", "-f", fmt, "-o", "preallocation=full"]
        run([*create, ctx.path(name), str(IMAGE_SIZE)])
    with open(ctx.path("export.raw"), "wb"):
        pass


def fio(ctx: Ctx, path: str, cells: Sequence[str]) -> dict[str, float]:
    """One fio invocation running ``cells`` one after the other (stonewall) on ``path``; for each,
    MB/s (10^6 bytes) or IOPS, reads and writes added up.  One invocation per target and
    repetition saves fio's ~0.3 s start-up per cell."""
    if any(ch in path for ch in ":\n"):
        raise BenchError(f"fio cannot take {path!r} as a file name")
    lines = [
        "[global]",
        f"filename={path}",
        "ioengine=libaio",
        f"runtime={int(ctx.fio_runtime * 1000)}ms",
        "time_based",
        "allow_file_create=0",
        "invalidate=0",
        "randrepeat=0",
        "norandommap",
        "stonewall",
    ]
    for key in cells:
        cell = CELLS[key]
        lines += [
            f"[{key}]",
            f"rw={cell.rw}",
            f"bs={cell.bs}",
            f"iodepth={cell.iodepth}",
            f"direct={int(cell.direct)}",
        ]
        if cell.fsync:
            lines.append("fsync=1")
    job_file = ctx.path("run", "bench.fio")
    with open(job_file, "w") as f:
        f.write("\n".join(lines) + "\n")
    timeout = len(cells) * (ctx.fio_runtime + 30) + 30
    out = run(["fio", "--output-format=json", job_file], timeout=timeout).stdout
    try:
        jobs = json.loads(out[out.index("{") :])["jobs"]
    except (ValueError, KeyError) as e:
        raise BenchError(f"unreadable fio output for {path}: {out[:300]!r}") from e
    results: dict[str, float] = {}
    for job in jobs:
        key = job["jobname"]
        if job.get("error"):
            raise BenchError(f"fio {key} failed on {path}: error {job['error']}")
        if CELLS[key].unit == "MB/s":
            results[key] = (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / 1e6
        else:
            results[key] = float(job["read"]["iops"] + job["write"]["iops"])
    missing = set(cells) - set(results)
    if missing:
        raise BenchError(f"fio reported nothing for {', '.join(sorted(missing))}")
    return results


def settle(ctx: Ctx) -> None:
    """Write back whatever a target left dirty in the page cache, so that it is not written back
    during the next target's runs."""
    mounted = mountpoints()
    for name in ("disk.qcow2", "raw.img"):
        path = ctx.path(name)
        if path in mounted or not os.path.exists(path):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def bench_io(ctx: Ctx) -> dict[str, object]:
    ctx.log("I/O: preparing a 1 GiB qcow2 and a 1 GiB raw file")
    prepare_images(ctx)
    chosen = targets(ctx.quick, ctx.targets)
    if ctx.cells:
        unknown = set(ctx.cells) - set(CELLS)
        if unknown:
            raise BenchError(f"unknown cell(s) {', '.join(sorted(unknown))}")
        for target in chosen:
            target.cells = ctx.cells
    values: dict[str, dict[str, list[float]]] = {t.key: {c: [] for c in t.cells} for t in chosen}
    failed: dict[str, str] = {}
    for rep in range(ctx.reps):
        for target in chosen:
            if target.key in failed:
                continue
            ctx.log(f"I/O rep {rep + 1}/{ctx.reps}: {target.label}")
            try:
                try:
                    path = target.up(ctx)
                    target.check(path, IMAGE_SIZE)
                    for key, value in fio(ctx, path, target.cells).items():
                        values[target.key][key].append(value)
                finally:
                    target.down(ctx)
            except BenchError as e:
                # One target failing (io_uring refused, say) must not cost the others.
                ctx.log(f"{target.label} failed: {e}")
                failed[target.key] = str(e)
                for problem in ctx.janitor.cleanup():
                    ctx.log(problem)
            settle(ctx)
    nbd = next((t for t in chosen if isinstance(t, NbdfuseTarget)), None)
    return {
        "image": "qcow2, 1 GiB, preallocation=full; raw file 1 GiB, preallocation=full",
        "fio": f"libaio, {ctx.fio_runtime:g} s per job, time_based, invalidate=0, norandommap, "
        "the cells of one target and repetition as stonewalled jobs of one fio run",
        "cells": {k: {"title": c.title, "unit": c.unit} for k, c in CELLS.items()},
        "targets": {
            t.key: {"label": t.label, "note": t.note, "values": values[t.key]} for t in chosen
        },
        "nbd_multi_conn": nbd.multi_conn if nbd else None,
        "failed": failed,
    }
