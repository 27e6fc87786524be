"""Detach into the background, but release the invoking process only once the exports are live.

python-daemon's detach makes the calling process exit at once, which would tell a script "ready"
before anything is mounted.  So we fork first: the invoking process waits on a pipe, and the
detached daemon writes one message to it — ready, or the error that stopped it — then closes it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import IO

from fuse_disk_export.errors import FdeError


class Reporter:
    """The daemon's end of the pipe to the waiting parent; reports at most once."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def _send(self, message: dict[str, object]) -> bool:
        """Send ``message``; False if the parent was gone (killed, interrupted) and never got it."""
        if self._fd < 0:
            return False
        try:
            os.write(self._fd, json.dumps(message).encode() + b"\n")
        except OSError:
            return False  # EPIPE: the parent is gone, nobody to tell
        finally:
            os.close(self._fd)
            self._fd = -1
        return True

    def ready(self) -> None:
        """Tell the parent the exports are live.

        :raise FdeError: the parent is gone: whoever started us was interrupted or killed before
            the exports were live, so nobody knows they are; the caller reverts them.
        """
        if not self._send({"ready": True}):
            raise FdeError(
                "the invoking process was gone (interrupted or killed) before the exports were "
                "live; reverted"
            )

    def failed(self, error: FdeError) -> None:
        self._send({"ready": False, "message": str(error), "status": error.exit_status})

    @property
    def pending(self) -> bool:
        return self._fd >= 0


def _wait_for_report(fd: int, child: int) -> tuple[int, str | None]:
    with os.fdopen(fd, "rb") as pipe:
        data = pipe.read().decode(errors="replace").strip()
    # The intermediate child exits as soon as python-daemon has detached the grandchild.
    os.waitpid(child, 0)
    if not data:
        return 1, "the background process exited before the exports were live"
    try:
        report = json.loads(data.splitlines()[0])
    except ValueError:
        return 1, f"unexpected report from the background process: {data[:200]!r}"
    if report.get("ready"):
        return 0, None
    return int(report.get("status", 1)), str(report.get("message", "failed"))


def run_detached(work: Callable[[Reporter], int], *, log_stream: IO[str] | None = None) -> int:
    """Run ``work`` in a detached daemon; return, in the invoking process, once it reports.

    ``work`` must call `Reporter.ready` when live, or `Reporter.failed`; its return value is the
    daemon's exit status.  Returns 0 when ready, else the failure's status (the message is printed
    to stderr here, in the invoking process).
    """
    import daemon  # only the -d path pays for this import

    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(write_end)
        status, message = _wait_for_report(read_end, child)
        if message:
            print(f"fuse-disk-export: {message}", file=sys.stderr)
        return status

    os.close(read_end)
    status = 1
    reporter = Reporter(write_end)
    try:
        devnull = open(os.devnull, "r+")  # noqa: SIM115 - lives as long as the daemon
        context = daemon.DaemonContext(
            working_directory="/",
            umask=0o022,
            detach_process=True,
            files_preserve=[write_end] + ([log_stream] if log_stream else []),
            stdin=devnull,
            stdout=devnull,
            stderr=log_stream or devnull,
            # Our asyncio loop installs the handlers that revert; python-daemon's would not.
            signal_map={},
        )
        with context:
            status = work(reporter)
    except FdeError as e:
        reporter.failed(e)
        status = e.exit_status
    except BaseException as e:  # the parent must hear something, whatever happened
        reporter.failed(FdeError(f"internal error in the background process: {e!r}"))
        raise
    finally:
        if reporter.pending:
            reporter.failed(FdeError("the background process ended before the exports were live"))
        os._exit(status)
