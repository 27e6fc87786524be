"""Fixtures of the integration tests that start processes by hand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.runner import Processes, Runner


@pytest.fixture
def hand(fde: Runner, tmp_path: Path) -> Iterator[Processes]:
    """Processes started by hand; depends on ``fde`` so that it is torn down first, and fde's own
    teardown then checks that nothing is left mounted."""
    procs = Processes(tmp_path)
    yield procs
    procs.cleanup()
