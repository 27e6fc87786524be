"""What this qemu-storage-daemon offers for FUSE exports, read from ``query-qmp-schema``.

Newer QEMU versions add FUSE export options that would change the defaults worth choosing:
multi-threaded FUSE exports (a list of iothreads) and FUSE-over-io_uring.  This records, for the
QEMU being measured, the members of the FUSE export options, the export options common to every
export type, and the ``aio`` modes of the file driver.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from typing import Any

from benchmarks.context import Ctx
from benchmarks.proc import BenchError

# Names under which newer QEMU versions expose what 7.2 lacks.
WATCH = {
    "iothreads": "multi-threaded FUSE export (a list of iothreads)",
    "io-uring": "FUSE-over-io_uring",
    "uring": "FUSE-over-io_uring (as posted)",
}


class _Qmp:
    """A minimal synchronous QMP client over a socketpair (one command at a time)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        self.proc = subprocess.Popen(
            [
                "qemu-storage-daemon",
                "--chardev",
                f"socket,id=m0,fd={fd}",
                "--monitor",
                "chardev=m0",
            ],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        ours.settimeout(10)
        self.sock = ours
        self.file = ours.makefile("rwb")
        try:
            self._reply()  # greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _reply(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise BenchError("qemu-storage-daemon closed QMP")
            message = json.loads(line)
            if "event" not in message:
                return message  # type: ignore[no-any-return]

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        reply = self._reply()
        if "error" in reply:
            raise BenchError(f"{command}: {reply['error'].get('desc')}")
        return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(BenchError, OSError, ValueError):
            self.execute("quit")
        self.file.close()
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _members(types: dict[str, dict[str, Any]], name: str) -> dict[str, str]:
    entry = types.get(name, {})
    return {m["name"]: m["type"] for m in entry.get("members", [])}


def _variant(types: dict[str, dict[str, Any]], name: str, case: str) -> str | None:
    for v in types.get(name, {}).get("variants", []):
        if v["case"] == case:
            return str(v["type"])
    return None


def _describe(types: dict[str, dict[str, Any]], type_name: str) -> str:
    entry = types.get(type_name)
    if entry is None:
        return type_name
    kind = entry.get("meta-type")
    if kind == "builtin":
        return str(entry.get("json-type", type_name))
    if kind == "enum":
        return "enum " + "|".join(entry.get("values", []))
    if kind == "array":
        return f"list of {_describe(types, entry['element-type'])}"
    if kind == "alternate":
        return " or ".join(_describe(types, m["type"]) for m in entry.get("members", []))
    return str(kind)


def probe(ctx: Ctx) -> dict[str, Any]:
    ctx.log("QEMU features (query-qmp-schema)")
    qmp = _Qmp()
    try:
        schema = qmp.execute("query-qmp-schema")
        version = qmp.execute("query-version")
    finally:
        qmp.close()
    types = {e["name"]: e for e in schema}
    commands = {e["name"]: e for e in schema if e.get("meta-type") == "command"}
    export_args = commands["block-export-add"]["arg-type"]
    common = _members(types, export_args)
    fuse_type = _variant(types, export_args, "fuse")
    fuse = _members(types, fuse_type) if fuse_type else {}
    blockdev_args = commands["blockdev-add"]["arg-type"]
    file_type = _variant(types, blockdev_args, "file")
    file_members = _members(types, file_type) if file_type else {}
    q = version["qemu"]
    return {
        "qemu": f"{q['major']}.{q['minor']}.{q['micro']} {version.get('package', '')}".strip(),
        "fuse_export": {k: _describe(types, v) for k, v in fuse.items()},
        "export_common": {k: _describe(types, v) for k, v in common.items() if k != "type"},
        "file_aio": _describe(types, file_members["aio"]) if "aio" in file_members else None,
        "missing": {
            name: what for name, what in WATCH.items() if name not in fuse and name not in common
        },
    }
