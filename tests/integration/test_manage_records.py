"""--list and --stop without FUSE: stand-in processes registered in a private registry."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_disk_export import manage, registry
from tests.helpers.records import record

pytestmark = pytest.mark.usefixtures("registry_dir")


@pytest.fixture
def stand_in() -> Iterator[subprocess.Popen[bytes]]:
    """A process that plays a serving fuse-disk-export: registered, ends on SIGINT."""
    proc = subprocess.Popen(["sleep", "60"])
    started = registry.process_start_time(proc.pid)
    assert started is not None
    registry.register([record(proc.pid, "/images/a.qcow2", started=started)])
    yield proc
    proc.kill()
    proc.wait()


def test_human_size() -> None:
    assert manage.human_size(None) == "?"
    assert manage.human_size(512) == "512 B"
    assert manage.human_size(1536) == "1.5 KiB"
    assert manage.human_size(64 << 20) == "64 MiB"
    assert manage.human_size(20 << 30) == "20 GiB"
    assert manage.human_size(3 << 50) == "3 PiB"


def test_plain_listing_aligns_columns_and_ends_with_paths() -> None:
    rows = [
        record(100, "/images/my disk.qcow2"),
        record(20000, "/b.vdi", format="vdi", writable=False, virtual_size=1 << 20),
    ]
    lines = manage.format_plain(rows).splitlines()
    assert lines[0].split() == ["PID", "FORMAT", "SIZE", "MODE", "SINCE", "MOUNT", "POINT", "IMAGE"]
    assert lines[1].startswith("100  ") and lines[1].endswith("/images/my disk.qcow2")
    assert lines[2].startswith("20000") and " vdi " in lines[2] and " ro " in lines[2]
    assert lines[0].index("FORMAT") == lines[1].index("qcow2") == lines[2].index("vdi")


def test_list_json_and_plain(stand_in: subprocess.Popen[bytes]) -> None:
    out = io.StringIO()
    assert manage.list_exports(as_json=True, out=out) == 0
    (item,) = json.loads(out.getvalue())
    assert item["pid"] == stand_in.pid and item["mountpoint"] == "/images/a.qcow2"
    assert set(item) >= {"image", "format", "virtual_size", "writable", "since", "daemon_pid"}
    out = io.StringIO()
    assert manage.list_exports(out=out) == 0
    assert out.getvalue().splitlines()[1].startswith(str(stand_in.pid))


def test_list_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert manage.list_exports(out=sys.stdout) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no live exports" in captured.err
    assert manage.list_exports(as_json=True, out=sys.stdout) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_stop_by_pid_and_by_path(
    stand_in: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    assert manage.stop([str(stand_in.pid)]) == 0
    # Returned only once the process had exited: it is a zombie now, or reaped.
    assert stand_in.wait(timeout=0) == -signal.SIGINT
    assert capsys.readouterr().out == f"Reverted /images/a.qcow2 (pid {stand_in.pid})\n"


def test_stop_by_image_path(stand_in: subprocess.Popen[bytes]) -> None:
    assert manage.stop(["/images/a.qcow2"], quiet=True) == 0
    assert stand_in.wait(timeout=0) == -signal.SIGINT


def test_stop_through_a_symlink(stand_in: subprocess.Popen[bytes], tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/images/a.qcow2")
    assert manage.stop([str(tmp_path / "link")], quiet=True) == 0
    assert stand_in.wait(timeout=0) == -signal.SIGINT


def test_stop_refuses_what_is_not_ours(
    stand_in: subprocess.Popen[bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        missing = str(tmp_path / "nothing.qcow2")
        assert manage.stop([str(other.pid), missing, "/"]) == 1
        assert other.poll() is None and stand_in.poll() is None  # nobody was signalled
    finally:
        other.kill()
        other.wait()
    errors = [r.getMessage() for r in caplog.records]
    assert errors == [
        f"pid {other.pid} serves no export: it is not a fuse-disk-export process, or its "
        "revert has begun (see --list)",
        f"{missing}: is not exported (see --list)",
        errors[2],
    ]
    assert errors[2].startswith("/: is a mount point (") and "no fuse-disk-export" in errors[2]


def test_stop_gives_up_at_the_deadline(caplog: pytest.LogCaptureFixture) -> None:
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN);"
            "print(flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == b"\n"
        registry.register([record(stubborn.pid, started=registry.process_start_time(stubborn.pid))])
        assert manage.stop([str(stubborn.pid)], timeout=0.2) == 1
        assert stubborn.poll() is None
        assert f"pid {stubborn.pid} did not stop within 0.2s" in caplog.text
    finally:
        stubborn.kill()
        stubborn.wait()


def test_the_path_to_live_imports_neither_psutil_nor_rich() -> None:
    code = (
        "import sys\n"
        "import fuse_disk_export.cli, fuse_disk_export.lifecycle, fuse_disk_export.request\n"
        "import fuse_disk_export.logs, fuse_disk_export.notify, fuse_disk_export.registry\n"
        "print(sorted(m for m in ('psutil', 'rich') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "[]\n"
