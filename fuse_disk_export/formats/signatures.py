"""The signatures QEMU's block drivers probe for, and the parser each one picks.

The checks are those of QEMU's ``block/*.c`` probe functions, in an order that gives the format QEMU
would pick.  A parser is named ``"module.function"``, a function of a module of this package, so
that telling a format apart imports none of them (see `fuse_disk_export.detect`).
"""

from __future__ import annotations

from typing import Final

from fuse_disk_export.formats.common import u32be

PROBE_BUF: Final = 2048  # QEMU's probe buffer; the vmdk text signature must show within it

_QCOW_MAGIC: Final = b"QFI\xfb"
VMDK4_MAGIC: Final = b"KDMV"
VMDK3_MAGIC: Final = b"COWD"
_VDI_SIGNATURE: Final = (0xBEDA107F).to_bytes(4, "little")
VDI_SIGNATURE_AT: Final = 0x40
_VHDX_MAGIC: Final = b"vhdxfile"
_VPC_COOKIE: Final = b"conectix"
_QED_MAGIC: Final = b"QED\0"
PARALLELS_MAGICS: Final = (b"WithoutFreeSpace", b"WithouFreSpacExt")
_LUKS_MAGIC: Final = b"LUKS\xba\xbe"
_BOCHS_MAGIC: Final = b"Bochs Virtual HD Image"
_CLOOP_MAGIC: Final = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)
_DMG_TRAILER: Final = b"koly" + (4).to_bytes(4, "big") + (512).to_bytes(4, "big")


def _field_is(head: bytes, offset: int, expected: bytes) -> bool:
    """A field matches, or is cut off by the end of the file (then the parser says truncated)."""
    present = head[offset : offset + len(expected)]
    return len(present) < len(expected) or present == expected


def _field_in(head: bytes, offset: int, expected: tuple[bytes, ...]) -> bool:
    return any(_field_is(head, offset, value) for value in expected)


def _c_field_is(head: bytes, offset: int, width: int, expected: bytes) -> bool:
    """A NUL-terminated text field matches (as strcmp would say), or is cut off mid-text."""
    field = head[offset : offset + width]
    if b"\0" in field:
        return field.split(b"\0", 1)[0] == expected
    return len(field) < width and expected.startswith(field)


def match_head(head: bytes) -> str | None:
    """The parser (``"module.function"``) for a signature at the start of the file, or None.

    A full magic with a version field cut off by the end of the file still counts: that file is a
    truncated image, not raw data.
    """
    if head.startswith(_QCOW_MAGIC):
        if len(head) < 8:
            return "qcow2.parse"
        version = u32be(head, 4)
        if version == 1:
            return "qcow.parse"
        if version >= 2:
            return "qcow2.parse"
    if head.startswith((VMDK4_MAGIC, VMDK3_MAGIC)):
        return "vmdk.parse_sparse"
    if head.startswith(_VHDX_MAGIC):
        return "vhdx.parse"
    if head.startswith(_VPC_COOKIE):
        return "vpc.parse_head"
    if head.startswith(_QED_MAGIC):
        return "qed.parse"
    if head.startswith(PARALLELS_MAGICS) and _field_is(head, 16, (2).to_bytes(4, "little")):
        return "parallels.parse"
    if head.startswith(_LUKS_MAGIC) and _field_in(head, 6, (b"\0\1", b"\0\2")):
        return "luks.parse"
    if (
        _c_field_is(head, 0, 32, _BOCHS_MAGIC)
        and len(head) > len(_BOCHS_MAGIC)
        and _c_field_is(head, 32, 16, b"Redolog")
        and _c_field_is(head, 48, 16, b"Growing")
        and _field_in(head, 64, (b"\0\0\2\0", b"\0\0\1\0"))
    ):
        return "bochs.parse"
    if head[VDI_SIGNATURE_AT : VDI_SIGNATURE_AT + 4] == _VDI_SIGNATURE:
        return "vdi.parse"
    if looks_like_vmdk_descriptor(head[:PROBE_BUF]):
        return "vmdk.parse_text"
    if head.startswith(_CLOOP_MAGIC):
        return "cloop.parse"
    return None


def match_tail(tail: bytes) -> str | None:
    """The parser for a signature in the last sector (fixed VHD footer, DMG trailer), or None."""
    if tail.startswith(_VPC_COOKIE):
        return "vpc.parse_tail"
    if tail.startswith(_DMG_TRAILER):
        return "dmg.parse"
    return None


def looks_like_vmdk_descriptor(buf: bytes) -> bool:
    """QEMU's vmdk_probe for text: comments and blank lines, then ``version=1|2|3``."""
    pos, end = 0, len(buf)
    while pos < end:
        if buf[pos] == ord("#"):
            newline = buf.find(b"\n", pos)
            pos = end if newline < 0 else newline + 1
            continue
        if buf[pos] == ord(" "):
            while pos < end and buf[pos] == ord(" "):
                pos += 1
            if pos < end and buf[pos] == ord("\r"):
                pos += 1
            if pos == end or buf[pos] != ord("\n"):
                return False
            pos += 1
            continue
        return any(
            buf.startswith(b"version=" + v + eol, pos)
            for v in (b"1", b"2", b"3")
            for eol in (b"\n", b"\r\n")
        )
    return False
