"""What the QEMU that will answer is, known before it is started (the plan depends on it).

The graph goes to qemu-storage-daemon on its command line, so it is planned before the daemon of
the export could tell anything.  One short-lived daemon with its monitor on stdio tells it
instead: its greeting names the version, ``query-qmp-schema`` shows the features.  The answer is
kept per binary (path, inode, size, modification time) in a cache file the caller names, so the
cost, about 40-100 ms, is paid once per installed QEMU.
"""

import contextlib
import json
import os
import subprocess
import threading
from collections.abc import Iterable
from typing import NamedTuple

from fuse_disk_export.engine import versions
from fuse_disk_export.engine.versions import QemuVersion

#: The cache's file name, in the folder the caller gives.
CACHE = "qemu-info.json"
#: How long the probe may take: a QEMU that does not answer is taken for an unknown one.
TIMEOUT = 30.0


class QemuInfo(NamedTuple):
    """A qemu-storage-daemon binary: its version, and the schema features the plan uses."""

    version: QemuVersion
    #: A FUSE export takes a list of iothreads: its ``iothread`` member is the alternate of
    #: ``str`` and ``[str]`` (BlockExportIothreads).  That came with the series "export/fuse: Use
    #: coroutines and multi-threading", whose first patch ("fuse: Copy write buffer content
    #: before polling") is the fix for concurrent writes (`versions.needs_write_guard`).
    multiqueue_fuse: bool
    #: ``block-export-add`` takes type "fuse": a QEMU built without FUSE (``--disable-fuse``, or
    #: no libfuse3 at build time) drops the case from the schema.  None where the schema's shape
    #: is not the one known (the export is then tried, and QEMU's own error tells).
    fuse_export: bool | None = None


def _key(binary: str) -> str:
    st = os.stat(binary)
    return f"{os.path.realpath(binary)}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _load(cache: str) -> dict[str, object]:
    try:
        with open(cache, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _from_json(value: object) -> QemuInfo | None:
    if not isinstance(value, dict):
        return None
    version, multiqueue = value.get("version"), value.get("multiqueue_fuse")
    # Absent from a cache written before it was asked: then the binary is asked again.
    fuse = value.get("fuse_export", "absent")
    if (
        isinstance(version, list)
        and len(version) == 3
        and all(isinstance(v, int) for v in version)
        and isinstance(multiqueue, bool)
        and (fuse is None or isinstance(fuse, bool))
    ):
        return QemuInfo((version[0], version[1], version[2]), multiqueue, fuse)
    return None


def _remember(binary: str, info: QemuInfo, cache: str) -> None:
    """Keep ``info`` in file ``cache`` for the next plan.  Never raises."""
    with contextlib.suppress(OSError, ValueError):
        key = _key(binary)
        path = key.split(":", 1)[0] + ":"
        known = {k: v for k, v in _load(cache).items() if not k.startswith(path)}
        known[key] = {
            "version": list(info.version),
            "multiqueue_fuse": info.multiqueue_fuse,
            "fuse_export": info.fuse_export,
        }
        os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
        # Written beside, then renamed: readers see the old cache or the new one.
        tmp = f"{cache}.{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8", opener=_private) as f:
                f.write(json.dumps(known))
            os.replace(tmp, cache)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


def parse(replies: Iterable[bytes]) -> QemuInfo | None:
    """`QemuInfo` from a monitor's lines: the greeting, then the answer to query-qmp-schema.

    Pure, for tests: None where either is missing or malformed.
    """
    version: QemuVersion | None = None
    for line in replies:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        if "QMP" in message:
            version = versions.from_greeting(message)
        elif isinstance(message.get("return"), list):
            if version is None:
                return None
            return _from_schema(version, message["return"])
    return None


def _from_schema(version: QemuVersion, schema: list[object]) -> QemuInfo:
    types = {t["name"]: t for t in schema if isinstance(t, dict) and "name" in t}
    for entry in types.values():
        members = {m.get("name"): m.get("type") for m in entry.get("members", ()) or ()}
        # BlockExportOptions: the one object with both (introspection hides type names).
        if "iothread" in members and "fixed-iothread" in members:
            kind = types.get(str(members["iothread"]), {})
            variants = entry.get("variants")
            fuse = (
                any(v.get("case") == "fuse" for v in variants if isinstance(v, dict))
                if entry.get("tag") == "type" and isinstance(variants, list)
                else None
            )
            return QemuInfo(version, kind.get("meta-type") == "alternate", fuse)
    return QemuInfo(version, False)


def probe(binary: str) -> QemuInfo | None:
    """Ask ``binary`` itself (no cache): a daemon with its monitor on stdio, for a moment."""
    try:
        proc = subprocess.Popen(
            [binary, "--chardev", "stdio,id=fde-probe", "--monitor", "fde-probe"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        return None
    assert proc.stdin is not None and proc.stdout is not None
    # A QEMU that hangs is killed (ours, by its Popen) and taken for an unknown one.
    timer = threading.Timer(TIMEOUT, proc.kill)
    timer.start()
    try:
        # Quit only once the schema is read: a daemon that quits first cuts its own answer.
        proc.stdin.write(b'{"execute":"qmp_capabilities"}\n{"execute":"query-qmp-schema"}\n')
        proc.stdin.flush()
        lines: list[bytes] = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(b'{"return": [') or len(lines) > 4:
                break
        proc.stdin.write(b'{"execute":"quit"}\n')
        proc.stdin.close()
        proc.wait(timeout=TIMEOUT)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    finally:
        timer.cancel()
        # Whatever cut the probe short (a hang, or a stop signal raised in `--doctor`), the
        # daemon does not outlive it.
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return parse(lines)


def of(binary: str, cache: str) -> QemuInfo | None:
    """``binary``'s `QemuInfo`, from file ``cache`` or from a probe; None if it cannot be told
    (the caller then plans for the oldest QEMU)."""
    with contextlib.suppress(OSError):
        known = _from_json(_load(cache).get(_key(binary)))
        if known is not None:
            return known
    info = probe(binary)
    if info is not None:
        _remember(binary, info, cache)
    return info
