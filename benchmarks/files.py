"""The files inside (``--mount-fs``): a 2 GiB ext4 with about 20,000 small files in a qcow2, read
through fuse-disk-export, against fuse2fs on a raw copy of the filesystem (the limit of this
design: the same driver, no QEMU under it), the kernel's ext4 through ``mount -o loop`` on the raw
copy (root), and guestmount (libguestfs) when it is installed.

Two figures each, medians of ``ctx.reps`` after one warm-up (the host's page cache is warm for
all of them): the time from the command to a working ``ls``, and ``find -type f | xargs cat``.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable

from benchmarks.context import Ctx, median
from benchmarks.proc import BenchError, mountpoints, read_pid_file, run

FILES = 20_000
PER_DIR = 100
SIZE = "2G"
SBIN = "/usr/local/sbin:/usr/sbin:/sbin:" + os.environ.get("PATH", "")


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN)


def _dataset(ctx: Ctx) -> tuple[str, str]:
    """(qcow2 image, raw copy of the filesystem) holding FILES small files."""
    base = ctx.path("files")
    os.makedirs(base, exist_ok=True)
    tree = os.path.join(base, "tree")
    rng = random.Random(7)
    count = FILES if not ctx.quick else 2_000
    for i in range(count):
        directory = os.path.join(tree, f"d{i // PER_DIR:03}")
        if i % PER_DIR == 0:
            os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"f{i:05}.txt"), "wb") as f:
            f.write(rng.randbytes(rng.randint(200, 4000)))
    raw = os.path.join(base, "fs.raw")
    mkfs = _which("mkfs.ext4")
    if mkfs is None:
        raise BenchError("mkfs.ext4 not found (e2fsprogs)")
    run([mkfs, "-q", "-F", "-d", tree, raw, SIZE], timeout=600)
    shutil.rmtree(tree)
    image = os.path.join(base, "fs.qcow2")
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image], timeout=600)
    return image, raw


def _mounted(path: str) -> bool:
    return path in mountpoints()


def _ls_works(directory: str, deadline: float) -> None:
    while True:
        try:
            if _mounted(directory) and os.listdir(directory):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{directory}: no working ls within 60 s")
        time.sleep(0.0005)


def _cat_all(directory: str) -> float:
    t0 = time.monotonic()
    subprocess.run(
        f"find '{directory}' -type f -print0 | xargs -0 cat > /dev/null",
        shell=True,
        check=True,
    )
    return time.monotonic() - t0


def _one(
    ctx: Ctx, start: Callable[[str], Callable[[], None]], directory: str
) -> tuple[float, float]:
    """(seconds to a working ls, seconds to read every file) for one mount by ``start``."""
    os.makedirs(directory, exist_ok=True)
    t0 = time.monotonic()
    stop = start(directory)
    try:
        _ls_works(directory, t0 + 60)
        to_ls = time.monotonic() - t0
        return to_ls, _cat_all(directory)
    finally:
        stop()


def _fde(ctx: Ctx, image: str) -> Callable[[str], Callable[[], None]]:
    def start(directory: str) -> Callable[[], None]:
        pid_file = ctx.path("run", "files-fde.pid")
        ctx.janitor.mounts.add(directory)
        run([*ctx.tool, "-r", "-dp", pid_file, "--mount-fs", directory, image], env=ctx.env)
        owned = ctx.janitor.adopt(read_pid_file(pid_file), "fuse-disk-export --mount-fs")

        def stop() -> None:
            owned.signal(2)
            owned.wait(30)
            ctx.janitor.forget(owned)

        return stop

    return start


def _fuse2fs(ctx: Ctx, raw: str) -> Callable[[str], Callable[[], None]]:
    program = _which("fuse2fs")
    if program is None:
        raise BenchError("fuse2fs not found")

    def start(directory: str) -> Callable[[], None]:
        ctx.janitor.mounts.add(directory)
        owned = ctx.janitor.spawn(
            [program, "-f", raw, directory, "-o", "ro"],
            "fuse2fs",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def stop() -> None:
            subprocess.run(["fusermount3", "-u", directory], check=False)
            owned.wait(30)
            ctx.janitor.forget(owned)

        return stop

    return start


def _loop(ctx: Ctx, raw: str) -> Callable[[str], Callable[[], None]]:
    def start(directory: str) -> Callable[[], None]:
        ctx.janitor.mounts.add(directory)
        run(["mount", "-o", "loop,ro", raw, directory])

        def stop() -> None:
            run(["umount", directory])

        return stop

    return start


def _guestmount(ctx: Ctx, image: str) -> Callable[[str], Callable[[], None]]:
    program = _which("guestmount")
    assert program is not None

    def start(directory: str) -> Callable[[], None]:
        ctx.janitor.mounts.add(directory)
        run([program, "--ro", "-a", image, "-m", "/dev/sda", directory], timeout=300)

        def stop() -> None:
            run(["guestunmount", directory], timeout=120)

        return stop

    return start


def bench_files(ctx: Ctx) -> dict[str, object]:
    ctx.log("files: making a 2 GiB ext4 with small files (qcow2 and raw)")
    os.makedirs(ctx.path("run"), exist_ok=True)
    image, raw = _dataset(ctx)
    systems: dict[str, Callable[[str], Callable[[], None]]] = {
        "fuse-disk-export --mount-fs (qcow2)": _fde(ctx, image),
        "fuse2fs on a raw copy": _fuse2fs(ctx, raw),
    }
    notes: list[str] = []
    if os.geteuid() == 0:
        systems["mount -o loop on a raw copy (root)"] = _loop(ctx, raw)
    else:
        notes.append("mount -o loop: needs root")
    if _which("guestmount"):
        systems["guestmount (libguestfs)"] = _guestmount(ctx, image)
    else:
        notes.append("guestmount: not installed (libguestfs-tools)")
    rows: dict[str, dict[str, list[float]]] = {}
    reps = 1 if ctx.quick else ctx.reps
    for name, start in systems.items():
        ctx.log(f"files: {name}")
        directory = ctx.path("files", "mnt-" + name.split()[0])
        try:
            _one(ctx, start, directory)  # warm-up
            for _ in range(reps):
                to_ls, cat = _one(ctx, start, directory)
                rows.setdefault(name, {}).setdefault("ls_ms", []).append(to_ls * 1000)
                rows[name].setdefault("cat_s", []).append(cat)
        except BenchError as e:
            notes.append(f"{name}: {e}")
    return {
        "files": FILES if not ctx.quick else 2_000,
        "rows": rows,
        "medians": {
            name: {k: median(v) for k, v in metrics.items()} for name, metrics in rows.items()
        },
        "notes": notes,
    }
