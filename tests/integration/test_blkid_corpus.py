"""Our probing against libblkid's, on a corpus made by the filesystems' own tools.

For every entry of `tests.helpers.corpus` (15 contents x 5 layouts), what fuse-disk-export reads
-- the partition table (`partitions.read_table`) and what each partition, or the whole disk, holds
(`table_reader.probe_disk`, the same code ``--mount-fs`` and ``--list-partitions`` run on the
private export) -- must equal what ``blkid -p`` says: PTTYPE and TYPE of the whole disk, TYPE of
the partition.  blkid is the reference, not fdisk: sfdisk takes a FAT or NTFS boot sector for an
empty "dos" table.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_disk_export.table_reader import probe_disk
from tests.helpers import corpus
from tests.helpers.host import require

SCHEMES = {"none": None, "mbr": "dos", "gpt": "gpt"}


@pytest.fixture(scope="session")
def entries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, corpus.Entry]]:
    tools = {t for c in corpus.CONTENTS for t in c.tools} | set(corpus.LAYOUT_TOOLS)
    for name in sorted(tools):
        require(corpus.shutil.which(name, path=corpus.SBIN) is not None, name)
    yield corpus.build_all(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("layout", corpus.LAYOUTS)
@pytest.mark.parametrize("content", [c.name for c in corpus.CONTENTS])
def test_agrees_with_blkid(entries: dict[str, corpus.Entry], content: str, layout: str) -> None:
    entry = entries[f"{content}/{layout}"]
    whole = corpus.blkid(entry.path)
    part = corpus.blkid(entry.path, entry.start, entry.size) if entry.partition else {}
    disk = probe_disk(str(entry.path))
    inside = disk.filesystems.get(entry.partition) if entry.partition else None
    theirs = (whole.get("PTTYPE"), whole.get("TYPE"), part.get("TYPE"))
    ours = (SCHEMES[disk.table.scheme], disk.whole, inside)
    assert ours == theirs, f"{entry.name}: blkid -p says {theirs}, we say {ours}"
    # The corpus is what we meant to make: blkid names the content where we put it.
    assert entry.content.blkid in (theirs[1] if layout == "whole" else theirs[2],)
    if entry.partition:
        numbers = [(p.number, p.start, p.size) for p in disk.table.partitions]
        assert numbers == [(entry.partition, entry.start, entry.size)]


def test_the_corpus_is_small(entries: dict[str, corpus.Entry]) -> None:
    # Sparse: btrfs and xfs need 110 and 300 MiB, of which the tools write little.
    used = sum(Path(e.path).stat().st_blocks * 512 for e in entries.values())
    assert used < 256 * corpus.MiB, used
