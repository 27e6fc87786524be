"""The filesystem probe of --mount-fs: real superblocks recognised, hostile bytes never crash it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuse_disk_export import filesystems, fsmount
from fuse_disk_export.errors import RequirementError
from fuse_disk_export.filesystems import PROBE_BYTES, probe


def reader(data: bytes) -> filesystems.Read:
    def read(offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= PROBE_BYTES, "reads stay within the bound"
        return data[offset : offset + length]

    return read


def fat(label: bytes = b"FAT16   ") -> bytes:
    boot = bytearray(4096)
    struct.pack_into("<H", boot, 11, 512)
    boot[13] = 4
    boot[54:62] = label
    boot[510:512] = b"\x55\xaa"
    return bytes(boot)


def test_magic_numbers() -> None:
    assert probe(reader(b"hsqs" + bytes(8192))) == "squashfs"
    ntfs = bytearray(4096)
    ntfs[3:11] = b"NTFS    "
    ntfs[510:512] = b"\x55\xaa"
    assert probe(reader(bytes(ntfs))) == "ntfs"
    exfat = bytearray(4096)
    exfat[3:11] = b"EXFAT   "
    assert probe(reader(bytes(exfat))) == "exfat"
    assert probe(reader(fat())) == "vfat"
    assert probe(reader(fat(b"NOTFAT  "))) is None
    ext = bytearray(4096)
    struct.pack_into("<H", ext, 1024 + 56, 0xEF53)
    assert probe(reader(bytes(ext))) == "ext"
    struct.pack_into("<I", ext, 1024 + 24, 40)  # an absurd block size
    assert probe(reader(bytes(ext))) is None
    iso = bytearray(PROBE_BYTES)
    iso[32768 : 32768 + 6] = b"\x01CD001"
    assert probe(reader(bytes(iso))) == "iso9660"
    assert probe(reader(b"")) is None
    assert probe(reader(bytes(100))) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=PROBE_BYTES))
def test_any_bytes_are_safe(data: bytes) -> None:
    assert probe(reader(data)) in (None, *filesystems.DRIVERS, "exfat")


@given(st.integers(0, 4095), st.binary(min_size=1, max_size=64))
def test_mutated_superblocks_are_safe(at: int, patch: bytes) -> None:
    for base in (fat(), b"hsqs" + bytes(4092)):
        data = bytearray(base)
        data[at : at + len(patch)] = patch
        assert probe(reader(bytes(data[:PROBE_BYTES]))) in (None, *filesystems.DRIVERS, "exfat")


def test_a_missing_driver_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsmount.shutil, "which", lambda name: None)
    with pytest.raises(RequirementError, match=r"fuse2fs not found.*Debian package fuse2fs"):
        fsmount.find_driver("ext")
    with pytest.raises(RequirementError, match="Debian package ntfs-3g"):
        fsmount.find_driver("ntfs")


def test_every_driver_is_a_known_fs_type() -> None:
    assert set(filesystems.FS_TYPES.values()) == set(filesystems.DRIVERS)
    assert {d.fs for d in filesystems.DRIVERS.values() if d.writes} == {"ext", "ntfs"}
