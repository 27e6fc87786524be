"""Which QEMU version will answer, known before it is started (the plan depends on it).

The graph goes to qemu-storage-daemon on its command line, so it is planned before the daemon's
greeting could say which version it is.  ``qemu-storage-daemon --version`` says it, at the cost of
starting one more process; its answer is kept per binary (path, inode, size, modification time)
in a cache file the caller names (the command line: in its runtime registry folder), and the
greeting of every run writes it again, so the cost is paid once per installed QEMU.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess

from fuse_disk_export.engine.versions import QemuVersion

#: The cache's file name, in the folder the caller gives.
CACHE = "qemu-versions.json"


def _key(binary: str) -> str:
    st = os.stat(binary)
    return f"{os.path.realpath(binary)}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _load(cache: str) -> dict[str, list[int]]:
    try:
        with open(cache, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember(binary: str, version: QemuVersion, cache: str) -> None:
    """Keep ``binary``'s version (from its greeting) in file ``cache`` for the next plan.  Never
    raises."""
    with contextlib.suppress(OSError, ValueError):
        key = _key(binary)
        known = _load(cache)
        if known.get(key) == list(version):
            return
        known = {k: v for k, v in known.items() if not k.startswith(key.split(":", 1)[0] + ":")}
        known[key] = list(version)
        os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
        # Written beside, then renamed: readers see the old cache or the new one.
        tmp = f"{cache}.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8", opener=_private) as f:
            f.write(json.dumps(known))
        os.replace(tmp, cache)


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


def of(binary: str, cache: str) -> QemuVersion | None:
    """``binary``'s version, from file ``cache`` or from ``--version``; None if it cannot be
    told."""
    with contextlib.suppress(OSError):
        value = _load(cache).get(_key(binary))
        if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) for v in value):
            return (value[0], value[1], value[2])
    try:
        out = subprocess.run(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        return None
    version = (int(found[1]), int(found[2]), int(found[3]))
    remember(binary, version, cache)
    return version
