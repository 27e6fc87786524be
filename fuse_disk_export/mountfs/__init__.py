"""``--mount-fs DIR``: the filesystem inside the exported image, mounted at DIR by a userspace FUSE
driver, so that a hostile filesystem is parsed by an unprivileged process, not by the kernel.

- `plan`: which partition and which filesystem, chosen when the request is built; the partition
  is exported on a private file (`FsPlan`).
- `drivers`: the driver of each filesystem family, the names ``--fs-type`` takes, and the family
  of each filesystem `filesystems.identify` recognises.
- `mount`: the driver, run as our child once the export is live, and unmounted before the export
  is reverted (`lifecycle`).

A plain export loads none of this: each module is imported where it is used, and this file
imports nothing.
"""
