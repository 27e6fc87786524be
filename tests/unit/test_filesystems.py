"""The filesystem probe of --mount-fs: real superblocks recognised, hostile bytes never crash it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuse_disk_export import filesystems
from fuse_disk_export.errors import RequirementError
from fuse_disk_export.filesystems import MAX_PROBE_BYTES, identify
from fuse_disk_export.mountfs import drivers, mount

PROBE_BYTES = 40 * 1024


def probe(read: filesystems.Read, size: int = PROBE_BYTES) -> str | None:
    return drivers.probe(read, size)


def reader(data: bytes) -> filesystems.Read:
    asked = [0]

    def read(offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= PROBE_BYTES, "reads stay within the device"
        asked[0] += length
        assert asked[0] <= MAX_PROBE_BYTES, "reads stay within the budget"
        return data[offset : offset + length]

    return read


def fat(label: bytes = b"FAT16   ") -> bytes:
    """A FAT16 boot sector with a BPB libblkid accepts: 64 MiB, 4 sectors a cluster."""
    boot = bytearray(4096)
    boot[0] = 0xEB
    struct.pack_into("<HBHBHHBH", boot, 11, 512, 4, 4, 2, 512, 0, 0xF8, 128)
    struct.pack_into("<I", boot, 0x20, 131072)
    boot[54:62] = label
    boot[510:512] = b"\x55\xaa"
    return bytes(boot)


def test_magic_numbers() -> None:
    squashfs = b"hsqs" + bytes(24) + struct.pack("<H", 4)  # version 4.0
    assert probe(reader(squashfs + bytes(8192))) == "squashfs"
    assert identify(reader(squashfs[:28] + struct.pack("<H", 3)), PROBE_BYTES) == "squashfs3"
    ntfs = bytearray(PROBE_BYTES)
    ntfs[3:11] = b"NTFS    "
    struct.pack_into("<HB", ntfs, 11, 512, 8)
    ntfs[0x15] = 0xF8
    struct.pack_into("<QQQb", ntfs, 0x28, 16384, 4, 5, -10)  # MFT at cluster 4, 1 KiB records
    ntfs[510:512] = b"\x55\xaa"
    ntfs[4 * 4096 : 4 * 4096 + 4] = b"FILE"
    assert probe(reader(bytes(ntfs))) is None, "the $Volume record must be a FILE record too"
    ntfs[4 * 4096 + 3072 : 4 * 4096 + 3076] = b"FILE"
    assert probe(reader(bytes(ntfs))) == "ntfs"
    exfat = bytearray(4096)
    exfat[:11] = b"\xeb\x76\x90EXFAT   "
    exfat[0x6C:0x6F] = bytes((9, 3, 1))
    exfat[510:512] = b"\x55\xaa"
    assert identify(reader(bytes(exfat)), PROBE_BYTES) == "exfat"
    assert probe(reader(bytes(exfat))) == "exfat", "a filesystem no driver of ours serves"
    assert probe(reader(fat())) == "vfat"
    no_fats = bytearray(fat())
    no_fats[0x10] = 0
    assert probe(reader(bytes(no_fats))) is None
    ext = bytearray(4096)
    struct.pack_into("<H", ext, 1024 + 56, 0xEF53)
    assert identify(reader(bytes(ext)), PROBE_BYTES) == "ext2"
    assert probe(reader(bytes(ext))) == "ext"
    struct.pack_into("<I", ext, 1024 + 0x5C, 0x4)  # has_journal
    assert identify(reader(bytes(ext)), PROBE_BYTES) == "ext3"
    struct.pack_into("<I", ext, 1024 + 0x60, 0x40)  # extents
    assert identify(reader(bytes(ext)), PROBE_BYTES) == "ext4"
    struct.pack_into("<I", ext, 1024 + 0x60, 0x8)  # an external journal
    assert identify(reader(bytes(ext)), PROBE_BYTES) == "jbd"
    iso = bytearray(PROBE_BYTES)
    iso[32768 : 32768 + 6] = b"\x01CD001"
    assert probe(reader(bytes(iso))) == "iso9660"
    assert probe(reader(b"")) is None
    assert probe(reader(bytes(100))) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=PROBE_BYTES))
def test_any_bytes_are_safe(data: bytes) -> None:
    found = identify(reader(data), len(data))
    assert found is None or found in drivers.FAMILIES


@given(st.integers(0, 4095), st.binary(min_size=1, max_size=64))
def test_mutated_superblocks_are_safe(at: int, patch: bytes) -> None:
    for base in (fat(), b"hsqs" + bytes(4092), b"XFSB" + bytes(4092)):
        data = bytearray(base)
        data[at : at + len(patch)] = patch
        found = probe(reader(bytes(data[:PROBE_BYTES])), len(data))
        assert found is None or found in drivers.DRIVERS or found in drivers.FAMILIES


def test_a_missing_driver_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mount.shutil, "which", lambda name: None)
    with pytest.raises(RequirementError, match=r"fuse2fs not found.*Debian package fuse2fs"):
        mount.find_driver("ext")
    with pytest.raises(RequirementError, match="Debian package ntfs-3g"):
        mount.find_driver("ntfs")


def test_every_driver_is_a_known_fs_type() -> None:
    assert set(drivers.FS_TYPES.values()) == set(drivers.DRIVERS)
    assert {d.fs for d in drivers.DRIVERS.values() if d.writes} == {"ext", "ntfs"}
