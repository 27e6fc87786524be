"""Hundreds of images in one invocation, under a login shell's default limits."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest

from fuse_disk_export.engine import limits
from tests.helpers.checks import assert_all_clean, is_mounted
from tests.helpers.images import qemu_img
from tests.helpers.runner import Processes, Runner, daemon_children, pid_gone, wait_for


def _images(root: Path, count: int) -> list[Path]:
    first = root / "i0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(first), "16M")
    data = first.read_bytes()
    images = [first]
    for n in range(1, count):
        image = root / f"i{n}.qcow2"
        image.write_bytes(data)  # a copy: 600 qemu-img runs would take seconds
        images.append(image)
    return images


def _with_nofile(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _run_limited(fde: Runner, soft: int, hard: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fde.argv(*args),
        cwd=fde.root,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: _with_nofile(soft, hard),  # the test's own child: a login shell's limit
    )


@pytest.mark.slow
def test_600_images_under_a_soft_limit_of_1024(fde: Runner, tmp_path: Path) -> None:
    """473 images filled a soft limit of 1024 descriptors: the daemon now gets what it needs,
    up to the hard limit, and our own process keeps its limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip(f"the hard limit ({hard}) is below what 600 exports need")
    images = _images(tmp_path, 600)
    pid_file = tmp_path / "fde.pid"
    result = _run_limited(fde, 1024, hard, "-dp", str(pid_file), *map(str, images))
    assert result.returncode == 0, result.stderr
    pid = int(pid_file.read_text())
    fde.track_pid(pid)
    with open(f"/proc/{pid}/limits") as f:
        assert "Max open files            1024" in f.read(), "the tool's own limit changed"
    assert all(is_mounted(i) for i in images)
    stopped = fde.run("--stop", str(pid))
    assert stopped.returncode == 0, stopped.stderr
    assert_all_clean(tmp_path, pid_files=(pid_file,))


def test_too_low_a_hard_limit_is_refused_before_anything(fde: Runner, tmp_path: Path) -> None:
    images = _images(tmp_path, 200)
    result = _run_limited(fde, 256, 256, *map(str, images))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hard limit is 256" in lines[0] and "ulimit -Hn" in lines[0]
    assert not any(is_mounted(i) for i in images)
    assert_all_clean(tmp_path)


SHARDED = 2 * limits.SHARD_SIZE + 1  # three daemons


@pytest.mark.slow
def test_more_images_than_one_daemon_serves_are_one_invocation(fde: Runner, tmp_path: Path) -> None:
    """Past `limits.SHARD_SIZE` images, more daemons: one pid file written once all are live,
    one --list entry, and one SIGINT reverts them all."""
    images = _images(tmp_path, SHARDED)
    pid_file = tmp_path / "fde.pid"
    result = fde.run("-dp", str(pid_file), *map(str, images))
    assert result.returncode == 0, result.stderr
    pid = int(pid_file.read_text())
    fde.track_pid(pid)
    daemons = daemon_children(pid)
    assert len(daemons) == 3, daemons
    for daemon in daemons:
        fde.track_pid(daemon)
    assert all(is_mounted(i) for i in images)
    listed = json.loads(fde.run("--list", "--json").stdout)
    ours = [r for r in listed if r["pid"] == pid]
    assert len(ours) == SHARDED and {r["daemon_pid"] for r in ours} == set(daemons)
    os.kill(pid, signal.SIGINT)
    wait_for(lambda: not pid_file.exists() and pid_gone(pid), 60, "the revert")
    assert all(pid_gone(d) for d in daemons)
    assert_all_clean(tmp_path, pid_files=(pid_file,))


@pytest.mark.slow
def test_one_shard_failing_leaves_nothing(fde: Runner, hand: Processes, tmp_path: Path) -> None:
    images = _images(tmp_path, SHARDED)
    hand.hold_image(images[-1])  # the third daemon cannot take its lock
    result = fde.run(*map(str, images))
    assert result.returncode == 1
    assert str(images[-1]) in result.stderr and "lock" in result.stderr, result.stderr
    assert not any(is_mounted(i) for i in images)


@pytest.mark.slow
def test_a_shard_dying_reverts_every_export(fde: Runner, tmp_path: Path) -> None:
    images = _images(tmp_path, SHARDED)
    proc = fde.start_live(*map(str, images))
    daemons = daemon_children(proc.pid)
    assert len(daemons) == 3
    os.kill(daemons[1], signal.SIGKILL)
    assert proc.wait(timeout=60) == 1
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert f"pid {daemons[1]}" in err and "while serving" in err, err
    wait_for(lambda: all(pid_gone(d) for d in daemons), 30, "every daemon to be gone")
    assert not any(is_mounted(i) for i in images)
