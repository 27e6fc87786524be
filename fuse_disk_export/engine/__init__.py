"""The engine: a block graph planned, brought up by one qemu-storage-daemon, served, taken down.

Its face is four functions:

``plan``
    images -> `BlockGraph`, pure data: the daemon's command line (`graph`).
``start``
    a daemon with that graph on its command line, returned once every export is mounted.
``serve``
    wait until something the caller watches calls it off (a stop signal, the exit of a process
    that must not die), an export is unmounted from outside, or the daemon dies.
``stop``
    SIGTERM, wait, detach whatever is left: the one way a daemon ends (`stop_all` may return
    once every export and image is closed, and `reap_all` waits for the exits).

It imports nothing of the application above it; `fuse_disk_export.errors` and
`fuse_disk_export.mounts` are the shared utilities it uses.  What must be watched, callers pass
in (`Watch`).
"""

from fuse_disk_export.engine.daemon import (
    Daemon,
    Exited,
    Unmounted,
    Watch,
    reap_all,
    secret_files,
    serve,
    start,
    start_all,
    stop,
    stop_all,
)
from fuse_disk_export.engine.graph import BlockGraph, Tuning, plan

__all__ = [
    "BlockGraph",
    "Daemon",
    "Exited",
    "Tuning",
    "Unmounted",
    "Watch",
    "plan",
    "reap_all",
    "secret_files",
    "serve",
    "start",
    "start_all",
    "stop",
    "stop_all",
]
