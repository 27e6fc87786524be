"""Benchmarks for fuse-disk-export: start-up and stop, memory, and I/O through the export,
against qemu-storage-daemon written by hand, qemu-nbd + nbdfuse and the raw file.

Run with ``scripts/bench`` (see docs/performance.md for the method and the results).
"""
