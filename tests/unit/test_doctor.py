"""--doctor's checks that read files given to them, and its report: each failure with a remedy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fuse_disk_export import doctor, preflight
from fuse_disk_export.doctor import Check
from fuse_disk_export.errors import RequirementError


def test_fuse_device_missing_not_a_device_and_usable(tmp_path: Path) -> None:
    missing = doctor.fuse_device(str(tmp_path / "fuse"))
    assert not missing.ok and missing.needed and "modprobe fuse" in missing.remedy
    (tmp_path / "file").touch()
    plain = doctor.fuse_device(str(tmp_path / "file"))
    assert not plain.ok and "not a character device" in plain.detail and plain.remedy
    # A character device anyone reads and writes, bound over /dev/fuse: libfuse's mount fails
    # with a bare EINVAL.
    other = doctor.fuse_device("/dev/null")
    assert not other.ok and "not the FUSE device: character device 1:3" in other.detail
    assert "mknod /dev/null c 10 229" in other.remedy
    with pytest.raises(RequirementError, match=r"not the FUSE device.*mknod"):
        preflight.check_fuse("/dev/null")
    if os.access(preflight.FUSE_DEVICE, os.R_OK | os.W_OK):
        usable = doctor.fuse_device()
        assert usable.ok and "read and write access" in usable.detail, usable


def test_user_allow_other_matters_only_for_allow_other_on(tmp_path: Path) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    unset = doctor.allow_other(root=False, mode="auto", conf=str(conf))
    assert not unset.ok and not unset.needed and "user_allow_other" in unset.remedy
    assert doctor.allow_other(root=False, mode="on", conf=str(conf)).needed
    assert doctor.allow_other(root=True, mode="on", conf=str(conf)).ok
    conf.write_text("user_allow_other  # for fuse-disk-export\n")
    assert doctor.allow_other(root=False, mode="on", conf=str(conf)).ok
    assert not doctor.allow_other(root=False, mode="auto", conf=str(tmp_path / "none")).ok


def test_healthy_counts_only_what_a_default_export_needs() -> None:
    optional = Check("--mount-fs drivers", False, "none", "apt-get install fuse2fs", needed=False)
    assert doctor.healthy([Check("/dev/fuse", True, "ok"), optional])
    assert not doctor.healthy([Check("/dev/fuse", False, "missing", "modprobe fuse"), optional])


def test_report_lines_and_json() -> None:
    checks = [
        Check("a", True, "fine"),
        Check("b", False, "broken", "fix it", facts={"n": 1}),
        Check("c", False, "absent", "install it", needed=False),
    ]
    assert doctor.lines(checks) == [
        "✔ a: fine",
        "✘ b: broken",
        "    fix: fix it",
        "✘ c: absent (not needed for a default export)",
        "    fix: install it",
    ]
    assert doctor.lines(checks[:1], marks=("ok", "X")) == ["ok a: fine"]
    report = doctor.as_json(checks, [Check("/x.qcow2", True, "qcow2")])
    assert report["ok"] is False
    assert report["checks"][1] == {  # type: ignore[index]
        "name": "b", "ok": False, "needed": True, "detail": "broken", "remedy": "fix it", "n": 1,
    }  # fmt: skip


def test_every_failure_has_a_remedy(tmp_path: Path) -> None:
    # The failures each check can report without touching the machine (a healthy machine
    # would show none of them).
    failed = [
        doctor.fuse_device(str(tmp_path / "no-fuse")),
        doctor.fuse_device(str(tmp_path)),
        doctor.allow_other(root=False, mode="on", conf=str(tmp_path / "no-conf")),
        doctor.allow_other(root=False, mode="on", conf=str(tmp_path)),  # unreadable: a folder
        doctor.qemu(str(tmp_path / "no-qemu-storage-daemon"))[0],
    ]
    for check in failed:
        assert not check.ok and check.remedy, check
