"""Starting qemu-storage-daemon on one CPU, and giving every CPU back (against real processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fuse_disk_export.engine import onecpu

CPUS = frozenset(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="one CPU: nothing to pin")

# A process with threads, all created after exec: they inherit the CPU it was pinned to.
THREADS = """
import sys, threading
threads = [threading.Thread(target=sys.stdin.read) for _ in range(3)]
for t in threads:
    t.start()
print("up", flush=True)
"""


def _affinities(pid: int) -> list[frozenset[int]]:
    return [frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")]


@needs_two
def test_choose_a_cpu_we_may_use() -> None:
    pinning = onecpu.choose()
    assert pinning is not None
    assert pinning.cpus == CPUS
    assert pinning.cpu in CPUS


@pytest.mark.parametrize(
    ("cpus", "ours", "chosen"),
    [
        ({0, 1}, 0, 1),
        ({0, 1}, 1, 0),
        ({0, 2, 3, 5}, 3, 5),
        ({0, 2, 3, 5}, 5, 0),
        ({0, 2, 3, 5}, 4, 5),  # ours is not among them (taskset since)
        ({7}, 7, 7),
    ],
)
def test_the_next_cpu_round_the_set(cpus: set[int], ours: int, chosen: int) -> None:
    assert onecpu.next_cpu(frozenset(cpus), ours) == chosen


def test_nothing_to_choose_on_one_cpu() -> None:
    cpu = min(CPUS)
    script = "from fuse_disk_export.engine import onecpu; print(onecpu.choose())"
    out = subprocess.run(
        [sys.executable, "-c", script],
        preexec_fn=lambda: onecpu.pin_self(cpu),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "None"


@needs_two
def test_pinned_threads_get_every_cpu_back() -> None:
    cpu = max(CPUS)
    with subprocess.Popen(
        [sys.executable, "-c", THREADS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        preexec_fn=lambda: onecpu.pin_self(cpu),
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"up\n"
            before = _affinities(child.pid)
            assert len(before) == 4
            assert set(before) == {frozenset({cpu})}

            onecpu.release(child.pid, CPUS)
            assert set(_affinities(child.pid)) == {CPUS}
        finally:
            child.kill()


def test_release_of_a_process_gone_is_quiet() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    onecpu.release(child.pid, CPUS)
