"""Files and helper processes an export needs before its graph can be planned, and their removal.

``--snapshot`` needs an empty temporary qcow2 to take the writes, and ``--overlay FILE`` a FILE
over the image when it does not exist yet; ``--load-snapshot`` needs a
read-only qemu-nbd serving the internal snapshot (qemu-storage-daemon has no QMP command that
loads one).  `prepare_images` makes them, hands back the specs that use them, and removes them
whatever happens — the overlay is unlinked as soon as QEMU holds it open, so not even a SIGKILL
leaves it.  A FILE made for ``--overlay`` is removed only if the export never went live.
"""

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from fuse_disk_export.engine.graph import ImageSpec
from fuse_disk_export.errors import ImageError, RequirementError

log = logging.getLogger(__name__)


class ImageExtras(NamedTuple):
    """What each image needs besides its own files."""

    #: Virtual size of the disk the overlay goes on (``--snapshot``); None: no overlay.
    overlay_size: int | None = None
    #: Internal snapshot to serve through qemu-nbd (``--load-snapshot``); None: the image itself.
    load_snapshot: str | None = None
    #: ``--overlay FILE`` (the spec's overlay) is to be made, of this virtual size; None: no.
    new_overlay_size: int | None = None


class PreparedImages:
    """The specs to plan, and the temporary files and helper processes they use."""

    def __init__(self, specs: list[ImageSpec], directory: str = "") -> None:
        self.specs = specs
        self.directory = directory
        self.overlays: list[str] = []
        self.servers: list[int] = []
        #: ``--overlay`` files made here, removed unless the export goes live.
        self.created: list[str] = []

    def keep_created(self) -> None:
        """Keep the ``--overlay`` files made here: the export is live."""
        self.created.clear()

    def forget_overlays(self) -> None:
        """Unlink the temporary overlays once QEMU has them open (nothing is left even after a
        SIGKILL)."""
        for path in self.overlays:
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)  # only once empty: snapshot sockets may still be in it


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RequirementError(f"{name} not found (Debian package qemu-utils)")
    return path


def _create_qcow2(path: str, size: int, *backing: str) -> str:
    """``qemu-img create`` a qcow2 at ``path``; return why it failed ("" when it did not).

    Paths go as whole arguments, absolute: qemu-img parses them neither as options nor as
    ``proto:`` prefixes.
    """
    result = subprocess.run(
        [_tool("qemu-img"), "create", "-q", "-f", "qcow2", *backing, path, str(size)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    return "" if result.returncode == 0 else result.stderr.strip().removeprefix("qemu-img: ")


def _create_overlay(directory: str, spec: ImageSpec, size: int) -> str:
    import tempfile  # only -s and -l pay for it

    fd, path = tempfile.mkstemp(prefix="overlay-", suffix=".qcow2", dir=directory)
    os.close(fd)
    failed = _create_qcow2(path, size)
    if failed:
        os.unlink(path)
        raise ImageError(f"cannot create the temporary overlay: {failed}", path=spec.image)
    return path


def _create_user_overlay(spec: ImageSpec, size: int) -> None:
    """Make ``--overlay FILE``: a qcow2 over the image, backing path absolute, format pinned, so
    that QEMU's tools open the same disk from it after the revert (``qemu-img commit``)."""
    assert spec.overlay is not None
    image = spec.layers[0]
    # -u: the backing file is not opened (we probed it; it may be one QEMU cannot write).
    failed = _create_qcow2(spec.overlay, size, "-u", "-F", image.format, "-b", image.path)
    if failed:
        with contextlib.suppress(OSError):
            os.unlink(spec.overlay)
        raise ImageError(f"--overlay: cannot be created: {failed}", path=spec.overlay)
    log.info("%s: made the overlay %s", spec.image, spec.overlay)


def _serve_snapshot(directory: str, spec: ImageSpec, name: str) -> tuple[str, int]:
    """Start a read-only qemu-nbd on the internal snapshot; return its socket and pid.

    ``--fork`` returns once the socket listens; without ``--persistent`` qemu-nbd exits when its
    one client (our NBD node) disconnects, so it cannot outlive the export.
    """
    socket_path = os.path.join(directory, f"snapshot-{len(os.listdir(directory))}.sock")
    pid_file = socket_path + ".pid"
    layer = spec.layers[0]
    result = subprocess.run(
        [
            _tool("qemu-nbd"),
            "--fork",
            "--read-only",
            "--pid-file",
            pid_file,
            "--socket",
            socket_path,
            "--format",
            layer.format,
            "--load-snapshot",
            name,
            layer.path,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise ImageError(
            f"cannot load snapshot {name!r}: {reason.removeprefix('qemu-nbd: ')}", path=spec.image
        )
    with open(pid_file) as f:
        return socket_path, int(f.read())


@contextlib.contextmanager
def prepare_images(
    specs: Sequence[ImageSpec], needs: Sequence[ImageExtras]
) -> Iterator[PreparedImages]:
    """Specs with overlays and snapshot servers in place; everything removed on exit (an
    ``--overlay`` file made here only if the export never went live)."""
    result = PreparedImages([])

    def directory() -> str:
        if not result.directory:
            import tempfile  # only -s and -l pay for it

            result.directory = tempfile.mkdtemp(prefix="fuse-disk-export-")
        return result.directory

    try:
        for spec, need in zip(specs, needs, strict=True):
            if need.new_overlay_size is not None:
                _create_user_overlay(spec, need.new_overlay_size)
                result.created.append(str(spec.overlay))
            if need.load_snapshot:
                socket_path, pid = _serve_snapshot(directory(), spec, need.load_snapshot)
                result.servers.append(pid)
                spec = spec._replace(nbd_source=socket_path)
            if need.overlay_size is not None:
                overlay = _create_overlay(directory(), spec, need.overlay_size)
                result.overlays.append(overlay)
                spec = spec._replace(overlay=overlay)
            result.specs.append(spec)
        yield result
    finally:
        for path in result.created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        result.forget_overlays()
        for pid in result.servers:
            # Ours (its pid file says so); normally gone already with its one client.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if result.directory:
            shutil.rmtree(result.directory, ignore_errors=True)
