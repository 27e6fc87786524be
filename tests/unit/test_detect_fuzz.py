"""detect under attack: valid images of every format, mutated, must give an answer or an ImageError.

Whatever a header says, `probe_reader` returns an `ImageInfo` or raises `ImageError` (never
anything else, never `ProbeLimitError`, which would mean a parser lost its bound), and never asks
the reader for more than `MAX_PROBE_BYTES` in total.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuse_disk_export.detect import MAX_PROBE_BYTES, ImageInfo, ProbeLimitError, probe_reader
from fuse_disk_export.errors import ImageError

try:
    from tests.unit.test_detect import VALID, VHDX_ITEMS_AT, VHDX_META_AT, CountingReader
except ImportError:  # run without the tests package on the path
    from test_detect import (  # type: ignore[no-redef, import-not-found]
        VALID,
        VHDX_ITEMS_AT,
        VHDX_META_AT,
        CountingReader,
    )

KiB = 1024
FORMATS = {
    "raw", "qcow2", "qcow", "vmdk", "vdi", "vhdx", "vpc", "qed", "parallels", "luks", "dmg",
    "bochs", "cloop",
}  # fmt: skip

#: Built once: the builders are deterministic enough, and a few are a megabyte.
IMAGES: dict[str, bytes] = {name: build() for name, (build, _) in VALID.items()}
NAMES = sorted(name for name in IMAGES if name != "raw")

#: Offsets worth hitting beyond the first sectors and the last ones: where tables live.
HOTSPOTS: dict[str, list[int]] = {
    "vhdx": [64 * KiB, 128 * KiB, 192 * KiB, 256 * KiB, VHDX_META_AT, VHDX_ITEMS_AT],
    "qcow2": [64 * KiB, 128 * KiB, 192 * KiB],
    "qcow2-backing": [64 * KiB, 128 * KiB, 192 * KiB],
    "qed": [64 * KiB],
    "vpc": [512, 1024, 1536],
    "luks": [208, 4096],
    "luks2": [16 * KiB],
    "vmdk": [512, 21 * 512],
    "vmdk-parent": [512],
}

FAST = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check(data: bytes) -> ImageInfo | ImageError:
    """The property itself: an answer or an ImageError, within the read budget."""
    reader = CountingReader(data)
    try:
        info = probe_reader(reader, len(data))
    except ProbeLimitError as e:  # a bound lost: a bug, not a refusal
        raise AssertionError(f"read budget exceeded: {e}") from e
    except ImageError as e:
        assert e.path is None
        assert e.reason and "\n" not in e.reason
        result: ImageInfo | ImageError = e
    else:
        assert isinstance(info, ImageInfo)
        assert info.format in FORMATS
        assert info.virtual_size is None or info.virtual_size >= 0
        if info.format == "raw":
            assert info.virtual_size == len(data)
        for name in (info.backing_file, info.backing_format, info.data_file):
            assert name is None or (name and "\0" not in name)
        assert info.backing_format is None or info.backing_file is not None
        result = info
    assert reader.requested <= MAX_PROBE_BYTES
    return result


@st.composite
def offsets(draw: st.DrawFn, name: str, size: int) -> int:
    """Mostly the header sectors; also the tail, and the places the header points at."""
    choices = [st.integers(0, min(size, 1024) - 1), st.integers(max(0, size - 1536), size - 1)]
    spots = [spot for spot in HOTSPOTS.get(name, []) if spot < size]
    if spots:
        choices.append(
            st.builds(lambda s, d: min(s + d, size - 1), st.sampled_from(spots), st.integers(0, 96))
        )
    return draw(st.one_of(choices))


def interesting_values(size: int) -> st.SearchStrategy[int]:
    """Values that break size and offset arithmetic: zero, one, edges, the file size and near it."""
    edges = [0, 1, 2, 7, 8, 9, 21, 22, 511, 512, 513, 4096, 65535, 65536, 2**31 - 1, 2**31]
    edges += [2**32 - 1, 2**63 - 1, 2**64 - 1, size - 1, size, size + 1, size // 512]
    return st.one_of(st.sampled_from(edges), st.integers(0, 2**64 - 1))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid image with a few bytes flipped, fields overwritten, and maybe cut short."""
    name = draw(st.sampled_from(NAMES))
    data = bytearray(IMAGES[name])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(offsets(name, len(data)))
        if draw(st.booleans()):
            data[at] ^= draw(st.integers(1, 255))
        else:
            width = draw(st.sampled_from([1, 2, 4, 8]))
            order = draw(st.sampled_from(["<", ">"]))
            code = {1: "B", 2: "H", 4: "I", 8: "Q"}[width]
            value = draw(interesting_values(len(data))) % (1 << (8 * width))
            at = min(at, len(data) - width)
            struct.pack_into(order + code, data, at, value)
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@FAST
@given(mutated())
def test_mutated_headers(data: bytes) -> None:
    check(data)


@settings(FAST, max_examples=300)
@given(st.sampled_from(NAMES), st.data())
def test_truncated_anywhere(name: str, data: st.DataObject) -> None:
    image = IMAGES[name]
    keep = data.draw(
        st.one_of(
            st.integers(0, min(len(image), 4096)),
            st.integers(0, len(image)),
            st.integers(max(0, len(image) - 2048), len(image)),
        )
    )
    result = check(image[:keep])
    if keep == len(image):
        assert result == VALID[name][1]


@FAST
@given(st.sampled_from(NAMES), st.binary(min_size=1, max_size=64), st.data())
def test_random_bytes_spliced_into_header(name: str, junk: bytes, data: st.DataObject) -> None:
    image = bytearray(IMAGES[name])
    at = data.draw(offsets(name, len(image)))
    image[at : at + len(junk)] = junk
    check(bytes(image[: max(len(image), 1)]))


MAGICS = [
    b"QFI\xfb\0\0\0\3",
    b"QFI\xfb\0\0\0\2",
    b"QFI\xfb\0\0\0\1",
    b"KDMV",
    b"COWD",
    b"vhdxfile",
    b"conectix",
    b"QED\0",
    b"WithoutFreeSpace\2\0\0\0",
    b"WithouFreSpacExt\2\0\0\0",
    b"LUKS\xba\xbe\0\1",
    b"LUKS\xba\xbe\0\2",
    b"Bochs Virtual HD Image".ljust(32, b"\0")
    + b"Redolog".ljust(16, b"\0")
    + b"Growing".ljust(16, b"\0")
    + b"\0\0\2\0",
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n",
    b"# Disk DescriptorFile\nversion=1\n",
    bytes(0x40) + b"\x7f\x10\xda\xbe",
]


@FAST
@given(st.sampled_from(MAGICS), st.binary(max_size=2048), st.integers(0, 3 * 65536))
def test_magic_then_noise(magic: bytes, noise: bytes, padding: int) -> None:
    check(magic + noise + bytes(padding))


@FAST
@given(st.binary(max_size=1024), st.sampled_from([b"conectix", b"koly\0\0\0\4\0\0\2\0"]))
def test_noise_then_trailer(noise: bytes, trailer: bytes) -> None:
    tail = (trailer + noise).ljust(512, b"\0")[:512]
    check(bytes(4096) + tail)
