"""--doctor on this machine, with the real qemu-storage-daemon: what works, what does not and how
to fix it, and what detection says of images, without exporting anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fuse_disk_export import mounts
from tests.helpers.images import make_qcow2, qemu_img
from tests.helpers.runner import Runner

CORE = ("/dev/fuse", "qemu-storage-daemon", "choices", "fusectl", "registry")


def _by_name(stdout: str) -> dict[str, str]:
    """Each check's line, by the name before its first colon."""
    return {line[2:].split(":", 1)[0]: line for line in stdout.splitlines() if line[:1] in "✔✘"}


def test_this_machine_is_ready(fde: Runner) -> None:
    result = fde.run("--doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _by_name(result.stdout)
    for name in CORE:
        assert lines[name].startswith("✔"), lines[name]
    assert "FUSE exports" in lines["qemu-storage-daemon"]
    report = json.loads(fde.run("--doctor", "--json").stdout)
    assert report["ok"] is True
    daemon = next(c for c in report["checks"] if c["name"] == "qemu-storage-daemon")
    version = subprocess.run(
        ["qemu-storage-daemon", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert daemon["fuse_export"] is True and f"version {daemon['version']}" in version


def test_without_qemu_storage_daemon_the_remedy_names_the_package(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing to run there
    result = subprocess.run(
        [sys.executable, "-m", "fuse_disk_export", "--doctor"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("✘ qemu-storage-daemon:"))
    assert "not found" in lines[at]
    assert lines[at + 1].startswith("    fix: ") and "qemu-system-common" in lines[at + 1]
    # The rest is still checked.
    assert _by_name(result.stdout)["/dev/fuse"].startswith("✔")


def test_images_are_described_not_exported(fde: Runner, tmp_path: Path) -> None:
    base = make_qcow2(tmp_path / "base.qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(4096))
    locked = make_qcow2(tmp_path / "locked.qcow2")
    locked.chmod(0o444)

    result = fde.run("--doctor", "--json", str(top), str(raw))
    assert result.returncode == 0, result.stdout + result.stderr
    images = {c["path"]: c for c in json.loads(result.stdout)["images"]}
    assert images[str(top)]["format"] == "qcow2" and images[str(top)]["backing"] == [str(base)]
    assert images[str(top)]["virtual_size"] == 64 << 20 and images[str(top)]["read_only"] is False
    assert images[str(raw)]["format"] == "raw" and images[str(raw)]["virtual_size"] == 4096

    read_only = json.loads(fde.run("--doctor", "--json", "-r", str(raw)).stdout)["images"][0]
    assert read_only["read_only"] is True

    # An image a default export cannot open writable, and a missing one: each a ✘ with why.
    result = fde.run("--doctor", str(locked), str(tmp_path / "missing.qcow2"))
    assert result.returncode == 1
    lines = _by_name(result.stdout)
    assert lines[str(locked)].startswith("✘") and "use -r" in lines[str(locked)]
    assert "no such file" in lines[str(tmp_path / "missing.qcow2")]
    assert not [m for m in mounts.read_mounts() if m.mount_point.startswith(str(tmp_path))]
