"""fuse-disk-export: any QEMU disk image, seen as a raw image on its own path.

The Python API is `exported` and `exported_many` (see `fuse_disk_export.api`); they are loaded on
first use, so that the command line's entry point, which imports this package first, stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fuse_disk_export.errors import FdeError

__version__ = "0.1.0"
__all__ = ["FdeError", "__version__", "exported", "exported_many"]

if TYPE_CHECKING:
    from fuse_disk_export.api import exported, exported_many


def __getattr__(name: str) -> object:
    if name in ("exported", "exported_many"):
        from fuse_disk_export import api

        return getattr(api, name)
    raise AttributeError(f"module 'fuse_disk_export' has no attribute {name!r}")
