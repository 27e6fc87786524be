"""The filesystem probe of --mount-fs on superblocks that mkfs wrote."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fuse_disk_export.filesystems import identify
from tests.unit.test_filesystems import (
    PROBE_BYTES,
    probe,
    reader,
)


@pytest.mark.parametrize("fs", ["ext4", "vfat"])
def test_real_filesystems(tmp_path: Path, fs: str) -> None:
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    mkfs = {"ext4": ["mkfs.ext4", "-q", "-F"], "vfat": ["mkfs.fat"]}[fs]
    path = shutil.which(mkfs[0], path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        pytest.skip(f"{mkfs[0]} is missing")
    subprocess.run([path, *mkfs[1:], str(image)], check=True, capture_output=True)
    data = image.read_bytes()[:PROBE_BYTES]
    assert probe(reader(data), len(data)) == {"ext4": "ext", "vfat": "vfat"}[fs]
    assert identify(reader(data), PROBE_BYTES) == fs
