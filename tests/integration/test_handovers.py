"""The three hand-overs between the tool and whoever drives it: the stop signal, the pid file and
the error message.

Signals are sent to a tool started with SIGINT *ignored*, as a non-interactive shell starts a job
with ``&``, at points of its start-up reached by waiting on conditions: its handler installed
(SigCgt in /proc), a debug line, its qemu-storage-daemon started, the first mount, live.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from fuse_disk_export import mounts
from tests.helpers.checks import (
    PROMPT,
    assert_all_clean,
    daemons_using,
    one_line,
    wait_first_mount,
)
from tests.helpers.host import require
from tests.helpers.images import qcow2_images, qemu_img, sha256
from tests.helpers.runner import Runner, pid_gone, wait_for


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Started:
    """A tool process whose stderr is read as it comes (for the debug lines we wait on)."""

    def __init__(self, fde: Runner, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            fde.argv(*args),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_ignore_sigint,
        )
        fde.procs.append(self.proc)  # type: ignore[arg-type]
        self.err = b""
        self.out = b""

    def _pump(self, timeout: float) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        streams = [self.proc.stdout, self.proc.stderr]
        ready, _, _ = select.select(streams, [], [], timeout)
        for stream in ready:
            data = os.read(stream.fileno(), 65536)
            if stream is self.proc.stderr:
                self.err += data
            else:
                self.out += data

    def wait_output(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.err + self.out:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.proc.poll() is not None and not self._readable()):
                pytest.fail(f"no {text!r} within {timeout}s: {self.err.decode()[-2000:]}")
            self._pump(min(remaining, 0.05))

    def _readable(self) -> bool:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        ready, _, _ = select.select([self.proc.stdout, self.proc.stderr], [], [], 0)
        return bool(ready)

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        status = self.proc.wait(timeout=timeout)
        while self._readable():
            before = len(self.err) + len(self.out)
            self._pump(0)
            if len(self.err) + len(self.out) == before:
                break
        return status, self.err.decode()


def catches_sigint(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except OSError:
        pass
    return False


def ours_running(root: Path) -> list[int]:
    """Processes (tools and daemons) whose command line or open files name a path under root."""
    found = set(daemons_using(root))
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == os.getpid() or pid_gone(proc.pid):
            continue
        if any(str(root) in arg for arg in proc.info["cmdline"] or ()):
            found.add(proc.pid)
    return sorted(found)


def assert_nothing_left(root: Path, made: dict[Path, str], pid_file: Path) -> None:
    """Within PROMPT: nothing mounted, nothing of ours running, no pid file, images intact."""
    wait_for(lambda: not ours_running(root), PROMPT, "nothing of ours running")
    assert_all_clean(root, pid_files=(pid_file,))
    for img, digest in made.items():
        assert sha256(img) == digest, f"{img} changed"


def _handler_installed(s: Started) -> None:
    wait_for(lambda: catches_sigint(s.proc.pid), 30, "the stop-signal handler")


def _request_built(s: Started) -> None:
    s.wait_output("request built")


def _daemon_started(s: Started) -> None:
    def daemon() -> bool:
        try:
            return any(
                c.name().startswith("qemu-storage")
                for c in psutil.Process(s.proc.pid).children(recursive=True)
            )
        except psutil.Error:
            return False

    wait_for(daemon, 30, "a qemu-storage-daemon")


POINTS: dict[str, Callable[[Started], None]] = {
    "handler": _handler_installed,
    "request": _request_built,
    "daemon": _daemon_started,
}


@pytest.mark.parametrize("point", [*POINTS, "first-mount"])
@pytest.mark.parametrize("how", ["foreground", "-dp"])
def test_sigint_inherited_ignored_is_never_lost(
    fde: Runner, tmp_path: Path, how: str, point: str
) -> None:
    if how == "-dp" and point == "daemon":
        pytest.skip("the detached process starts its daemon after the parent has forked")
    made = qcow2_images(tmp_path, 16 if point == "first-mount" else 1)
    pid_file = tmp_path / "fde.pid"
    mode = ["-dp", str(pid_file)] if how == "-dp" else ["-p", str(pid_file)]
    s = Started(fde, "-v", *mode, *map(str, made), cwd=tmp_path)
    if point == "first-mount":
        wait_first_mount(tmp_path)
    else:
        POINTS[point](s)
    s.proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    status, err = s.finish()
    if "All exports set up" in s.out.decode() or (how == "-dp" and status == 0):
        pytest.skip("the export went live before the signal: the point came too late here")
    assert status == 128 + signal.SIGINT, err
    assert "interrupted by SIGINT" in err, err
    assert_nothing_left(tmp_path, made, pid_file)
    assert time.monotonic() - sent < PROMPT


def test_sigint_after_live_reverts_and_exits_0(fde: Runner, tmp_path: Path) -> None:
    made = qcow2_images(tmp_path, 1)
    pid_file = tmp_path / "fde.pid"
    s = Started(fde, "-p", str(pid_file), *map(str, made), cwd=tmp_path)
    s.wait_output("All exports set up")
    s.proc.send_signal(signal.SIGINT)
    status, err = s.finish()
    assert status == 0, err
    assert_nothing_left(tmp_path, made, pid_file)


def test_signal_to_the_dp_parent_after_live_changes_nothing(fde: Runner, tmp_path: Path) -> None:
    """The parent returns 0 once live; the export stays until its own process is signalled."""
    made = qcow2_images(tmp_path, 1)
    pid_file = tmp_path / "fde.pid"
    s = Started(fde, "-dp", str(pid_file), *map(str, made), cwd=tmp_path)
    status, err = s.finish()
    assert status == 0, err
    serving = int(pid_file.read_text())
    fde.track_pid(serving)
    assert mounts.mount_at(str(next(iter(made)))) is not None
    os.kill(serving, signal.SIGINT)
    wait_for(lambda: not pid_file.exists() and pid_gone(serving), 10, "the revert")
    assert_nothing_left(tmp_path, made, pid_file)


# --------------------------------------------------------------------------------------------
# The pid file


def test_a_live_pid_file_is_refused_before_anything_is_exported(
    fde: Runner, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for img in (a, b):
        qemu_img("create", "-q", "-f", "qcow2", str(img), "16M")
    before = sha256(b)
    pid_file = tmp_path / "same.pid"
    first = fde.run("-dp", str(pid_file), str(a))
    assert first.returncode == 0, first.stderr
    holder = int(pid_file.read_text())
    fde.track_pid(holder)

    second = fde.run("-dp", str(pid_file), str(b))
    assert second.returncode == 1
    line = one_line(second.stderr)
    assert str(pid_file) in line and f"process {holder}" in line, line
    assert mounts.mount_at(str(b)) is None and sha256(b) == before
    assert int(pid_file.read_text()) == holder, "the first export's pid file was taken"

    os.kill(holder, signal.SIGINT)
    wait_for(lambda: not pid_file.exists() and pid_gone(holder), 10, "the first export's revert")
    assert_all_clean(tmp_path, pid_files=(pid_file,))


@pytest.mark.parametrize("content", ["dead", "alive-unlocked", "garbage"])
def test_a_stale_pid_file_is_taken_over(fde: Runner, tmp_path: Path, content: str) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "16M")
    pid_file = tmp_path / "fde.pid"
    if content == "dead":
        gone = subprocess.Popen(["true"])
        gone.wait()
        pid_file.write_text(f"{gone.pid}\n")
    elif content == "alive-unlocked":
        pid_file.write_text(f"{os.getpid()}\n")  # a live process that holds no lock on it
    else:
        pid_file.write_text("not a pid\n")
    result = fde.run("-dp", str(pid_file), str(img))
    assert result.returncode == 0, result.stderr
    serving = int(pid_file.read_text())
    fde.track_pid(serving)
    os.kill(serving, signal.SIGINT)
    wait_for(lambda: not pid_file.exists() and pid_gone(serving), 10, "the revert")
    assert_all_clean(tmp_path, pid_files=(pid_file,))


# --------------------------------------------------------------------------------------------
# QEMU's own reason, and what a user can fix


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Path]:
    """A folder every user can reach, with the package and its dependencies (the venv's Python
    lives under /root, out of an unprivileged user's reach; the system's Python is used)."""
    root = Path(tempfile.mkdtemp(prefix="fde-world-"))
    os.chmod(root, 0o755)
    lib = root / "lib"
    import daemon
    import lockfile
    import psutil as ps

    import fuse_disk_export

    for package in (fuse_disk_export, ps, daemon, lockfile):  # what -d needs too
        shutil.copytree(Path(package.__file__).parent, lib / package.__name__)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    for entry in mounts.read_mounts():
        if entry.mount_point.startswith(str(root) + "/"):
            mounts.lazy_unmount(entry.mount_point)
    shutil.rmtree(root, ignore_errors=True)


def _as_nobody(world: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (shell, as root, in a private mount namespace), then the tool as nobody."""
    for tool in ("unshare", "setpriv"):
        require(shutil.which(tool) is not None, tool)
    python = "/usr/bin/python3"
    require(os.access(python, os.X_OK), python)
    require(os.geteuid() == 0, "root (to make a private mount namespace)")
    tool = f"setpriv --reuid nobody --regid nogroup --clear-groups env PYTHONPATH={world}/lib "
    tool += f"PATH={os.environ['PATH']} {python} -m fuse_disk_export "
    quoted = " ".join(f"'{a}'" for a in args)
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-euc",
            f"{script}\n{tool}{quoted}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=world,
    )


def _image_and_fuse(world: Path, name: str, image_mode: int, fuse_mode: int) -> tuple[Path, Path]:
    """A 16 MiB qcow2 of ``image_mode``, and a FUSE device node of ``fuse_mode`` to bind over
    /dev/fuse in the namespace (whatever the machine's own mode)."""
    img = world / name
    qemu_img("create", "-q", "-f", "qcow2", str(img), "16M")
    img.chmod(image_mode)
    fuse = world / f"fuse-{fuse_mode:04o}"
    if not fuse.exists():
        os.mknod(fuse, fuse_mode | stat.S_IFCHR, os.makedev(10, 229))
        fuse.chmod(fuse_mode)
    return img, fuse


def test_non_root_without_dev_fuse_access_is_told_why(
    fde: Runner, world: Path, tmp_path: Path
) -> None:
    # Whatever /dev/fuse's mode on this machine, in here it is root's alone.
    img, locked = _image_and_fuse(world, "b.qcow2", 0o666, 0o600)
    result = _as_nobody(world, f"mount --bind {locked} /dev/fuse", str(img))
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert "/dev/fuse" in line and "permission denied" in line and "0600" in line, line
    assert mounts.mount_at(str(img)) is None


@pytest.mark.parametrize("background", [False, True])
def test_the_process_limit_reached_is_one_line(
    fde: Runner, world: Path, tmp_path: Path, background: bool
) -> None:
    """``ulimit -u`` reached (it binds only users other than root): whichever fork or thread
    fails first (the daemon's, -d's), one line says so, and nothing is left."""
    require(shutil.which("prlimit") is not None, "prlimit")
    img, fuse = _image_and_fuse(world, "u.qcow2", 0o666, 0o666)
    pid_file = world / "u.pid"
    args = ["-dp", str(pid_file), str(img)] if background else [str(img)]
    result = _as_nobody(
        world, f"mount --bind {fuse} /dev/fuse\nprlimit --pid $$ --nproc=1:1", *args
    )
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert "ulimit -u" in line and "Traceback" not in line, line
    assert mounts.mount_at(str(img)) is None and not pid_file.exists()
    assert json.loads(qemu_img("info", "--output=json", str(img)))["format"] == "qcow2"


def test_non_root_read_only_image_is_told_to_export_it_elsewhere(
    fde: Runner, world: Path, tmp_path: Path
) -> None:
    """fusermount3 mounts only on a file the user may write: for root's read-only image, both
    the writable refusal and -r point at -r -m FILE (-r alone failed in fusermount3)."""
    img, fuse = _image_and_fuse(world, "ro.qcow2", 0o644, 0o666)
    for args in ([str(img)], ["-r", str(img)]):
        result = _as_nobody(world, f"mount --bind {fuse} /dev/fuse", *args)
        assert result.returncode == 1, result.stderr
        line = one_line(result.stderr)
        assert "-r -m FILE" in line and str(img) in line, line
    assert mounts.mount_at(str(img)) is None


def test_a_generic_qemu_error_carries_the_cause_it_printed(
    fde: Runner, world: Path, tmp_path: Path
) -> None:
    """As a user with /dev/fuse access, --allow-other on without user_allow_other in
    /etc/fuse.conf: QEMU says only "Failed to mount FUSE session to export", fusermount3 says
    why on its stderr; the one line must carry that."""
    require(shutil.which("fusermount3") is not None, "fusermount3")
    img = world / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "16M")
    img.chmod(0o666)
    dev = world / "dev"
    conf = world / "fuse.conf"
    conf.write_text("# no user_allow_other\n")
    setup = (
        f"mkdir -p {dev}; mount -t tmpfs -o mode=0755 none {dev}; "
        f"mknod -m 0666 {dev}/fuse c 10 229; mount --bind {dev}/fuse /dev/fuse; "
        f"mount --bind {conf} /etc/fuse.conf"
    )
    result = _as_nobody(world, setup, "--allow-other", "on", str(img))
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert str(img) in line, result.stderr
    assert "user_allow_other" in line or "allow_other" in line, result.stderr
    assert "Traceback" not in result.stderr
    assert mounts.mount_at(str(img)) is None
    assert not stat.S_ISDIR(img.stat().st_mode)


def test_a_raw_image_is_exported_with_a_note(fde: Runner, tmp_path: Path) -> None:
    img = tmp_path / "plain.img"
    img.write_bytes(b"\x11" * 65536)
    proc = fde.start_live(str(img))
    err = fde.revert(proc)
    assert "already a raw image" in err and str(img) in err, err


def test_doctor_as_a_user_without_dev_fuse_access(world: Path) -> None:
    """--doctor as nobody, /dev/fuse a real FUSE device at 0600 root's: ✘ with the cause and
    the remedy, and exit 1 (a default export would fail); as root the same check passes."""
    dev = world / "dev"
    setup = (
        f"mkdir -p {dev}; mount -t tmpfs -o mode=0755 none {dev}; "
        f"mknod -m 0600 {dev}/fuse c 10 229; mount --bind {dev}/fuse /dev/fuse"
    )
    result = _as_nobody(world, setup, "--doctor")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    failed = [i for i, line in enumerate(lines) if line.startswith("✘ /dev/fuse")]
    assert failed, result.stdout
    assert "mode 0600" in lines[failed[0]] and "no read and write access" in lines[failed[0]]
    assert "chmod 0666 /dev/fuse" in lines[failed[0] + 1], result.stdout
    assert any(line.startswith("✔ user: ") for line in lines), result.stdout
