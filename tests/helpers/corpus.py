"""A corpus of disks made by the filesystems' own tools, and what ``blkid -p`` says of them.

Every filesystem (and LUKS, an LVM PV, swap) of `CONTENTS` is made by its own mkfs tool in a file
of its own, then laid out on a raw disk in every way of `LAYOUTS`: the whole disk (no table), an
MBR primary partition, a logical partition in an extended one, a GPT partition, and a GPT with a
hybrid MBR (``sgdisk -h``).  The disks are sparse: btrfs and xfs need 110 and 300 MiB at least,
but only what the tools write takes space.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.units import MiB

SBIN = "/usr/local/sbin:/usr/sbin:/sbin:" + os.environ.get("PATH", "")
SECTOR = 512
#: Where the partition starts on a partitioned disk; a logical one has its EBR 1 MiB before.
START = 2 * MiB


def tool(name: str) -> str:
    """The path of a system tool (sbin included); AssertionError if missing, for the caller's
    ``require`` to have checked first."""
    found = shutil.which(name, path=SBIN)
    assert found is not None, f"{name} is not installed"
    return found


def run(*argv: str, input_text: str | None = None, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        argv,
        input=input_text,
        capture_output=True,
        text=True,
        env={**os.environ, **env} if env else None,
    )
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _seed(root: Path) -> Path:
    seed = root / "seed"
    seed.mkdir(exist_ok=True)
    (seed / "hello.txt").write_text("hello from the corpus\n")
    return seed


def _iso(path: Path) -> None:
    path.unlink()
    run(tool("xorriso"), "-as", "mkisofs", "-quiet", "-o", str(path), str(_seed(path.parent)))


def _squashfs(path: Path) -> None:
    path.unlink()
    run(tool("mksquashfs"), str(_seed(path.parent)), str(path), "-quiet", "-noappend")


def _luks(path: Path) -> None:
    key = path.with_suffix(".key")
    key.write_text("corpus")
    # pbkdf2 with few iterations: no benchmark of the CPU, no memory-hard KDF to wait for; small
    # metadata and key slots instead of a 16 MiB header.
    run(
        tool("cryptsetup"), "luksFormat", "-q", "--type", "luks2", "--luks2-metadata-size",
        "16k", "--luks2-keyslots-size", "256k", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", str(key), str(path),
    )  # fmt: skip


def _lvm(path: Path) -> None:
    # pvcreate wants a block device: a loop device on the file, detached whatever happens.
    loop = subprocess.run(
        [tool("losetup"), "-f", "--show", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        run(tool("pvcreate"), "-q", "-y", loop, env={"LVM_SUPPRESS_FD_WARNINGS": "1"})
    finally:
        subprocess.run([tool("losetup"), "-d", loop], check=False)


@dataclass(frozen=True)
class Content:
    """What goes on a disk: ``blkid`` is the TYPE libblkid gives it."""

    name: str
    blkid: str
    size: int
    make: Callable[[Path], None]
    tools: tuple[str, ...]


CONTENTS = (
    Content(
        "fat12", "vfat", 8 * MiB, lambda p: run(tool("mkfs.fat"), "-F", "12", str(p)), ("mkfs.fat",)
    ),
    Content(
        "fat16",
        "vfat",
        32 * MiB,
        lambda p: run(tool("mkfs.fat"), "-F", "16", str(p)),
        ("mkfs.fat",),
    ),
    Content(
        "fat32",
        "vfat",
        64 * MiB,
        lambda p: run(tool("mkfs.fat"), "-F", "32", str(p)),
        ("mkfs.fat",),
    ),
    Content(
        "ntfs",
        "ntfs",
        16 * MiB,
        lambda p: run(tool("mkntfs"), "-q", "-F", "-f", str(p)),
        ("mkntfs",),
    ),
    Content("exfat", "exfat", 16 * MiB, lambda p: run(tool("mkfs.exfat"), str(p)), ("mkfs.exfat",)),
    Content(
        "ext2",
        "ext2",
        16 * MiB,
        lambda p: run(tool("mkfs.ext2"), "-q", "-F", str(p)),
        ("mkfs.ext2",),
    ),
    Content(
        "ext3",
        "ext3",
        16 * MiB,
        lambda p: run(tool("mkfs.ext3"), "-q", "-F", str(p)),
        ("mkfs.ext3",),
    ),
    Content(
        "ext4",
        "ext4",
        16 * MiB,
        lambda p: run(tool("mkfs.ext4"), "-q", "-F", str(p)),
        ("mkfs.ext4",),
    ),
    Content(
        "btrfs",
        "btrfs",
        120 * MiB,
        lambda p: run(tool("mkfs.btrfs"), "-q", "-f", str(p)),
        ("mkfs.btrfs",),
    ),
    Content(
        "xfs", "xfs", 300 * MiB, lambda p: run(tool("mkfs.xfs"), "-q", "-f", str(p)), ("mkfs.xfs",)
    ),
    Content("iso9660", "iso9660", 0, _iso, ("xorriso",)),
    Content("squashfs", "squashfs", 0, _squashfs, ("mksquashfs",)),
    Content("swap", "swap", 8 * MiB, lambda p: run(tool("mkswap"), "-q", str(p)), ("mkswap",)),
    Content("luks", "crypto_LUKS", 4 * MiB, _luks, ("cryptsetup",)),
    Content("lvm-pv", "LVM2_member", 8 * MiB, _lvm, ("pvcreate", "losetup")),
)

LAYOUTS = ("whole", "mbr", "logical", "gpt", "hybrid")
#: Every tool making the corpus needs, besides the contents' own.
LAYOUT_TOOLS = ("parted", "sgdisk", "blkid")


@dataclass(frozen=True)
class Entry:
    """One disk of the corpus: ``content`` laid out as ``layout`` in the raw file ``path``.

    ``partition`` is the number Linux gives the partition holding it (None: the whole disk),
    ``start`` and ``size`` where it lies.
    """

    content: Content
    layout: str
    path: Path
    partition: int | None
    start: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.content.name}/{self.layout}"


def _copy_into(source: Path, disk: Path, offset: int) -> None:
    """Copy ``source`` into ``disk`` at ``offset``, leaving holes where it has only zeros."""
    step = MiB
    with open(source, "rb") as src, open(disk, "r+b") as dst:
        position = 0
        while chunk := src.read(step):
            if chunk.count(0) != len(chunk):
                dst.seek(offset + position)
                dst.write(chunk)
            position += len(chunk)


def _round_up(n: int) -> int:
    return -(-n // MiB) * MiB


def build(root: Path, content: Content) -> list[Entry]:
    """The content made once, then laid out in every `LAYOUTS` way, under ``root``."""
    made = root / f"{content.name}.fs"
    _sparse(made, content.size or MiB)
    content.make(made)
    # The whole disk is a copy too: mkfs.xfs allocates its log (zeros) in the file it makes.
    whole = root / f"{content.name}.whole.raw"
    _sparse(whole, made.stat().st_size)
    _copy_into(made, whole, 0)
    size = _round_up(made.stat().st_size)
    entries = [Entry(content, "whole", whole, None, 0, made.stat().st_size)]
    first, count = START // SECTOR, size // SECTOR
    for layout in LAYOUTS[1:]:
        disk = root / f"{content.name}.{layout}.raw"
        _sparse(disk, START + size + 2 * MiB)  # room for GPT's backup at the end
        end = f"{first + count - 1}s"
        if layout == "mbr":
            _parted(disk, "msdos", "mkpart", "primary", f"{first}s", end)
            number = 1
        elif layout == "logical":
            # The extended partition starts 1 MiB before the logical one: its EBR goes there.
            _parted(
                disk, "msdos", "mkpart", "extended", f"{first - 2048}s", f"{first + count + 2047}s",
                "mkpart", "logical", f"{first}s", end,
            )  # fmt: skip
            number = 5
        else:
            _parted(disk, "gpt", "mkpart", content.name, f"{first}s", end)
            if layout == "hybrid":
                run(tool("sgdisk"), "-h", "1", str(disk))
            number = 1
        _copy_into(made, disk, START)
        entries.append(Entry(content, layout, disk, number, START, count * SECTOR))
    made.unlink()
    return entries


def _parted(disk: Path, label: str, *commands: str) -> None:
    # parted rather than sfdisk: sfdisk syncs the file, which costs a quarter of a second here.
    run(tool("parted"), "-s", str(disk), "mklabel", label, *commands)


def build_all(root: Path, contents: Sequence[Content] = CONTENTS) -> dict[str, Entry]:
    """Every entry of the corpus, by name ("fat16/whole"), built under ``root``.

    Built side by side: most of the time goes in waiting for tools (sgdisk alone syncs and then
    sleeps for a second, for a kernel that would re-read a device's table).
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(contents)) as pool:
        built = list(pool.map(lambda content: build(root, content), contents))
    return {entry.name: entry for entries in built for entry in entries}


def blkid(path: Path, start: int | None = None, size: int | None = None) -> dict[str, str]:
    """``blkid -p -o export`` of the file (or of ``size`` bytes at ``start``): its NAME=value
    pairs, {} when it finds nothing."""
    argv = [tool("blkid"), "-p", "-o", "export"]
    if start is not None and size is not None:
        argv += ["-O", str(start), "-S", str(size)]
    done = subprocess.run([*argv, str(path)], capture_output=True, text=True)
    # 2: nothing found; anything else but 0 (8: ambivalent) is a corpus we did not mean to make.
    assert done.returncode in (0, 2), f"{argv}: exit {done.returncode}: {done.stderr}"
    pairs = (line.partition("=") for line in done.stdout.splitlines())
    return {name: value for name, _, value in pairs if name and name != "DEVNAME"}
