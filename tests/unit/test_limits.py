"""The process limits a large graph meets, checked before anything starts."""

from __future__ import annotations

import os
import resource

import pytest

from fuse_disk_export.engine import limits
from fuse_disk_export.errors import RequirementError, UsageError


def test_command_line_within_the_kernels_limits() -> None:
    limits.check_command_line(["qsd", "--blockdev", "x" * 1000], {})
    with pytest.raises(UsageError, match="several invocations"):
        limits.check_command_line(["qsd", "x" * (limits.MAX_ARG_STRLEN + 1)], {})
    many = ["--export", "y" * 100_000] * (os.sysconf("SC_ARG_MAX") // 100_000 + 1)
    with pytest.raises(UsageError, match="more than the kernel takes"):
        limits.check_command_line(many, {})


def test_fuse_exports_one_daemon_holds() -> None:
    limits.check_fuse_exports(limits.MAX_FUSE_EXPORTS)
    with pytest.raises(UsageError, match="thread keys"):
        limits.check_fuse_exports(limits.MAX_FUSE_EXPORTS + 1)


def test_descriptor_limit_raised_for_the_child_only() -> None:
    original = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, hard = original
    # A soft limit below the hard one, so that there is room to raise it (here both can be
    # equal, and then nothing would be raised and nothing tested).
    lowered = 512 if hard == resource.RLIM_INFINITY else min(512, hard - 100)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        with limits.nofile_for_child(lowered + 100):
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= lowered + 100
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (lowered, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, original)


def test_too_low_a_hard_limit_is_refused_with_the_remedy() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    refused = pytest.raises(RequirementError, match=r"hard limit is \d+.*ulimit -Hn")
    with refused, limits.nofile_for_child(hard + 1):
        pass
