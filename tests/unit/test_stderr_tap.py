"""The daemon's stderr as the tool passes it on: a line that repeats itself is passed on a few
times and then counted, and what a daemon says about an export unmounted from outside is
expected, not passed on."""

from __future__ import annotations

import os

from fuse_disk_export.engine.process import MAX_REPEATS, StderrTap


def _through(chunks: list[bytes], unmounted: tuple[str, ...] = ()) -> tuple[str, StderrTap]:
    read_end, write_end = os.pipe()
    out_read, out_write = os.pipe()
    tap = StderrTap(read_end, out_write)
    tap.release()
    if unmounted:
        tap.unmounted(unmounted)
    try:
        for chunk in chunks:  # each less than a pipe holds
            os.write(write_end, chunk)
            assert tap.pump()
    finally:
        os.close(write_end)
    tap.close()
    os.close(out_write)
    with os.fdopen(out_read, "rb") as f:
        return f.read().decode(), tap


def test_a_line_repeated_is_counted_not_passed_on() -> None:
    flood = b"qemu-storage-daemon: Failed to read from FUSE device: No such device\n"
    text, tap = _through([b"first\n", *[flood * 500] * 10, b"other\n", b"x\nx\nx\nx\nx\n", b"tail"])
    lines = text.splitlines()
    assert lines[0] == "first"
    assert lines[1 : 2 + MAX_REPEATS] == [flood.decode().strip()] * (1 + MAX_REPEATS)
    assert lines[2 + MAX_REPEATS] == (
        f"qemu-storage-daemon: (the line above came {5000 - 1 - MAX_REPEATS} more times)"
    )
    assert lines[3 + MAX_REPEATS :] == [
        "other",
        *["x"] * (1 + MAX_REPEATS),
        f"qemu-storage-daemon: (the line above came {4 - MAX_REPEATS} more times)",
        "tail",
    ]
    # Every line still counts, and the latest are kept for an error message.
    assert tap.count == 1 + 5000 + 1 + 5 + 1
    assert tap.since(tap.count - 1) == ["tail"]


def test_a_repeat_split_across_reads_is_still_one_line() -> None:
    text, _ = _through([b"ab", b"c\nab", b"c\n"])
    assert text == "abc\nabc\n"


def test_after_an_unmount_from_outside_its_consequences_are_not_passed_on() -> None:
    path = "/images/a.qcow2"
    text, tap = _through(
        [
            b"qemu-storage-daemon: Failed to read from FUSE device: No such device\n" * 3,
            f"fuse: failed to unmount {path}: Invalid argument\n".encode(),
            f"umount: {path}: not mounted.\n".encode(),
            b"qemu-storage-daemon: Failed to flush the L2 table cache: Input/output error\n",
            b"fuse: failed to unmount /images/other.qcow2: Invalid argument\n",
        ],
        unmounted=(path,),
    )
    assert text.splitlines() == [
        "qemu-storage-daemon: Failed to flush the L2 table cache: Input/output error",
        "fuse: failed to unmount /images/other.qcow2: Invalid argument",
    ]
    assert tap.count == 7
