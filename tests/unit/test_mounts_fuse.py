"""What mountinfo says about a FUSE mount: its device names the connection its server holds."""

from __future__ import annotations

from fuse_disk_export.mounts import MountEntry, connection_id, parse_mountinfo

SAMPLE = (
    "42 22 0:39 / /tmp/a.qcow2 rw,nosuid - fuse /dev/fuse rw,user_id=0\n"
    "43 22 8:1 / /data rw - ext4 /dev/sda1 rw\n"
    "44 22 0:1048577 / /tmp/b.qcow2 rw - fuse /dev/fuse rw\n"
)


def test_device_is_parsed() -> None:
    entries = parse_mountinfo(SAMPLE)
    assert [e.device for e in entries] == ["0:39", "8:1", "0:1048577"]


def test_connection_id_is_the_kernel_dev_t() -> None:
    a, data, b = parse_mountinfo(SAMPLE)
    assert connection_id(a) == 39  # what /proc/PID/fdinfo prints as fuse_connection
    assert connection_id(b) == 1048577
    assert connection_id(data) == 8 << 20 | 1


def test_no_device_no_connection() -> None:
    assert connection_id(MountEntry(1, "/x", "fuse", "/dev/fuse")) is None
    assert connection_id(MountEntry(1, "/x", "fuse", "/dev/fuse", "garbage")) is None
