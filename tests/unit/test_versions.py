"""The version gates and feature probes: safe by default, never off where a bug is known."""

from __future__ import annotations

import json

import pytest

from fuse_disk_export import choices
from fuse_disk_export.engine import qemuinfo, versions
from fuse_disk_export.engine.graph import Tuning
from fuse_disk_export.engine.qemuinfo import QemuInfo
from fuse_disk_export.errors import UsageError

OLD = QemuInfo((7, 2, 22), multiqueue_fuse=False)
NEW = QemuInfo((11, 1, 3), multiqueue_fuse=True)


def test_write_guard_follows_the_fix_not_the_version() -> None:
    assert versions.needs_write_guard(multiqueue_fuse=False)
    assert not versions.needs_write_guard(multiqueue_fuse=True)


def test_punch_hole_gate() -> None:
    assert versions.punch_hole_may_keep_data((7, 2, 22))
    assert versions.punch_hole_may_keep_data((6, 0, 0))
    assert not versions.punch_hole_may_keep_data((8, 0, 0))
    assert not versions.punch_hole_may_keep_data((10, 0, 2))


def test_io_uring_short_reads_gate() -> None:
    # Measured hanging: 7.2.22 and 10.0.2; measured opening: 11.1.3; unknown: the safe side.
    for version in ((7, 2, 22), (10, 0, 2), (11, 0, 0), None):
        assert versions.io_uring_short_read_may_hang(version), version
    assert not versions.io_uring_short_read_may_hang((11, 1, 3))


def _monitor(version: tuple[int, int, int], iothread_type: str, alternate: bool) -> list[bytes]:
    qemu = dict(zip(("major", "minor", "micro"), version, strict=True))
    greeting = {"QMP": {"version": {"qemu": qemu}}}
    schema: list[dict[str, object]] = [
        {
            "name": "99",
            "meta-type": "object",
            "members": [
                {"name": "iothread", "type": iothread_type},
                {"name": "fixed-iothread", "type": "bool"},
            ],
        },
        {"name": "str", "meta-type": "builtin"},
    ]
    if alternate:
        schema.append({"name": iothread_type, "meta-type": "alternate", "members": []})
    return [json.dumps(m).encode() + b"\n" for m in (greeting, {"return": {}}, {"return": schema})]


def test_schema_probe_tells_multiqueue_fuse_exports() -> None:
    assert qemuinfo.parse(_monitor((11, 1, 3), "162", True)) == NEW
    assert qemuinfo.parse(_monitor((10, 0, 2), "str", False)) == QemuInfo((10, 0, 2), False)
    assert qemuinfo.parse([b"not json\n"]) is None
    assert qemuinfo.parse(_monitor((7, 2, 22), "str", False)[:2]) is None


def test_choices_for_an_old_qemu_keep_every_guard() -> None:
    for info in (OLD, None):
        tuning = choices.for_qemu(Tuning(), info, iothreads=None)
        assert tuning.write_guard and tuning.hole_guard and not tuning.io_uring_short_reads
        assert tuning.iothreads == 0 and not tuning.multiqueue


def test_choices_for_qemu_11() -> None:
    tuning = choices.for_qemu(Tuning(), NEW, iothreads=None)
    assert not tuning.write_guard and not tuning.hole_guard and tuning.io_uring_short_reads
    assert tuning.iothreads == choices.DEFAULT_IOTHREADS and tuning.multiqueue
    assert choices.for_qemu(Tuning(), NEW, iothreads=0).iothreads == 0
    # --no-write-guard stays off; the guard is never turned on against the user's word.
    assert not choices.for_qemu(Tuning(write_guard=False), OLD, iothreads=None).write_guard


def test_iothreads_the_qemu_cannot_serve_are_refused() -> None:
    with pytest.raises(UsageError, match="multi-queue"):
        choices.for_qemu(Tuning(), OLD, iothreads=2)
    assert choices.for_qemu(Tuning(), OLD, iothreads=1).iothreads == 1
    with pytest.raises(UsageError, match="nbd-socket"):
        choices.for_qemu(Tuning(nbd_socket="/s"), NEW, iothreads=2)
    assert choices.for_qemu(Tuning(nbd_socket="/s"), NEW, iothreads=None).iothreads == 0


def test_an_image_written_from_one_thread_gets_no_more() -> None:
    assert choices.for_qemu(Tuning(), NEW, iothreads=None, single_queue="/d.qed").iothreads == 0
    assert choices.for_qemu(Tuning(), NEW, iothreads=1, single_queue="/d.qed").iothreads == 1
    with pytest.raises(UsageError, match="qed"):
        choices.for_qemu(Tuning(), NEW, iothreads=4, single_queue="/d.qed")


def test_schema_probe_tells_fuse_export_support() -> None:
    def with_cases(*cases: str) -> list[bytes]:
        lines = _monitor((7, 2, 22), "str", False)
        reply = json.loads(lines[-1])
        reply["return"][0] |= {"tag": "type", "variants": [{"case": c} for c in cases]}
        return [*lines[:-1], json.dumps(reply).encode() + b"\n"]

    assert qemuinfo.parse(with_cases("nbd", "fuse")) == QemuInfo((7, 2, 22), False, True)
    # Built without FUSE: the case is gone from the schema.
    assert qemuinfo.parse(with_cases("nbd", "vhost-user-blk")) == QemuInfo((7, 2, 22), False, False)
    # A shape not known: not told.
    assert qemuinfo.parse(_monitor((7, 2, 22), "str", False)) == QemuInfo((7, 2, 22), False, None)
