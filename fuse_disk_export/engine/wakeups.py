"""Prompt wake-ups while qemu-storage-daemon unmounts: a CPU latency request of 0 µs, held for
as long as the daemon takes to stop.

Each unmount of a FUSE export waits three times on a kernel thread: for two expedited RCU grace
periods (``namespace_unlock``, ``bdi_unregister``) and a writeback flush (``wb_shutdown``); 384
waits for 128 images.  Behind our daemon that thread mostly runs on another CPU, one that is
idle, and waking an idle CPU from its halt is most of what a wait costs: about 30 µs on this
machine's virtual CPUs, against 6 µs when the thread runs on the daemon's own CPU
(docs/benchmarks.md, "Round 5").  Where it runs is the scheduler's choice.

How soon an idle CPU answers can be asked for: /dev/cpu_dma_latency
(Documentation/power/pm_qos_interface.rst).  A request stands while its descriptor is open, and
while the lowest one is 0 a cpuidle governor keeps idle CPUs polling instead of halting.  The
device is root's (mode 0600); without it, or without a cpuidle driver that honours requests,
nothing changes.  The request ends with the descriptor, so also when we are killed.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator

from fuse_disk_export import lazylog

log = lazylog.get(__name__)

DEVICE = "/dev/cpu_dma_latency"


@contextlib.contextmanager
def prompt() -> Iterator[None]:
    """Ask for CPU wake-ups without delay for the duration of the block, where we may."""
    fd = -1
    try:
        fd = os.open(DEVICE, os.O_WRONLY | os.O_CLOEXEC)
        # A native signed 32-bit number of microseconds.
        os.write(fd, struct.pack("=i", 0))
    except OSError as e:
        # Not yielded from here: an error of the block would be chained to this one.
        log.debug("no CPU latency request: %s", e)
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)
