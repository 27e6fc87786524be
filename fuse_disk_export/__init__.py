"""fuse-disk-export: any QEMU disk image, seen as a raw image on its own path."""

__version__ = "0.1.0"
