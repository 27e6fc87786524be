"""Run fuse-disk-export in the foreground with timestamps on its phases (run as a script).

    python probe.py NOTIFY_FD IMAGE...

Writes ``live`` to NOTIFY_FD once every export is live, and one JSON object (the timestamps, all
``time.monotonic()``, comparable with the parent's clock) when it exits after SIGINT.

Nothing in the package is changed, and nothing is imported ahead of time (the tool overlaps the
daemon's boot with its own imports, and the probe must not undo that): a few functions are wrapped
as their modules finish loading, through an import hook.  A wrapper whose target no longer exists
is skipped, and that phase is then missing from the breakdown.
"""

import time

T_INTERP = time.monotonic()  # first statement: the interpreter and site are up

import functools  # noqa: E402
import importlib.abc  # noqa: E402
import importlib.machinery  # noqa: E402
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


def wrap(
    owner: object,
    attr: str,
    label: str,
    *,
    arg_label: int | None = None,
    static: bool = False,
) -> None:
    """Record (label, begin, end) around every call of ``owner.attr`` (sync or async)."""
    orig = getattr(owner, attr, None)
    if orig is None:
        return

    def record(begin: float, args: tuple) -> None:  # type: ignore[type-arg]
        name = label
        if arg_label is not None and len(args) > arg_label:
            name = f"{label}:{args[arg_label]}"
        events.append((name, begin, time.monotonic()))

    async def finish(awaitable, begin: float, args: tuple):  # type: ignore[no-untyped-def,type-arg]
        try:
            return await awaitable
        finally:
            record(begin, args)

    # Sync or async alike (qemu.qmp's decorators return coroutines from plain functions): time
    # the call, and if it returned an awaitable, until that is done.
    @functools.wraps(orig)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        begin = time.monotonic()
        try:
            result = orig(*args, **kwargs)
        except BaseException:
            record(begin, args)
            raise
        if hasattr(result, "__await__"):
            return finish(result, begin, args)
        record(begin, args)
        return result

    setattr(owner, attr, staticmethod(wrapper) if static else wrapper)


def _qmp_client(module: object) -> None:
    client = getattr(module, "QMPClient", None)
    if client is not None:
        wrap(client, "connect", "qmp-connect")


def _process(module: object) -> None:
    wrap(module, "spawn", "spawn")  # the daemon started before the heavy imports (216068d on)


def _daemon(module: object) -> None:
    daemon = getattr(module, "StorageDaemon", None)
    if daemon is None:
        return
    wrap(daemon, "start", "daemon-start", static=True)  # spawn + connect (before 216068d)
    wrap(daemon, "execute", "qmp", arg_label=1)
    wrap(daemon, "stop", "daemon-stop")


def _session(module: object) -> None:
    session = getattr(module, "Session", None)
    if session is None:
        return
    wrap(session, "_apply", "apply")
    wrap(session, "_revert", "revert")
    wrap(session, "_undo", "undo")
    orig_init = session.__init__

    @functools.wraps(orig_init)
    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        orig_init(self, *args, **kwargs)
        callback = getattr(self, "on_live", None)
        if callback is None:
            return

        def on_live(live_session):  # type: ignore[no-untyped-def]
            callback(live_session)
            mark("live")
            os.write(notify_fd, b"live\n")

        self.on_live = on_live

    session.__init__ = init


HOOKS = {
    "qemu.qmp.qmp_client": _qmp_client,
    "fuse_disk_export.engine.process": _process,
    "fuse_disk_export.engine.daemon": _daemon,
    "fuse_disk_export.engine.session": _session,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs HOOKS[name] on a module right after it has executed, before anyone imports from it."""

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name not in HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            loader_exec(module)
            HOOKS[name](module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _AfterImport())

import fuse_disk_export.cli as cli  # noqa: E402

mark("import_cli")


def main() -> int:
    mark("main")
    # The tool leaves the foreground with os._exit; the report below must still be written.
    cli.exit_now = sys.exit  # type: ignore[assignment]
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
