"""The version gates: safe by default, and never off on a version known to have the bug."""

from __future__ import annotations

from fuse_disk_export.engine import versions

#: Releases measured or read to have the FUSE write-buffer bug (docs, issue 10).
KNOWN_AFFECTED = [(6, 0, 0), (7, 2, 0), (7, 2, 22), (8, 2, 2), (10, 0, 2), (10, 1, 0), (10, 2, 0)]


def test_write_guard_stays_on_where_the_bug_lives() -> None:
    for version in KNOWN_AFFECTED:
        assert versions.needs_write_guard(version), version


def test_a_declared_fix_is_newer_than_every_affected_release() -> None:
    fixed = versions.FUSE_WRITE_BUFFER_FIXED
    if fixed is None:
        assert versions.needs_write_guard((99, 0, 0))
    else:
        assert fixed > max(KNOWN_AFFECTED)
        assert not versions.needs_write_guard(fixed)


def test_punch_hole_gate() -> None:
    assert versions.punch_hole_may_keep_data((7, 2, 22))
    assert versions.punch_hole_may_keep_data((6, 0, 0))
    assert not versions.punch_hole_may_keep_data((8, 0, 0))
    assert not versions.punch_hole_may_keep_data((10, 0, 2))
