"""``--mount-fs DIR``: a userspace FUSE driver serving a partition's filesystem at DIR.

The driver reads the export's private raw file (the partition), in the foreground as our child
with a parent-death signal, so that it never outlives us.  DIR counts as mounted once it is a
mount point in /proc/self/mountinfo; unmounting goes through ``fusermount3 -u`` (the driver then
flushes, closes and exits) and the driver's exit is awaited before the export under it is
reverted.  A hostile filesystem is parsed by this unprivileged process, not by the kernel.
"""

import contextlib
import logging
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from fuse_disk_export import mounts
from fuse_disk_export.engine.process import StderrTap, describe_exit, start_child
from fuse_disk_export.errors import FsError, MountError, RequirementError
from fuse_disk_export.mountfs.drivers import DRIVERS, Driver

log = logging.getLogger(__name__)

#: How long a driver may take to mount, and to unmount and exit.
MOUNT_TIMEOUT = 30.0
UNMOUNT_TIMEOUT = 10.0


class Mounted(NamedTuple):
    """A driver serving a filesystem at ``directory``."""

    directory: str
    fs: str
    driver: Driver
    process: subprocess.Popen[bytes]
    stderr: StderrTap
    #: Its mount as it was made (None until then): found by `mounts.same_mount` even after a
    #: folder above it was renamed, which takes the mount to another path.
    entry: mounts.MountEntry | None = None

    def now(self) -> mounts.MountEntry | None:
        """Its mount as it is now, if it is still there.

        Once the driver has exited, a mount found by the same ID and device that a process
        serves is another program's: the kernel gives both numbers out again at once (a test
        of ours detached another's export that way).
        """
        if self.entry is None:
            entry = mounts.mount_at(self.directory)
        else:
            entry = mounts.same_mount(self.entry)
        if entry is None or self.process.poll() is None or not entry.is_fuse:
            return entry
        return None if mounts.connection_id(entry) in mounts.served_connections() else entry


def find_driver(fs: str) -> str:
    """The driver program for ``fs``.

    :raise RequirementError: none is installed (the error names the Debian package).
    """
    driver = DRIVERS[fs]
    path = shutil.which(driver.program)
    if path is None:
        raise RequirementError(
            f"{driver.program} not found: {fs} filesystems need it (Debian package "
            f"{driver.package})"
        )
    return path


def check_directory(directory: str) -> None:
    """:raise MountError: ``directory`` is not a directory we may mount on."""
    if mounts.mount_at(directory) is not None:
        raise MountError("is already a mount point", path=directory)
    if not os.path.isdir(directory):
        raise MountError("is not a directory", path=directory)


def _argv(program: str, driver: Driver, source: str, directory: str, read_only: bool) -> list[str]:
    options = []
    foreground = list(driver.foreground)
    if foreground[:1] == ["-o"]:
        options.append(foreground[1])
        foreground = foreground[2:]
    if read_only:
        options.append("ro")
    if driver.fs == "ext" and os.geteuid() != 0:
        # The files keep their owners; without this, another user's files could not be read.
        options.append("fakeroot")
    argv = [program, *foreground, source, directory]
    return [*argv, "-o", ",".join(options)] if options else argv


def _wait_mounted(
    directory: str, program: str, process: subprocess.Popen[bytes], tap: StderrTap
) -> mounts.MountEntry:
    pidfd = os.pidfd_open(process.pid)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    try:
        with open(mounts.MOUNTINFO, "rb") as table:
            poller = select.poll()
            poller.register(table.fileno(), select.POLLPRI | select.POLLERR)
            poller.register(pidfd, select.POLLIN)
            poller.register(tap.fd, select.POLLIN)
            while True:
                table.seek(0)
                text = table.read().decode("utf-8", "surrogateescape")
                entry = mounts.mount_at(directory, mounts.parse_mountinfo(text))
                if entry is not None:
                    return entry
                if process.poll() is not None:
                    said = tap.since(0)
                    raise FsError(
                        f"{program} could not mount it: "
                        f"{said[-1] if said else 'exited with status ' + str(process.returncode)}",
                        path=directory,
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FsError("the filesystem driver did not mount it in time", path=directory)
                for fd, _ in poller.poll(remaining * 1000):
                    if fd == tap.fd and not tap.pump():
                        poller.unregister(tap.fd)
    finally:
        os.close(pidfd)


def unmount(mounted: Mounted) -> None:
    """Unmount DIR (the driver flushes and exits), wait for the driver; detach what is left."""
    process = mounted.process
    now = mounted.now()
    directory = now.mount_point if now is not None else mounted.directory
    if process.poll() is None and now is not None:
        result = subprocess.run(
            [mounts.fusermount() or "fusermount3", "-u", directory],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            log.warning(
                "%s: %s; detaching it lazily",
                directory,
                result.stderr.strip().removeprefix("fusermount3: ") or "unmount failed",
            )
            mounts.lazy_unmount(directory)
    if process.poll() is None:
        pidfd = os.pidfd_open(process.pid)
        try:
            if not select.select([pidfd], [], [], UNMOUNT_TIMEOUT)[0]:
                log.warning(
                    "%s (pid %d) did not exit; killing it", mounted.driver.program, process.pid
                )
                process.kill()
        finally:
            os.close(pidfd)
    process.wait()
    mounted.stderr.close()
    left = mounted.now()
    if left is not None:
        log.warning("a mount was left on %s; detaching it", left.mount_point)
        mounts.lazy_unmount(left.mount_point)


@contextlib.contextmanager
def mounted(
    source: str, directory: str, fs: str, *, read_only: bool, pass_fds: Sequence[int] = ()
) -> Iterator[Mounted]:
    """``fs``'s driver serving ``source`` at ``directory`` for the duration of the block.

    :param pass_fds: descriptors the driver holds (the pid file watcher's: `pidfile.watcher`).

    :raise FsError: the driver could not mount it (its own reason is in the message).
    :raise RequirementError: the driver is not installed.
    """
    driver = DRIVERS[fs]
    program = find_driver(fs)
    process, tap = start_child(
        _argv(program, driver, source, directory, read_only), pass_fds=pass_fds
    )
    if driver.chatty:
        tap.quiet()
    here = Mounted(directory, fs, driver, process, tap)
    try:
        here = here._replace(entry=_wait_mounted(directory, driver.program, process, tap))
        here.stderr.release()
        log.debug(
            "%s: %s filesystem mounted by %s (pid %d)", directory, fs, driver.program, process.pid
        )
        yield here
    finally:
        unmount(here)


def driver_died(mounted: Mounted) -> FsError:
    """The error of a driver that exited while serving: the caller reverts the export under it."""
    status = mounted.process.wait()
    said = mounted.stderr.since(0)
    why = f": {said[-1]}" if said else ""
    return FsError(
        f"{mounted.driver.program} (pid {mounted.process.pid}) "
        f"{describe_exit(status)} while serving{why}; detached it, and reverted "
        "the export",
        path=mounted.directory,
    )
