"""What qemu-storage-daemon gets between fork and exec: room in its descriptor table."""

from __future__ import annotations

import subprocess
import sys

from fuse_disk_export.engine.process import ChildSetup, start_child


def _fd_slots(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("FDSize:"):
                return int(line.split()[1])
    raise AssertionError("no FDSize in /proc/PID/status")


def _slots_of_a_child(setup: ChildSetup | None) -> int:
    process, tap = start_child(["sleep", "30"], stderr=2, setup=setup)
    try:
        return _fd_slots(process.pid)
    finally:
        process.kill()
        process.wait()
        tap.close()


def test_the_table_is_grown_before_exec() -> None:
    assert _slots_of_a_child(ChildSetup(descriptors=1000)) >= 1000


def test_a_plain_child_keeps_the_default_table() -> None:
    assert _slots_of_a_child(None) < 1000


def test_the_table_grows_only_as_far_as_the_limit() -> None:
    script = """
import resource
from fuse_disk_export.engine.process import reserve_descriptors
resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
reserve_descriptors(5000)
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("FDSize:")][0])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert 200 <= int(out.stdout) < 5000
