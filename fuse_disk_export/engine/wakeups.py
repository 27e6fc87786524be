"""Prompt wake-ups while qemu-storage-daemon unmounts: a CPU latency request of 0 µs, held for
as long as the daemon takes to stop.

Each unmount of a FUSE export waits three times on a kernel thread: for two expedited RCU grace
periods (``namespace_unlock``, ``bdi_unregister``) and a writeback flush (``wb_shutdown``). The
scheduler runs that thread on an idle CPU where there is one, and waking a CPU from its idle
halt is what the wait costs: on this machine's virtual CPUs about 30 µs a wait, against 6 µs
when the CPU polls instead.  128 images wait 384 times (docs/benchmarks.md, "Round 5").

The kernel's interface for this is /dev/cpu_dma_latency (Documentation/power/pm_qos_interface.rst):
a request stands while its descriptor is open, and idle CPUs poll rather than halt while the
lowest request is 0.  The device is root's (mode 0600): without it nothing changes.  The request
ends with the descriptor, so also when we are killed.
"""

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
    try:
        fd = os.open(DEVICE, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        log.debug("no CPU latency request: %s", e)
        yield
        return
    try:
        # A native signed 32-bit number of microseconds.
        os.write(fd, struct.pack("=i", 0))
    except OSError as e:
        log.debug("no CPU latency request: %s", e)
    try:
        yield
    finally:
        os.close(fd)


def current() -> int | None:
    """The CPU latency the kernel grants now, in µs (what the device reads); None if unknown."""
    try:
        fd = os.open(DEVICE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4)
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(struct.unpack("=i", data)[0]) if len(data) == 4 else None
