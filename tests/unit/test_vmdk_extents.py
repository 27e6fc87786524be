"""detect.vmdk_extent_files: the files a VMDK descriptor makes QEMU open.

An extent is a file QEMU opens on the image's behalf, like a backing file: images.py refuses any
that is not a regular file beside the image.  These tests pin which lines count (QEMU's own
rules: ``RW``, a known type, a positive size) and fuzz the reader like the rest of detect.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuse_disk_export.detect import (
    MAX_PROBE_BYTES,
    ProbeLimitError,
    vmdk_extent_files,
    vmdk_extent_files_reader,
)
from fuse_disk_export.errors import ImageError
from tests.unit.test_detect import CountingReader, vmdk_descriptor, vmdk_sparse


def extents(data: bytes) -> tuple[str, ...]:
    reader = CountingReader(data)
    try:
        return vmdk_extent_files_reader(reader, len(data))
    finally:
        assert reader.requested <= MAX_PROBE_BYTES


def test_descriptor_lists_the_extents_qemu_opens() -> None:
    lines = (
        b'RW 1000 FLAT "a-flat.vmdk" 0\n'
        b'RDONLY 5000 FLAT "b.vmdk" 0\n'  # QEMU skips all but RW
        b'RW 2000 SPARSE "/abs/c.vmdk"\n'
        b'RW 3000 ZERO "d.vmdk"\n'  # no file
        b'RW 0 FLAT "e.vmdk" 0\n'  # no size
        b'RW 500 VMFS "../f.vmdk"\r\n'
    )
    desc = vmdk_descriptor(b"twoGbMaxExtentSparse", lines)
    assert extents(desc) == ("a-flat.vmdk", "/abs/c.vmdk", "../f.vmdk")


def test_monolithic_sparse_holds_its_own_data() -> None:
    assert extents(vmdk_sparse()) == ()
    assert extents(vmdk_sparse(compress=1, gd_at_end=True, version=3)) == ()


def test_sparse_header_pointing_at_a_descriptor() -> None:
    img = bytearray(vmdk_sparse())
    struct.pack_into("<Q", img, 12, 0)  # capacity 0: the extents are elsewhere
    desc = vmdk_descriptor(b"monolithicFlat", b'RW 2048 FLAT "/dev/sda" 0')
    img[512 : 512 + len(desc)] = desc
    assert extents(bytes(img)) == ("/dev/sda",)


def test_a_descriptor_longer_than_we_read_is_refused() -> None:
    desc = vmdk_descriptor(b"monolithicFlat", b'RW 2048 FLAT "a.vmdk" 0\n' + b"#" * 70000)
    with pytest.raises(ImageError, match="longer than"):
        extents(desc + b"\n" + b'RW 2048 FLAT "/dev/sda" 0\n')


def test_not_a_vmdk() -> None:
    with pytest.raises(ImageError, match="not a vmdk"):
        extents(b"QFI\xfb" + bytes(1020))


def test_path_errors_carry_the_path() -> None:
    with pytest.raises(ImageError) as caught:
        vmdk_extent_files("/nonexistent/disk.vmdk")
    assert caught.value.path == "/nonexistent/disk.vmdk"


@st.composite
def mutated_descriptors(draw: st.DrawFn) -> bytes:
    base = draw(
        st.sampled_from(
            [
                vmdk_descriptor(),
                vmdk_descriptor(b"twoGbMaxExtentFlat", b'RW 100 FLAT "x" 0\nRW 9 SPARSE "y"'),
                vmdk_sparse(),
            ]
        )
    )
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, min(len(data), 2048) - 1))
        if draw(st.booleans()):
            data[at] ^= draw(st.integers(1, 255))
        else:
            junk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(junk)] = junk
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_descriptors())
def test_fuzzed_descriptors(data: bytes) -> None:
    """A tuple of non-empty names, or an ImageError; never more reads than the probe budget."""
    try:
        names = extents(data)
    except ProbeLimitError as e:  # a bound lost
        raise AssertionError(e) from e
    except ImageError as e:
        assert e.reason and "\n" not in e.reason
        return
    assert all(isinstance(n, str) and n and "\0" not in n for n in names)
