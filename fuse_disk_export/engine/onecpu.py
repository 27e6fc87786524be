"""qemu-storage-daemon's start-up on one CPU, and every CPU again once it is up.

Opening an image is a chain of small reads, one after another: QEMU's main thread hands each to a
worker of its thread pool (``aio=threads``) and sleeps until the worker has read.  When the two
threads run on different CPUs, each read costs two cross-CPU wake-ups; on one CPU, two context
switches.  On this 2-CPU host, 128 images came up in 55 ms instead of 77 ms on one CPU
(docs/benchmarks.md, "Round 4").  Once up, the daemon serves on every CPU it had: its threads are
given our own affinity back, which every thread it creates later inherits.
"""

import contextlib
import os
from typing import NamedTuple


class Pinning(NamedTuple):
    """The CPU the daemon starts on, and the CPUs it then gets back."""

    cpu: int
    cpus: frozenset[int]


def choose() -> Pinning | None:
    """The CPU this process last ran on (idle enough to be running us), if we may use another
    one as well; None where there is nothing to choose (one CPU) or nothing to tell."""
    try:
        cpus = frozenset(os.sched_getaffinity(0))
        with open("/proc/self/stat", "rb") as f:
            # Field 39, "processor"; the fields after the command's closing parenthesis start at 3.
            cpu = int(f.read().rsplit(b")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None
    if len(cpus) < 2:
        return None
    return Pinning(cpu if cpu in cpus else min(cpus), cpus)


def pin_self(cpu: int) -> None:
    """Between fork and exec: this process, and every thread it will create, on ``cpu``."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, (cpu,))


def release(pid: int, cpus: frozenset[int]) -> None:
    """Give every thread of process ``pid`` the CPUs ``cpus`` again.

    A thread still pinned may create one meanwhile, pinned too: so the threads are listed again
    until no new one shows up.  The main thread comes first, since it creates most of them.
    """
    done: set[int] = set()
    while True:
        try:
            threads = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
        except OSError:
            return  # gone: nothing to give back
        new = sorted(threads - done, key=lambda t: (t != pid, t))
        if not new:
            return
        for tid in new:
            # A kernel worker of the process (io_uring's) refuses; it follows the process anyway.
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)
        done.update(new)
