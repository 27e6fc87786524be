"""What every benchmark needs: where things are, how to run the tool, and the janitor."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.proc import Janitor, run


@dataclass
class Ctx:
    """One bench run.

    :param repo: the checkout whose benchmarks/ and .venv are used.
    :param tree: the checkout whose fuse_disk_export is measured (default: ``repo``).
    :param work: scratch directory for images and mount points (removed at the end).
    """

    repo: str
    tree: str
    work: str
    janitor: Janitor
    reps: int = 3
    fio_runtime: float = 1.5
    quick: bool = False
    targets: tuple[str, ...] | None = None
    cells: tuple[str, ...] | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def python(self) -> str:
        return os.path.join(self.repo, ".venv", "bin", "python")

    @property
    def tool(self) -> list[str]:
        """argv prefix that runs fuse-disk-export the way users do (its console script)."""
        return [os.path.join(self.repo, ".venv", "bin", "fuse-disk-export")]

    @property
    def env(self) -> dict[str, str]:
        """Environment for the tool: the measured tree first on sys.path, and byte-code cached in
        a directory of our own (this machine exports PYTHONDONTWRITEBYTECODE, which would make
        every run compile the package again; users have .pyc files)."""
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(self.repo, "bench-results", "pycache")
        if os.path.realpath(self.tree) != os.path.realpath(self.repo):
            env["PYTHONPATH"] = self.tree
        else:
            env.pop("PYTHONPATH", None)
        return env

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def versions() -> dict[str, str]:
    """Versions of everything measured, for the record."""
    out: dict[str, str] = {}

    def first_line(argv: list[str]) -> str:
        if shutil.which(argv[0]) is None:
            return "missing"
        try:
            return run(argv, timeout=10).stdout.strip().splitlines()[0]
        except Exception as e:
            return f"unknown ({e})"

    out["qemu-storage-daemon"] = first_line(["qemu-storage-daemon", "--version"])
    out["qemu-nbd"] = first_line(["qemu-nbd", "--version"])
    out["nbdfuse"] = first_line(["nbdfuse", "--version"])
    out["fio"] = first_line(["fio", "--version"])
    out["kernel"] = os.uname().release
    out["python"] = sys.version.split()[0]
    out["cpus"] = str(os.cpu_count())
    return out
