"""Where a -d daemon's messages go: --log-file, else syslog (/dev/log), else nowhere."""

from __future__ import annotations

import logging
import logging.handlers
import socket
from pathlib import Path

import pytest

from fuse_disk_export import logs
from fuse_disk_export.errors import UsageError


def test_log_file_gets_timestamped_lines(tmp_path: Path) -> None:
    path = tmp_path / "fde.log"
    with logs.open_log_file(str(path)) as stream:
        handler = logs.daemon_handler(stream)
        logger = logging.getLogger("fde-test-file")
        logger.addHandler(handler)
        try:
            logger.error("qemu-storage-daemon (pid 7) killed by SIGKILL while serving")
        finally:
            logger.removeHandler(handler)
    line = path.read_text()
    assert "fuse-disk-export[" in line and "ERROR: qemu-storage-daemon (pid 7) killed" in line


def test_log_file_that_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot open the log file"):
        logs.open_log_file(str(tmp_path / "missing" / "fde.log"))


def test_syslog_when_the_socket_exists(tmp_path: Path) -> None:
    address = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslogd:
        syslogd.bind(address)
        syslogd.settimeout(5)
        handler = logs.daemon_handler(None, syslog=address)
        assert isinstance(handler, logging.handlers.SysLogHandler)
        logger = logging.getLogger("fde-test-syslog")
        logger.addHandler(handler)
        try:
            logger.warning("reverting")
        finally:
            logger.removeHandler(handler)
            handler.close()
        message = syslogd.recv(4096).decode()
    # <28> is facility daemon (3), severity warning (4).
    assert message.startswith("<28>fuse-disk-export[") and message.rstrip("\0").endswith(
        "]: reverting"
    )


def test_nowhere_without_log_file_or_syslog(tmp_path: Path) -> None:
    handler = logs.daemon_handler(None, syslog=str(tmp_path / "no-such-socket"))
    assert isinstance(handler, logging.NullHandler)


def test_warnings_are_collected_until_stopped() -> None:
    log = logging.getLogger("fuse_disk_export.test")
    with logs.WarningCollector() as collected:
        log.info("no")
        log.warning("%s: cannot serialize writes", "/x")
        log.error("e")
        collected.stop()
        log.warning("late")
    collected.stop()  # twice: harmless
    assert collected.messages == ["/x: cannot serialize writes", "e"]


def test_warnings_are_collected_when_the_terminal_shows_only_errors() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup_terminal(verbose=False, quiet=True)
        with logs.WarningCollector() as collected:
            logging.getLogger("fuse_disk_export.test").warning("collected, not printed")
        assert collected.messages == ["collected, not printed"]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
