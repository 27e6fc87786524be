"""What a child of ours starts with: room in its descriptor table, and a parent-death signal."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from fuse_disk_export.engine.process import room_for_descriptors, start_child
from tests.helpers.runner import pid_gone, wait_for


def _fd_slots(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("FDSize:"):
                return int(line.split()[1])
    raise AssertionError("no FDSize in /proc/PID/status")


def _slots_of_a_child(room: int) -> int:
    with room_for_descriptors(room):
        process, tap = start_child(["sleep", "30"], stderr=2)
    try:
        return _fd_slots(process.pid)
    finally:
        process.kill()
        process.wait()
        tap.close()


def test_the_table_is_grown_before_exec() -> None:
    assert _slots_of_a_child(1000) >= 1000


def test_a_plain_child_keeps_a_small_table() -> None:
    assert _slots_of_a_child(0) < 1000


def test_the_table_grows_only_as_far_as_the_limit() -> None:
    script = """
import resource, subprocess
from fuse_disk_export.engine.process import room_for_descriptors
resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
with room_for_descriptors(5000):
    child = subprocess.Popen(["sleep", "30"])
try:
    print([l.split()[1] for l in open(f"/proc/{child.pid}/status") if l.startswith("FDSize:")][0])
finally:
    child.kill()
    child.wait()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert 200 <= int(out.stdout) < 5000


# The parent starts a child with start_child, prints its pid, and waits to be killed.
PARENT = """
import sys
from fuse_disk_export.engine.process import start_child
process, _ = start_child(["sleep", "60"])
print(process.pid, flush=True)
sys.stdin.read()
"""


def test_the_child_follows_its_parent() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        wait_for(lambda: pid_gone(child), what="the child to end with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child and not pid_gone(child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
