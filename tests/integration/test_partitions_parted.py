"""read_table against tables written by GNU parted (and read back by parted and sfdisk).

Hand-built tables in the unit tests can share a misunderstanding with the parser; tables from the
tools people actually use cannot. Skipped when parted is missing, except in CI (CI=true), where a
missing tool must not turn the check into a silent pass.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fuse_disk_export.partitions import PartitionTable, read_table
from tests.helpers.disks import SBIN_PATH, parted_disk, run
from tests.helpers.units import MiB


def sfdisk_json(image: Path) -> list[dict[str, str]] | None:
    """sfdisk's view of the partitions, a second opinion; None if sfdisk is missing (not in CI)."""
    if shutil.which("sfdisk", path=SBIN_PATH) is None and os.environ.get("CI") != "true":
        return None
    out = run("sfdisk", "--json", str(image))
    partitions: list[dict[str, str]] = json.loads(out)["partitiontable"]["partitions"]
    return partitions


def read_image(image: Path) -> PartitionTable:
    with image.open("rb") as f:

        def read(offset: int, length: int) -> bytes:
            return os.pread(f.fileno(), length, offset)

        return read_table(read, image.stat().st_size)


def parted_print(image: Path) -> dict[int, tuple[int, int, str]]:
    """{number: (start, size, name)} from parted's machine-readable listing, in bytes."""
    out = run("parted", "-m", "-s", str(image), "unit", "B", "print")
    lines = [line.rstrip(";") for line in out.splitlines()]
    assert lines[0] == "BYT"
    rows = {}
    for line in lines[2:]:
        # number:start:end:size:filesystem:name:flags (names here hold no ':')
        number, start, _end, size, _fs, name, _flags = line.split(":")
        rows[int(number)] = (int(start.rstrip("B")), int(size.rstrip("B")), name)
    return rows


def test_msdos_primary_extended_and_logicals(tmp_path: Path) -> None:
    image = parted_disk(
        tmp_path / "disk.img",
        64 * MiB,
        "mklabel msdos",
        "mkpart primary ext4 1MiB 10MiB",
        "mkpart extended 10MiB 60MiB",
        "mkpart logical ext4 11MiB 20MiB",
        "mkpart logical linux-swap 21MiB 30MiB",
        "mkpart primary 60MiB 63MiB",
    )
    table = read_image(image)
    assert table.scheme == "mbr"
    listed = parted_print(image)
    # parted lists the extended container (2) too; it is not a partition one can export.
    assert set(listed) == {1, 2, 3, 5, 6}
    del listed[2]
    assert {p.number: (p.start, p.size, p.name) for p in table.partitions} == {
        number: (start, size, "") for number, (start, size, _) in listed.items()
    }
    assert table.get(5).start == 11 * MiB
    assert table.get(6).type == "0x82"

    sfdisk = sfdisk_json(image)
    if sfdisk is None:
        return
    types = {int(p["node"].removeprefix(str(image))): p["type"] for p in sfdisk}
    assert types[2] in ("5", "f", "85")
    assert {p.number: p.type for p in table.partitions} == {
        number: f"0x{int(t, 16):02x}" for number, t in types.items() if number != 2
    }


def test_gpt_named_partitions(tmp_path: Path) -> None:
    image = parted_disk(
        tmp_path / "disk.img",
        64 * MiB,
        "mklabel gpt",
        "mkpart alpha fat32 1MiB 10MiB",
        "mkpart \"'beta two'\" 10MiB 20MiB",  # parted wants the inner quotes for a space
        "mkpart gamma ext4 20MiB 63MiB",
        "set 1 esp on",
    )
    table = read_image(image)
    assert table.scheme == "gpt"
    listed = parted_print(image)
    assert {p.number: (p.start, p.size, p.name) for p in table.partitions} == listed
    assert [p.name for p in table.partitions] == ["alpha", "beta two", "gamma"]

    assert table.partitions[0].type == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"  # EFI system
    sfdisk = sfdisk_json(image)
    if sfdisk is not None:
        assert [p.type for p in table.partitions] == [p["type"].lower() for p in sfdisk]


def test_gpt_primary_destroyed_uses_backup(tmp_path: Path) -> None:
    image = parted_disk(tmp_path / "disk.img", 32 * MiB, "mklabel gpt", "mkpart only 1MiB 31MiB")
    good = read_image(image)
    with image.open("r+b") as f:
        f.seek(512)
        f.write(bytes(512))  # wipe the primary header
    assert read_image(image) == good
    assert good.get(1).name == "only"
