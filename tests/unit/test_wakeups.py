"""The CPU latency request held while qemu-storage-daemon stops (engine/wakeups.py)."""

from __future__ import annotations

import os

import pytest

from fuse_disk_export.engine import wakeups


def _may_request() -> bool:
    return os.access(wakeups.DEVICE, os.W_OK)


@pytest.mark.skipif(not _may_request(), reason="needs write access to /dev/cpu_dma_latency")
def test_the_request_stands_while_held_and_ends_after() -> None:
    before = wakeups.current()
    assert before is not None
    with wakeups.prompt():
        assert wakeups.current() == 0
    assert wakeups.current() == before


@pytest.mark.skipif(not _may_request(), reason="needs write access to /dev/cpu_dma_latency")
def test_the_request_ends_when_the_block_raises() -> None:
    before = wakeups.current()
    with pytest.raises(RuntimeError), wakeups.prompt():
        raise RuntimeError("the stop failed")
    assert wakeups.current() == before


def test_without_the_device_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wakeups, "DEVICE", "/nonexistent/cpu_dma_latency")
    ran = False
    with wakeups.prompt():
        ran = True
    assert ran
    assert wakeups.current() is None
