"""Making and inspecting images with QEMU's own tools, and their digests."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

#: ``(byte, offset, length)``: ``byte`` written at ``offset`` for ``length`` (qemu-io sizes).
Pattern = tuple[int, str, str]

#: Data at both ends of the first half of a 64M image: 0x5a in the first MiB, 0xa5 at 33M.
SAMPLE: tuple[Pattern, ...] = ((0x5A, "0", "1M"), (0xA5, "33M", "64k"))


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qemu_io(fmt: str, path: Path | str, command: str) -> str:
    """One qemu-io command; fail on a non-zero exit or "fail" in its output (a read -P that
    does not match exits 0)."""
    out = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", command, str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0 and "fail" not in out.stdout.lower(), (
        f"qemu-io {command} {path}: {out.stdout}{out.stderr}"
    )
    return out.stdout


def image_format(path: Path | str) -> str:
    return str(json.loads(qemu_img("info", "--output=json", "--force-share", str(path)))["format"])


def qemu_img_check(path: Path | str, fmt: str = "qcow2") -> dict[str, object]:
    """``qemu-img check``; fail on corruption (leaked clusters are not corruption)."""
    out = subprocess.run(
        ["qemu-img", "check", "-f", fmt, "--output=json", str(path)],
        capture_output=True,
        text=True,
    )
    # 0: clean, 3: leaks only; 2: corruption, 1: check failed
    assert out.returncode in (0, 3), (
        f"qemu-img check {path}: {out.returncode} {out.stdout}{out.stderr}"
    )
    report: dict[str, object] = json.loads(out.stdout)
    assert not report.get("corruptions"), report
    return report


def make_qcow2(path: Path, size: str = "64M", *patterns: Pattern) -> Path:
    """A qcow2 with ``(byte, offset, length)`` patterns written by qemu-io."""
    qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    for byte, offset, length in patterns:
        qemu_io("qcow2", path, f"write -P {byte:#x} {offset} {length}")
    return path


def qcow2_images(root: Path, count: int) -> dict[Path, str]:
    """``count`` empty 16M qcow2 images ``disk00.qcow2``... in ``root``, with their sha256."""
    made = {}
    for i in range(count):
        img = make_qcow2(root / f"disk{i:02}.qcow2", "16M")
        made[img] = sha256(img)
    return made


def sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
