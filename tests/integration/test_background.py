"""The -d hand-over, for real (a forked, detached child, in a process of its own): warnings reach
the waiting parent, and a failure's line and status too."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from fuse_disk_export.background import run_detached
from fuse_disk_export.errors import ImageError

def ready(reporter):
    reporter.ready(["/x.qcow2: cannot serialize writes (test)"])
    return 0

def failed(reporter):
    error = ImageError("not an image", path="/y.img")
    reporter.failed(error)
    return error.exit_status

sys.exit(run_detached(ready if sys.argv[1] == "ready" else failed))
"""


def detached(how: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, how],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_ready_brings_the_setup_warnings_to_the_parent() -> None:
    result = detached("ready")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "fuse-disk-export: /x.qcow2: cannot serialize writes (test)\n"


def test_a_failure_reaches_the_parent_with_its_status() -> None:
    result = detached("failed")
    assert result.returncode == 1
    assert result.stderr == "fuse-disk-export: /y.img: not an image\n"
