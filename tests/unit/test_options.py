"""The combinations of options refused before anything is looked at."""

from __future__ import annotations

import pytest

from fuse_disk_export.errors import UsageError
from fuse_disk_export.options import Options, check


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (Options(("a.vmdk", "b.vmdk"), overlay="w.qcow2"), "one image"),
        (Options(("a.vmdk",), overlay="w.qcow2", snapshot=True), "-s or -l"),
        (Options(("a.qcow2",), overlay="w.qcow2", load_snapshot="s1"), "-s or -l"),
        # "--overlay $UNSET": not taken for no overlay, which would write to the image.
        (Options(("a.vmdk",), overlay=""), "--overlay needs a path"),
    ],
)
def test_overlay_refusals(options: Options, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        check(options)


def test_overlay_alone_or_read_only_is_fine() -> None:
    check(Options(("a.vmdk",), overlay="w.qcow2"))
    check(Options(("a.vmdk",), overlay="w.qcow2", read_only=True, partition=1))
    assert Options(("a.vmdk",), overlay="w.qcow2").changes_view


@pytest.mark.parametrize(
    "field",
    ["pid_file", "mountpoint", "mountpoint_dir", "nbd_socket", "passphrase_file", "mount_fs"],
)
def test_an_empty_path_is_refused_not_taken_for_none(field: str) -> None:
    """``-p "$UNSET"`` would otherwise run with no pid file, which a script then waits for."""
    with pytest.raises(UsageError, match="needs a path"):
        check(Options(("a.qcow2",), **{field: ""}))  # type: ignore[arg-type]


def test_an_empty_image_name_is_refused() -> None:
    with pytest.raises(UsageError, match="an image name is empty"):
        check(Options(("a.qcow2", "")))
