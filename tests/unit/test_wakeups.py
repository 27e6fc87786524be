"""The CPU latency request held while qemu-storage-daemon stops (engine/wakeups.py)."""

from __future__ import annotations

import os

import pytest

from fuse_disk_export.engine import wakeups


def _may_request() -> bool:
    return os.access(wakeups.DEVICE, os.W_OK)


def _released(before: int | None) -> bool:
    """The kernel grants again what it did before, as far as we can tell: the value is
    system-wide, and another process may hold a request of its own meanwhile."""
    after = wakeups.current()
    return after is not None and (after > 0 or before == 0)


@pytest.mark.skipif(not _may_request(), reason="needs write access to /dev/cpu_dma_latency")
def test_the_request_stands_while_held_and_ends_after() -> None:
    before = wakeups.current()
    assert before is not None
    with wakeups.prompt():
        assert wakeups.current() == 0
    assert _released(before)


@pytest.mark.skipif(not _may_request(), reason="needs write access to /dev/cpu_dma_latency")
def test_the_request_ends_when_the_block_raises() -> None:
    before = wakeups.current()
    with pytest.raises(RuntimeError), wakeups.prompt():
        raise RuntimeError("the stop failed")
    assert _released(before)


def test_without_the_device_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wakeups, "DEVICE", "/nonexistent/cpu_dma_latency")
    ran = False
    with wakeups.prompt():
        ran = True
    assert ran
    assert wakeups.current() is None


def test_an_error_in_the_block_is_not_chained_to_the_missing_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A traceback at -v must not blame /dev/cpu_dma_latency for what went wrong inside."""
    monkeypatch.setattr(wakeups, "DEVICE", "/nonexistent/cpu_dma_latency")
    with pytest.raises(RuntimeError) as caught, wakeups.prompt():
        raise RuntimeError("the stop failed")
    assert caught.value.__context__ is None
