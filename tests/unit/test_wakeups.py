"""The CPU latency request held while qemu-storage-daemon stops (engine/wakeups.py)."""

from __future__ import annotations

import os
import struct

import pytest

from fuse_disk_export.engine import wakeups


def _may_request() -> bool:
    return os.access(wakeups.DEVICE, os.W_OK)


def _granted() -> int | None:
    """The CPU latency the kernel grants now, in µs: what the device reads (a native s32)."""
    try:
        with open(wakeups.DEVICE, "rb", buffering=0) as f:
            data = f.read(4)
    except OSError:
        return None
    return int(struct.unpack("=i", data)[0]) if len(data) == 4 else None


def _released(before: int | None) -> bool:
    """The kernel grants again what it did before, as far as we can tell: the value is
    system-wide, and another process may hold a request of its own meanwhile."""
    after = _granted()
    return after is not None and (after > 0 or before == 0)


@pytest.mark.skipif(not _may_request(), reason="needs write access to /dev/cpu_dma_latency")
def test_the_request_stands_while_held_and_ends_after() -> None:
    before = _granted()
    assert before is not None
    with wakeups.prompt():
        assert _granted() == 0
    assert _released(before)


@pytest.mark.skipif(not _may_request(), reason="needs write access to /dev/cpu_dma_latency")
def test_the_request_ends_when_the_block_raises() -> None:
    before = _granted()
    with pytest.raises(RuntimeError), wakeups.prompt():
        raise RuntimeError("the stop failed")
    assert _released(before)


def test_without_the_device_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wakeups, "DEVICE", "/nonexistent/cpu_dma_latency")
    ran = False
    with wakeups.prompt():
        ran = True
    assert ran
    assert _granted() is None


def test_an_error_in_the_block_is_not_chained_to_the_missing_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A traceback at -v must not blame /dev/cpu_dma_latency for what went wrong inside."""
    monkeypatch.setattr(wakeups, "DEVICE", "/nonexistent/cpu_dma_latency")
    with pytest.raises(RuntimeError) as caught, wakeups.prompt():
        raise RuntimeError("the stop failed")
    assert caught.value.__context__ is None
