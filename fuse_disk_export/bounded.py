"""The one way the parsers of hostile bytes read: a read callable held to bounds.

Image headers (`detect` and its `formats`) and partition tables (`partitions`) come from files we
have not vetted, so every offset and length in them is a claim.  A `BoundedReader` never asks
``read`` for a byte outside the data, and charges every byte to a budget before asking, so that no
header, however it lies, makes its parser read much.

Its owner chooses what becomes of a span that runs past the end of the data.  ``clip=True`` cuts it
to what is there: a probe asks for "up to" that many bytes, since an image may be shorter than its
header claims and the parser then says what is missing.  ``clip=False`` refuses it, and a short
answer from ``read`` too: a partition table needs every byte it names.

The reader knows no file, table or message: it raises the exceptions below, and its owner words
them.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "BoundedReader",
    "OverBudget",
    "PastEnd",
    "ReadFailed",
    "ReadRefused",
    "Reader",
    "ShortRead",
]

#: ``read(offset, length)``: up to ``length`` bytes of the data from ``offset``.
Reader = Callable[[int, int], bytes]


class ReadRefused(Exception):
    """A read the bounds forbid, or one that ``read`` could not make."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class PastEnd(ReadRefused):
    """The span asked for leaves the data (``clip=False`` only)."""


class OverBudget(ReadRefused):
    """The read would take the bytes read past the budget; nothing was read."""


class ReadFailed(ReadRefused):
    """``read`` raised `OSError` ``error`` at ``offset``."""

    def __init__(self, offset: int, error: OSError) -> None:
        super().__init__(offset)
        self.error = error


class ShortRead(ReadRefused):
    """``read`` returned ``got`` of the ``wanted`` bytes at ``offset`` (``clip=False`` only)."""

    def __init__(self, offset: int, got: int, wanted: int) -> None:
        super().__init__(offset)
        self.got = got
        self.wanted = wanted


class BoundedReader:
    """``read(offset, length) -> bytes`` over ``size`` bytes of data, ``budget`` bytes in all.

    ``max_read``, if given, is the most asked of ``read`` at once; longer reads are made in pieces.
    """

    def __init__(
        self, read: Reader, size: int, budget: int, *, clip: bool, max_read: int | None = None
    ) -> None:
        self._read = read
        self.size = size
        self.budget = budget
        self.clip = clip
        self.max_read = max_read
        self.used = 0

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; see the module docstring for a span past the end.

        The span is checked against the data first, so that an offset far past the end costs
        nothing, then charged to the budget before ``read`` is asked.

        :raise ReadRefused: one of its subclasses, for the owner to word.
        """
        if self.clip:
            if offset < 0 or offset >= self.size or length <= 0:
                return b""
            length = min(length, self.size - offset)
        elif offset < 0 or offset + length > self.size:
            raise PastEnd(offset)
        if self.used + length > self.budget:
            raise OverBudget(offset)
        self.used += length
        step = self.max_read or length
        chunks: list[bytes] = []
        done = 0
        while done < length:
            count = min(step, length - done)
            try:
                data = self._read(offset + done, count)
            except OSError as e:
                raise ReadFailed(offset + done, e) from None
            chunks.append(bytes(data[:count]))
            if len(data) < count:
                if not self.clip:
                    raise ShortRead(offset + done, len(data), count)
                break
            done += count
        return b"".join(chunks)
