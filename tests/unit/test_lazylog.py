"""lazylog: nothing imported for records that go nowhere; everything as logging once loaded."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fuse_disk_export import lazylog


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    saved = lazylog._threshold, lazylog._pending_setup
    yield
    lazylog._threshold, lazylog._pending_setup = saved


def test_the_path_to_live_does_not_load_logging() -> None:
    code = (
        "import sys\n"
        "import fuse_disk_export.cli, fuse_disk_export.export, fuse_disk_export.request\n"
        "from fuse_disk_export import lazylog\n"
        "lazylog.get('fuse_disk_export.x').debug('quiet %s', 1)\n"
        "lazylog.get('fuse_disk_export.x').info('quiet')\n"
        "assert 'logging' not in sys.modules, 'loaded for nothing'\n"
        "lazylog.get('fuse_disk_export.x').warning('loud %s', 2)\n"
        "assert 'logging' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Unconfigured, a warning goes where logging's own last resort sends it.
    assert result.stderr == "loud 2\n"


def test_the_setup_runs_once_for_the_first_record_at_its_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []
    lazylog.configure(lazylog.INFO, lambda: calls.append(1))
    log = lazylog.get("fuse_disk_export.test")
    log.debug("dropped")
    assert calls == []
    assert not log.isEnabledFor(lazylog.DEBUG)
    with caplog.at_level(logging.INFO):
        log.info("kept %d", 3)
        log.info("again")
    assert calls == [1]
    assert [r.getMessage() for r in caplog.records] == ["kept 3", "again"]


def test_configure_now_runs_the_setup_at_once() -> None:
    calls: list[int] = []
    lazylog.configure(lazylog.DEBUG, lambda: calls.append(1), now=True)
    assert calls == [1]
    lazylog.load()
    assert calls == [1]


def test_warnings_and_errors_are_collected_until_stopped() -> None:
    lazylog.configure(lazylog.ERROR, lambda: None)
    log = lazylog.get("fuse_disk_export.test")
    messages = lazylog.start_collecting()
    log.debug("no")
    log.warning("w %s", "one")
    log.error("e")
    lazylog.stop_collecting(messages)
    log.warning("late")
    lazylog.stop_collecting(messages)  # twice: harmless
    assert messages == ["w one", "e"]


def test_exception_carries_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    log = lazylog.get("fuse_disk_export.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    (record,) = caplog.records
    assert record.exc_info is not None and record.exc_info[0] is ValueError


def test_a_collected_message_is_formatted_as_logging_would() -> None:
    lazylog.configure(lazylog.ERROR, lambda: None)
    log = lazylog.get("fuse_disk_export.test")
    messages = lazylog.start_collecting()
    log.warning("%(path)s: %(why)s", {"path": "/x", "why": "locked"})
    log.warning("100% sure %s")  # no arguments: not a format
    log.warning("bad %d", "not a number")  # logging reports these; collecting never raises
    lazylog.stop_collecting(messages)
    assert messages == ["/x: locked", "100% sure %s", "bad %d"]
