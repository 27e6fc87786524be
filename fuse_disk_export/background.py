"""Detach into the background, but release the invoking process only once the exports are live.

The invoking process must not return (tell a script "ready") before anything is mounted.  So it
forks the daemon, which takes a session of its own and lets python-daemon do the rest (working
directory, umask, standard streams, closing descriptors), and waits on a socketpair for the
daemon's report: ready, or the error that stopped it.

The hand-over is a two-way one, so that it cannot go wrong at either end:

- The daemon says ``ready`` and counts as live only once the parent has answered ``ack``.  A parent
  that is gone (killed) or that was told to stop first never acks: the daemon reverts.
- A stop signal (SIGINT, SIGTERM, SIGHUP; whatever disposition it inherited) reaches the waiting
  parent: unless ``ready`` is already there, it sends ``cancel``, waits until the daemon has rolled
  back and exited, and exits 128+N.  A signal after ``ready`` arrived changes nothing.
- Warnings the daemon logged during setup travel with ``ready`` and are printed by the parent, on
  the terminal the user is looking at.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import socket
import sys
from collections.abc import Callable, Sequence
from typing import IO

from fuse_disk_export import stopsignals
from fuse_disk_export.errors import FdeError, Interrupted, limit_reached

PROG = "fuse-disk-export"


class Reporter:
    """The daemon's end of the socket to the waiting parent; reports at most once."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock
        self._reported = False

    @property
    def fileno(self) -> int:
        """Readable when the parent cancelled (or vanished): watch it while setting up."""
        return self._sock.fileno() if self._sock is not None else -1

    def reason(self) -> str | None:
        """If the parent has cancelled the setup (or is gone), the reason; else None.

        Does not block; meant for the moment `fileno` turns readable.
        """
        if self._sock is None:
            return None
        try:
            data = self._sock.recv(256, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:
            return "the invoking process is gone"
        if not data:
            return "the invoking process is gone"
        line = data.decode(errors="replace").split("\n", 1)[0]
        return line.removeprefix("cancel ") if line.startswith("cancel") else None

    def _send(self, message: dict[str, object]) -> bool:
        if self._sock is None or self._reported:
            return False
        self._reported = True
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            return False  # EPIPE: the parent is gone, nobody to tell
        return True

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def ready(self, warnings: Sequence[str] = ()) -> None:
        """Tell the parent the exports are live, and wait for its acknowledgement.

        :raise FdeError: the parent cancelled (a stop signal) or is gone (killed) before it took
            the news: nobody knows the exports are live, so the caller reverts them.
        """
        answer = b""
        if self._send({"ready": True, "warnings": list(warnings)}):
            assert self._sock is not None
            try:
                while not answer.endswith(b"\n"):
                    chunk = self._sock.recv(256)
                    if not chunk:
                        break
                    answer += chunk
            except OSError:
                answer = b""
        self._close()
        if answer != b"ack\n":
            why = answer.decode(errors="replace").strip().removeprefix("cancel ")
            raise FdeError(
                f"the invoking process was {'stopped by ' + why if why else 'gone'} before the "
                "exports were live; reverted"
            )

    def failed(self, error: FdeError) -> None:
        """Tell the parent why the setup failed.  Our end stays open until we exit, so that a
        parent that cancelled returns only once the rollback is complete."""
        self._send({"ready": False, "message": str(error), "status": error.exit_status})

    @property
    def pending(self) -> bool:
        return self._sock is not None and not self._reported


def _read_report(sock: socket.socket, signals: stopsignals.SignalWatch) -> dict[str, object] | None:
    """Wait for one report line, or for a stop signal (then None)."""
    data = b""
    while not data.endswith(b"\n"):
        if signals.reason() is not None:
            # A report already sent stands (a "ready" with it: live, and it stays live).
            data += _available(sock)
            if not data.endswith(b"\n"):
                return None
            break
        readable, _, _ = select.select([sock.fileno(), signals.fileno], [], [])
        if sock.fileno() in readable:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    if not data:
        return {
            "ready": False,
            "message": "the background process exited before the exports were live",
            "status": 1,
        }
    try:
        report = json.loads(data.splitlines()[0])
    except ValueError:
        report = None
    if not isinstance(report, dict):
        return {
            "ready": False,
            "status": 1,
            "message": f"unexpected report from the background process: {data[:200]!r}",
        }
    return report


def _available(sock: socket.socket) -> bytes:
    """What the socket holds now, without waiting."""
    data = b""
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := sock.recv(4096, socket.MSG_DONTWAIT):
            data += chunk
    return data


def _cancel(sock: socket.socket, signame: str) -> None:
    """Tell the daemon to roll back and wait until it has (it closes its end by exiting)."""
    try:
        sock.sendall(f"cancel {signame}\n".encode())
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(30)
        while sock.recv(4096):
            pass
    except OSError:
        pass


def _wait_for_report(sock: socket.socket) -> tuple[int, list[str]]:
    """In the invoking process: the exit status and the lines to print on stderr."""
    with stopsignals.watching() as signals:
        report = _read_report(sock, signals)
        if report is None:
            interrupted = Interrupted(stopsignals.first() or "SIGINT")
            _cancel(sock, interrupted.signame)
            return interrupted.exit_status, [str(interrupted)]
        if report.get("ready"):
            try:
                sock.sendall(b"ack\n")
            except OSError:
                return 1, ["the background process was gone before the exports were live"]
            warnings = report.get("warnings")
            return 0, [str(w) for w in warnings] if isinstance(warnings, list) else []
    status = report.get("status", 1)
    return int(status) if isinstance(status, int) else 1, [str(report.get("message"))]


def run_detached(work: Callable[[Reporter], int], *, log_stream: IO[str] | None = None) -> int:
    """Run ``work`` in a detached daemon; return, in the invoking process, once it reports.

    ``work`` must call `Reporter.ready` when live, or `Reporter.failed`; its return value is the
    daemon's exit status.  Returns 0 when ready, else the failure's status (the message is printed
    to stderr here, in the invoking process).  The daemon is the invoking process's child until
    that exits (the command line does at once), and init's then.
    """
    import daemon  # only the -d path pays for this import

    ours, theirs = socket.socketpair()
    # A fork without exec: what the gc module documents gc.freeze() for.  The objects we have
    # now are left out of the daemon's collections, which would otherwise walk them all and
    # copy every page they are on (about 5 ms to live, A/B).
    gc.freeze()
    child = os.fork()
    if child:
        theirs.close()
        try:
            status, lines = _wait_for_report(ours)
        finally:
            ours.close()
        for line in lines:
            print(f"{PROG}: {line}", file=sys.stderr)
        return status

    ours.close()
    status = 1
    reporter = Reporter(theirs)
    try:
        # A session of our own, which has no controlling terminal.  python-daemon's detach would
        # fork twice more (milliseconds) so that the daemon is not a session leader, which could
        # acquire a terminal by opening one: this process opens none.  Its parent, the invoking
        # process, exits once it has the report, and init adopts it.
        os.setsid()
        devnull = open(os.devnull, "r+")  # noqa: SIM115 - lives as long as the daemon
        context = daemon.DaemonContext(
            working_directory="/",
            umask=0o022,
            detach_process=False,
            files_preserve=[theirs] + ([log_stream] if log_stream else []),
            stdin=devnull,
            stdout=devnull,
            stderr=log_stream or devnull,
            # Our stop-signal handlers (stopsignals) revert; python-daemon's would not.
            signal_map={},
        )
        with context:
            status = work(reporter)
    except BaseException as e:  # the parent must hear something, whatever happened
        e = limit_reached(e) or e
        if reporter.pending:
            reporter.failed(
                e
                if isinstance(e, FdeError)
                else FdeError(f"internal error in the background process: {e!r}")
            )
        if not isinstance(e, FdeError):
            raise
        status = e.exit_status
    finally:
        if reporter.pending:
            reporter.failed(FdeError("the background process ended before the exports were live"))
        os._exit(status)
