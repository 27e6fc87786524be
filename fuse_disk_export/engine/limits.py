"""The process limits a large graph meets, known before the daemon starts rather than half-way.

A login shell's soft RLIMIT_NOFILE is often 1024: qemu-storage-daemon then failed at image 473
of 600 ("failed to open /dev/fuse: Too many open files").  The kernel refuses an argument list
larger than ARG_MAX, or one string larger than MAX_ARG_STRLEN (E2BIG: 4000 images).  One daemon
holds about 1000 FUSE exports at most: libfuse takes a pthread key per session, and glibc has
1024 (PTHREAD_KEYS_MAX; "failed to create thread specific key" at image 1192).
"""

import contextlib
import os
import resource
from collections.abc import Iterator, Mapping, Sequence

from fuse_disk_export.engine.graph import BlockGraph
from fuse_disk_export.errors import RequirementError, UsageError

#: Descriptors a daemon holds besides those of the graph (event notifiers, the monitor, io_uring,
#: its libraries), and a margin on top: 473 images (2 descriptors each) filled 1024.
BASE_DESCRIPTORS = 100
#: Most FUSE exports one daemon is given: 1191 were set up before the keys ran out (7.2), and 1000
#: went live in under a second.
MAX_FUSE_EXPORTS = 1100
#: The kernel's limit on one argument or environment string (32 pages: MAX_ARG_STRLEN).
MAX_ARG_STRLEN = 32 * 4096
#: Most images one daemon is given; more go to more daemons, started side by side.  Measured on
#: 2 vCPUs, 7.2 (read-only, 16 MiB qcow2s): 1000 images live in 533-752 ms in one daemon,
#: 381-497 ms in 2, 361-391 ms in 4 of 250, 405-469 ms in 8 of 125; 4000 in 16 daemons of 250:
#: 2.0 s, revert 0.7 s.  250 is also a quarter of what one daemon can hold (MAX_FUSE_EXPORTS).
SHARD_SIZE = 250


def descriptors_needed(graph_descriptors: int) -> int:
    """The soft RLIMIT_NOFILE a daemon needs for a graph holding ``graph_descriptors``."""
    return BASE_DESCRIPTORS + graph_descriptors * 11 // 10


@contextlib.contextmanager
def nofile_for_child(needed: int) -> Iterator[None]:
    """While the block runs, a child forked in it may open ``needed`` descriptors.

    Our own soft limit is raised for the moment of the fork (the child inherits it; nothing
    between fork and exec), and put back after.

    :raise RequirementError: the hard limit is below ``needed``; nothing was started.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed <= soft:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RequirementError(
            f"qemu-storage-daemon needs about {needed} open files for these exports, but the "
            f"hard limit is {hard}: raise it (as root: ulimit -Hn {needed}; systemd: "
            f"LimitNOFILE={needed}; /etc/security/limits.conf: nofile)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def check_fuse_exports(count: int) -> None:
    """:raise UsageError: more FUSE exports than one daemon can hold."""
    if count > MAX_FUSE_EXPORTS:
        raise UsageError(
            f"{count} images in one invocation: one qemu-storage-daemon holds at most "
            f"{MAX_FUSE_EXPORTS} FUSE exports (libfuse takes one of glibc's 1024 thread keys "
            "for each); export them in several invocations"
        )


def fits(graph: BlockGraph) -> bool:
    """Whether ``graph``'s command line fits what the kernel takes (with room for the binary's
    path and the monitor's options)."""
    try:
        check_command_line(["/" * 4096, *graph.command_line(), "--chardev", "x" * 64])
    except UsageError:
        return False
    return True


def check_command_line(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> None:
    """:raise UsageError: the kernel would refuse ``argv`` with this environment (E2BIG)."""
    environ = os.environ if environ is None else environ
    strings = [os.fsencode(a) for a in argv]
    strings += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in environ.items()]
    longest = max((len(s) + 1 for s in strings), default=0)
    # Each string and its terminating NUL, and a pointer to it.
    total = sum(len(s) + 1 + 8 for s in strings)
    limit = os.sysconf("SC_ARG_MAX")
    if longest > MAX_ARG_STRLEN or total > limit:
        raise UsageError(
            f"the block graph of these exports is {total} bytes on qemu-storage-daemon's command "
            f"line, more than the kernel takes ({limit}, at most {MAX_ARG_STRLEN} in one "
            "option): export the images in several invocations"
        )
