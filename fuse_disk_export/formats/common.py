"""What every format parser shares: the answer it gives, the source it reads, its common errors."""

import os
from typing import Final, NamedTuple

from fuse_disk_export.bounded import BoundedReader, OverBudget, Reader, ReadFailed
from fuse_disk_export.errors import ImageError, ProbeLimitError

#: The most bytes one probe reads, all reads together.  Headers are small; what is large (tables,
#: descriptors, extension areas) is bounded below so that the worst case, vhdx, stays well under it.
MAX_PROBE_BYTES: Final = 256 * 1024

SECTOR: Final = 512
HEAD_BYTES: Final = 4096  # every header we parse fits in the first 4 KiB
NAME_MAX: Final = 1023  # longest backing name qcow/qcow2 accept
PATH_MAX: Final = 4095  # longest name QED and vmdk read (a PATH_MAX buffer)


class ImageInfo(NamedTuple):
    """What the header of one image says, as much as the caller needs to plan an export.

    ``format`` is a QEMU driver name.  ``virtual_size`` is in bytes, the size QEMU will expose
    (whole sectors where QEMU counts sectors), or None where the header alone cannot tell.
    ``backing_file`` and ``data_file`` are the names exactly as stored (decoded losslessly with
    `os.fsdecode`), not resolved.  ``read_only`` says why the image must not be opened writable
    (QEMU can only open it read-only, or a write through QEMU would damage it); empty where QEMU
    writes it safely.
    """

    format: str
    virtual_size: int | None
    backing_file: str | None = None
    backing_format: str | None = None
    #: How the data is encrypted: "" (not), "luks", or "aes" (qcow's legacy AES-CBC).
    encryption: str = ""
    data_file: str | None = None
    read_only: str = ""

    @property
    def encrypted(self) -> bool:
        return bool(self.encryption)


#: `ImageInfo.read_only` of an image encrypted with qcow's legacy AES-CBC.
LEGACY_AES: Final = (
    "it is encrypted with qcow's legacy AES, which cannot tell a wrong passphrase (a write under "
    "one would store data that reads back as garbage)"
)


#: `ImageInfo.read_only` of the formats QEMU has no write support for at all.
READ_ONLY_DRIVER: Final = "QEMU's driver for this format is read-only"


class Source(BoundedReader):
    """The image as the parsers see it: its size, and one read budget shared by all of them.

    Reads are clipped to the file, so that a header pointing far past the end costs nothing and
    the parser, seeing fewer bytes than it asked for, says what is missing.
    """

    def __init__(self, read: Reader, size: int) -> None:
        super().__init__(read, size, MAX_PROBE_BYTES, clip=True)

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``, fewer at the end of the file."""
        try:
            return super().read(offset, length)
        except OverBudget:
            raise ProbeLimitError(f"probing would read more than {MAX_PROBE_BYTES} bytes") from None
        except ReadFailed as e:
            raise ImageError(f"cannot read the image: {e.error.strerror or e.error}") from None

    def exact(self, offset: int, length: int, what: str) -> bytes:
        """Exactly ``length`` bytes, or an error saying that ``what`` lies past the end."""
        data = self.read(offset, length)
        if len(data) < length:
            raise self.past_end(what)
        return data

    def header(self, head: bytes, fmt: str, need: int) -> bytes:
        """The first ``need`` bytes, or the error a user should see when the file is shorter.

        ``head`` is what was read of the start of the file already.
        """
        if self.size < need:
            raise self.truncated(fmt, need)
        return head if len(head) >= need else self.exact(0, need, f"{fmt} header")

    def truncated(self, fmt: str, need: int) -> ImageError:
        return ImageError(
            f"truncated {fmt} header (file is {self.size} bytes, header needs {need})"
        )

    @staticmethod
    def past_end(what: str) -> ImageError:
        return ImageError(f"{what} lies past the end of the file")


def stored_name(raw: bytes) -> str | None:
    """A name from a header as QEMU sees it: up to the first NUL, every byte kept (fsdecode)."""
    return os.fsdecode(raw.split(b"\0", 1)[0]) or None


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def sectors_floor(n: int) -> int:
    """QEMU keeps sizes in whole sectors, rounding a byte count down."""
    return n - n % SECTOR


def u32be(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "big")
