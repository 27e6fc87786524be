"""Hundreds of images in one invocation, under a login shell's default limits."""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

import pytest

from tests.helpers.checks import assert_all_clean, is_mounted
from tests.helpers.images import qemu_img
from tests.helpers.runner import Runner


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
