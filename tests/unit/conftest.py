"""Fixtures for unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A private runtime registry (state.registry_dir()) for the test's process and children."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return runtime / "fuse-disk-export"
