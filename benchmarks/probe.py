"""Run fuse-disk-export in the foreground and report when each phase was reached (run as a script).

    python probe.py NOTIFY_FD IMAGE...

Nothing in the package is patched: the package logs its phases at debug level (``-v``), and a
logging handler of ours turns each phase's first record into one JSON line on NOTIFY_FD as it
happens, ``{"mark": NAME, "t": MONOTONIC}``, comparable with the parent's clock.  The line
``live`` follows the mark of the same name.  The tool leaves with os._exit after its revert; its
exit is the parent's to time.
"""

import time

T_INTERP = time.monotonic()  # first statement: the interpreter and site are up
# Log records carry wall-clock times; this turns them into the parent's monotonic clock.
OFFSET = T_INTERP - time.time()

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

# sys.path[0] is benchmarks/, whose module names (proc, report...) must not shadow anything.
del sys.path[0]

notify_fd = int(sys.argv[1])
images = sys.argv[2:]

#: The first debug line starting with each prefix marks a phase.
PHASES = (
    ("request built", "request"),
    ("plan: ", "plan"),
    ("starting ", "spawn"),
    ("qemu-storage-daemon pid ", "spawned"),
    ("live: ", "live"),  # the daemon's greeting ("live: 9.4 ms after spawn"), then "live: PATH"
    ("SIGINT received", "sigint"),
    ("qemu-storage-daemon exited", "daemon-exit"),
)


def send(line: str) -> None:
    os.write(notify_fd, (line + "\n").encode())


def mark(name: str, t: float) -> None:
    send(json.dumps({"mark": name, "t": t}))


class Phases(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for prefix, name in PHASES:
            if not message.startswith(prefix):
                continue
            if name == "live" and "ms after spawn" in message:
                name = "greeting"
            elif name == "spawned" and not message.endswith("started"):
                return
            if name in self.seen:
                return
            self.seen.add(name)
            mark(name, record.created + OFFSET)
            if name == "live":
                send("live")
            return


mark("interp", T_INTERP)
import fuse_disk_export.cli as cli  # noqa: E402

mark("import_cli", time.monotonic())
logging.getLogger("fuse_disk_export").addHandler(Phases())

if __name__ == "__main__":
    mark("main", time.monotonic())
    sys.exit(cli.main(["-v", *images]))
