"""python -m benchmarks: run the benchmark suite, print one table, write JSON and a PNG chart.

Everything it starts it stops, and everything it mounts it unmounts, whatever happens (the
janitor runs after every phase and at exit; the scratch directory is removed only once nothing is
mounted under it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from benchmarks import files, report, scale, schema, startup, throughput
from benchmarks.context import Ctx, versions
from benchmarks.proc import BenchError, Janitor, mountpoints, under

PHASES = ("qemu", "startup", "breakdown", "imports", "io", "files", "scale")
NEEDED = ("qemu-storage-daemon", "qemu-img", "qemu-nbd", "nbdfuse", "nbdinfo", "fio", "fusermount3")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="fio repetitions per cell (median taken)")
    p.add_argument("--runtime", type=float, default=1.5, help="seconds per fio run")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 repetition, few cells")
    p.add_argument("--only", action="append", choices=PHASES, help="run only these phases")
    p.add_argument(
        "--targets",
        help="I/O targets to run, comma-separated keys: raw, fde, fde-io_uring, qsd, nbdfuse, "
        "iothread, io_uring, direct, native, io_uring-direct (not run by default), no-flush, "
        "writethrough",
    )
    p.add_argument(
        "--cells",
        help="fio cells for every I/O target, comma-separated (default: each target's own set; "
        "see benchmarks/throughput.py)",
    )
    p.add_argument("--tree", help="measure the fuse_disk_export package in this checkout")
    p.add_argument("--out", default="bench-results", help="directory for the results")
    p.add_argument(
        "--publish", action="store_true", help="also copy bench.json and bench.png to docs/"
    )
    return p.parse_args(argv)


def _statfs_type(path: str) -> str:
    done = subprocess.run(
        ["stat", "-f", "-c", "%T", path], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def _preflight(work: str) -> None:
    missing = [t for t in NEEDED if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (run scripts/setup)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise BenchError("/dev/fuse is not usable")
    if _statfs_type(work) in ("tmpfs", "ramfs"):
        raise BenchError(f"{work} is on tmpfs: O_DIRECT runs need a real filesystem (--out)")


def _git(repo: str, *args: str) -> str:
    done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    work = os.path.join(out_dir, f"work-{os.getpid()}")
    os.makedirs(work)
    tree = os.path.abspath(args.tree) if args.tree else repo
    ctx = Ctx(
        repo=repo,
        tree=tree,
        work=work,
        janitor=Janitor(work),
        reps=args.reps,
        fio_runtime=args.runtime,
        quick=args.quick,
    )
    if args.targets:
        ctx.targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if args.cells:
        ctx.cells = tuple(c.strip() for c in args.cells.split(",") if c.strip())
    if args.quick:
        ctx.reps = 1
        ctx.fio_runtime = min(ctx.fio_runtime, 1.0)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)

    meta = versions()
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "qemu": meta["qemu-storage-daemon"],
            "cpus": meta["cpus"],
            "versions": meta,
            "tree": tree,
            "commit": _git(tree, "rev-parse", "--short", "HEAD") or "unknown",
            "dirty": bool(_git(tree, "status", "--porcelain", "--", "fuse_disk_export")),
            "reps": ctx.reps,
            "fio_runtime_s": ctx.fio_runtime,
            "loadavg_start": os.getloadavg(),
        },
        "errors": [],
    }
    phases: dict[str, Callable[[Ctx], object]] = {
        "qemu": schema.probe,
        "startup": startup.bench_start_stop,
        "breakdown": startup.bench_breakdown,
        "imports": startup.bench_imports,
        "io": throughput.bench_io,
        "files": files.bench_files,
        "scale": scale.bench_scale,
    }
    status = 0
    t0 = time.monotonic()
    try:
        _preflight(work)
        for name in args.only or PHASES:
            try:
                results[name] = phases[name](ctx)
                failed = (results[name] or {}).get("failed") if name == "io" else None
                results["errors"].extend(f"io: {k}: {v}" for k, v in (failed or {}).items())
            except BenchError as e:
                ctx.log(f"{name} failed: {e}")
                results["errors"].append(f"{name}: {e}")
                status = 1
            except Exception as e:
                ctx.log(f"{name} failed: {traceback.format_exc()}")
                results["errors"].append(f"{name}: {e!r}")
                status = 1
            finally:
                problems = ctx.janitor.cleanup()
                results["errors"].extend(f"{name}: {p}" for p in problems)
    except KeyboardInterrupt as e:
        ctx.log(f"interrupted ({e or 'SIGINT'}); cleaning up")
        status = 130
    except BenchError as e:
        ctx.log(str(e))
        results["errors"].append(str(e))
        status = 1
    finally:
        problems = ctx.janitor.cleanup()
        results["errors"].extend(problems)
        left = sorted(p for p in mountpoints() if under(p, work))
        if left:
            ctx.log(f"still mounted, keeping {work}: {', '.join(left)}")
            status = status or 1
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["meta"]["duration_s"] = round(time.monotonic() - t0, 1)
    results["meta"]["loadavg_end"] = os.getloadavg()
    if status == 130:
        return status
    written = report.write(results, out_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    shutil.copy(written["json"], os.path.join(out_dir, f"bench-{stamp}.json"))
    if args.publish:
        docs = os.path.join(repo, "docs")
        os.makedirs(docs, exist_ok=True)
        for kind in ("json", "png"):
            if kind in written:
                shutil.copy(written[kind], os.path.join(docs, f"bench.{kind}"))
    for error in results["errors"]:
        print(f"bench: {error}", file=sys.stderr)
    ctx.log(f"done in {results['meta']['duration_s']} s; results in {out_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
