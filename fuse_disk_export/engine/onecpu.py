"""qemu-storage-daemon's start-up on one CPU, and every CPU again once it is up.

Opening an image is a chain of small reads, one after another: QEMU's main thread hands each to a
worker of its thread pool (``aio=threads``) and sleeps until the worker has read.  When the two
threads run on different CPUs, each read costs two cross-CPU wake-ups; on one CPU, two context
switches, which is much less (docs/benchmarks.md, "Round 4").  Once up, the daemon serves on
every CPU it had: its threads are given our own affinity back, which every thread it creates
later inherits.
"""

import contextlib
import os
from typing import NamedTuple


class Pinning(NamedTuple):
    """The CPU the daemon starts on, and the CPUs it then gets back."""

    cpu: int
    cpus: frozenset[int]


def choose() -> Pinning | None:
    """A CPU we may use other than the one this thread runs on, where the daemon then starts
    undisturbed: we go on for a moment on ours (and a ``-d`` parent and the pid file's watcher
    wake up there); 128 images went live a few milliseconds sooner so (docs/benchmarks.md,
    "Round 4").  None where there is no other (one CPU allowed) or nothing to tell."""
    try:
        cpus = frozenset(os.sched_getaffinity(0))
        with open("/proc/thread-self/stat", "rb") as f:
            # Field 39, "processor"; the fields after the command's closing parenthesis start at 3.
            ours = int(f.read().rsplit(b")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None
    if len(cpus) < 2:
        return None
    return Pinning(next_cpu(cpus, ours), cpus)


def next_cpu(cpus: frozenset[int], ours: int) -> int:
    """The CPU of ``cpus`` after ``ours``, round the set: another one if there is any (no better
    guess without sampling every CPU's load)."""
    return min(cpus, key=lambda c: (c <= ours, c))


def pin_self(cpu: int) -> None:
    """Between fork and exec: this process, and every thread it will create, on ``cpu``."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, (cpu,))


def release(pid: int, cpus: frozenset[int]) -> None:
    """Give every thread of process ``pid`` the CPUs ``cpus`` again.

    A thread still pinned may be creating one meanwhile, which inherits its one CPU and shows in
    /proc a moment later; so the threads are looked at again until two passes in a row find all
    of them with ``cpus``.  The main thread comes first, since it creates most of them.  (One
    left pinned would only be slower.)
    """
    refused: set[int] = set()
    clean = 0
    for _ in range(_PASSES):
        try:
            threads = sorted(
                (int(t) for t in os.listdir(f"/proc/{pid}/task")), key=lambda t: t != pid
            )
        except OSError:
            return  # gone: nothing to give back
        pinned = [t for t in threads if t not in refused and _affinity(t) not in (cpus, None)]
        clean = 0 if pinned else clean + 1
        if clean == 2:
            return
        for tid in pinned:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                # io_uring's kernel workers take its own mask, never the thread's: not ours to set.
                refused.add(tid)


#: Each pass catches the threads created during the one before; a few passes suffice.
_PASSES = 50


def _affinity(tid: int) -> frozenset[int] | None:
    try:
        return frozenset(os.sched_getaffinity(tid))
    except OSError:
        return None  # exited meanwhile
