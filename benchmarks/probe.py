"""Run fuse-disk-export in the foreground with timestamps on its phases (run as a script).

    python probe.py NOTIFY_FD IMAGE...

Writes ``live`` to NOTIFY_FD once every export is live, and one JSON object (the timestamps, all
``time.monotonic()``, comparable with the parent's clock) when it exits after SIGINT.  Nothing in
the package is changed: the phases are found by wrapping a few of its functions at run time, and a
wrapper whose target no longer exists is simply skipped (that phase is then missing from the
breakdown).
"""

import time

T_INTERP = time.monotonic()  # first statement: the interpreter and site are up

import contextlib  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

# sys.path[0] is benchmarks/, whose module names (proc, report...) must not shadow anything.
del sys.path[0]

marks: dict[str, float] = {"interp": T_INTERP}
events: list[tuple[str, float, float]] = []
notify_fd = int(sys.argv[1])
images = sys.argv[2:]


def mark(name: str) -> None:
    marks[name] = time.monotonic()


import fuse_disk_export.cli as cli  # noqa: E402

mark("import_cli")
# What a real run imports lazily (inside main), so that "imports" is one number.  Modules that do
# not exist in the measured version are skipped.
for _mod in (
    "fuse_disk_export.request",
    "fuse_disk_export.images",
    "fuse_disk_export.detect",
    "fuse_disk_export.export",
    "fuse_disk_export.state",
    "fuse_disk_export.mounts",
    "fuse_disk_export.engine.graph",
    "fuse_disk_export.engine.daemon",
    "fuse_disk_export.engine.session",
):
    with contextlib.suppress(ImportError):
        importlib.import_module(_mod)
mark("imports")


def wrap_async(
    owner: object, attr: str, label: str, *, arg_label: int | None = None, static: bool = False
) -> None:
    orig = getattr(owner, attr, None)
    if orig is None:
        return

    @functools.wraps(orig)
    async def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        begin = time.monotonic()
        try:
            return await orig(*args, **kwargs)
        finally:
            name = label
            if arg_label is not None and len(args) > arg_label:
                name = f"{label}:{args[arg_label]}"
            events.append((name, begin, time.monotonic()))

    setattr(owner, attr, staticmethod(wrapper) if static else wrapper)


def instrument() -> None:
    try:
        from qemu.qmp import QMPClient

        wrap_async(QMPClient, "connect", "qmp-connect")
    except ImportError:
        pass
    try:
        from fuse_disk_export.engine.daemon import StorageDaemon

        wrap_async(StorageDaemon, "start", "daemon-start", static=True)
        wrap_async(StorageDaemon, "execute", "qmp", arg_label=1)
        wrap_async(StorageDaemon, "stop", "daemon-stop")
    except ImportError:
        pass
    try:
        from fuse_disk_export.engine.session import Session
    except ImportError:
        return
    wrap_async(Session, "_apply", "apply")
    wrap_async(Session, "_revert", "revert")
    wrap_async(Session, "_undo", "undo")
    orig_init = Session.__init__

    @functools.wraps(orig_init)
    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        orig_init(self, *args, **kwargs)
        callback = getattr(self, "on_live", None)
        if callback is None:
            return

        def on_live(session):  # type: ignore[no-untyped-def]
            callback(session)
            mark("live")
            os.write(notify_fd, b"live\n")

        self.on_live = on_live

    Session.__init__ = init  # type: ignore[method-assign]


def main() -> int:
    instrument()
    mark("main")
    status = 1
    try:
        status = cli.main(images)
    finally:
        mark("exit")
        report = {"marks": marks, "events": events, "status": status}
        os.write(notify_fd, json.dumps(report).encode() + b"\n")
        os.close(notify_fd)
    return status


if __name__ == "__main__":
    sys.exit(main())
