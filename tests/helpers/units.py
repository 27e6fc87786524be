"""Sizes in bytes."""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
