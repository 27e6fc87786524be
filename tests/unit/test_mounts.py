"""mountinfo parsing: the kernel escapes only space, tab, newline and backslash."""

from __future__ import annotations

from fuse_disk_export.mounts import filesystem_of, mount_at, parse_mountinfo

SAMPLE = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "42 22 0:39 / /tmp/my\\040disk,x:y.qcow2 rw,nosuid - fuse /dev/fuse rw,user_id=0\n"
    "43 22 0:40 / /tmp/back\\134slash\\011tab rw - fuse.sshfs host: rw\n"
    "44 42 0:41 / /tmp/my\\040disk,x:y.qcow2 rw - fuse /dev/fuse rw\n"
    "garbage line\n"
)


def test_unescapes_mount_points() -> None:
    entries = parse_mountinfo(SAMPLE)
    assert [e.mount_point for e in entries] == [
        "/",
        "/tmp/my disk,x:y.qcow2",
        "/tmp/back\\slash\ttab",
        "/tmp/my disk,x:y.qcow2",
    ]
    assert entries[1].is_fuse and entries[2].is_fuse and not entries[0].is_fuse


def test_topmost_mount_wins() -> None:
    entries = parse_mountinfo(SAMPLE)
    found = mount_at("/tmp/my disk,x:y.qcow2", entries)
    assert found is not None and found.mount_id == 44
    assert mount_at("/tmp/other", entries) is None


def test_filesystem_of_takes_the_deepest_mount() -> None:
    table = parse_mountinfo(
        "22 27 0:21 / /proc rw - proc proc rw\n"
        "27 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "30 27 0:26 / /procfs-lookalike rw - tmpfs tmpfs rw\n"
        "31 22 0:27 / /proc/sys/fs/binfmt_misc rw - binfmt_misc binfmt_misc rw\n"
    )
    assert filesystem_of("/proc/self/environ", table) == "proc"
    assert filesystem_of("/proc", table) == "proc"
    assert filesystem_of("/procfs-lookalike/a.qcow2", table) == "tmpfs"
    assert filesystem_of("/proc/sys/fs/binfmt_misc/status", table) == "binfmt_misc"
    assert filesystem_of("/images/a.qcow2", table) == "ext4"
