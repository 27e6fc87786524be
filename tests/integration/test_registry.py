"""The runtime registry: records written at live time, read back only while their process runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from fuse_disk_export import registry
from tests.helpers.records import record
from tests.helpers.runner import wait_for

pytestmark = pytest.mark.usefixtures("registry_dir")


def test_start_time_agrees_with_psutil() -> None:
    mine = registry.process_start_time(os.getpid())
    assert mine is not None
    assert abs(mine - psutil.Process().create_time()) < 0.05
    assert registry.process_start_time(2**22 + 1) is None


def test_register_then_list_then_unregister(registry_dir: Path) -> None:
    registry.register(
        [record(os.getpid(), "/images/a.qcow2"), record(os.getpid(), "/images/b.vmdk")]
    )
    assert (registry_dir / f"{os.getpid()}.json").stat().st_mode & 0o777 == 0o600
    listed = registry.live_records()
    assert [r.mountpoint for r in listed] == ["/images/a.qcow2", "/images/b.vmdk"]
    assert all(r.started == registry.process_start_time(os.getpid()) for r in listed)
    found = registry.find_by_mountpoint("/images/b.vmdk")
    assert found is not None and found.pid == os.getpid()
    registry.unregister()
    assert registry.live_records() == []


def test_dead_and_zombie_processes_are_dropped(registry_dir: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    zombie = subprocess.Popen(["true"])  # not waited for until the end: a zombie meanwhile
    try:
        wait_for(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE)
        for pid in (dead.pid, zombie.pid):
            registry.register([record(pid, f"/images/{pid}.qcow2", started=None)])
        assert registry.live_records() == []
        assert list(registry_dir.glob("*.json")) == []
    finally:
        zombie.wait()


def test_a_reused_pid_is_not_taken_for_ours(registry_dir: Path) -> None:
    mine = registry.process_start_time(os.getpid())
    assert mine is not None
    registry.register([record(os.getpid(), started=mine - 3600)])
    assert registry.live_records() == []
    assert not (registry_dir / f"{os.getpid()}.json").exists()


def test_records_from_older_versions_still_load(registry_dir: Path) -> None:
    registry_dir.mkdir(parents=True)
    raw = {
        k: v for k, v in record(os.getpid())._asdict().items() if k not in ("started", "warnings")
    }
    (registry_dir / f"{os.getpid()}.json").write_text(json.dumps([raw]))
    assert registry.live_records() == [record(os.getpid())._replace(started=None)]


def test_unreadable_entries_are_left_alone(registry_dir: Path) -> None:
    registry_dir.mkdir(parents=True)
    (registry_dir / "12345.json").write_text("not json")
    (registry_dir / "notes.json").write_text("[]")
    assert registry.live_records() == []
    assert (registry_dir / "12345.json").exists()
