"""The files made from the command line's parser: the man page and the shell completions.

They are kept in ``share/`` (so that a checkout, an sdist and a wheel need no generator) and
shipped in the wheel as data files; ``python -m docgen`` writes them again after the parser
changed, and tests/unit/test_docgen.py fails while they are out of date.  Not part of the
installed package: argparse-manpage and shtab are needed only here (the test extra).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from fuse_disk_export.cli import HIDDEN_HELP, build_parser

ROOT = Path(__file__).resolve().parents[1]
SHARE = ROOT / "share"


def full_parser() -> argparse.ArgumentParser:
    """The parser with every option described: --help leaves some out to fit on one screen,
    the man page and the completions name them all."""
    parser = build_parser()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            # By the long option's name: -n/--nocache shares its dest with --cache.
            longs = [o for o in action.option_strings if o.startswith("--")]
            key = longs[0][2:].replace("-", "_") if longs else action.dest
            action.help = HIDDEN_HELP[key]
    return parser


def outputs() -> dict[Path, Callable[[], str]]:
    """Each generated file (under ``share/``) and what makes its text."""
    from docgen import completions, manpage

    return {
        SHARE / "man" / "man1" / "fuse-disk-export.1": manpage.manpage,
        **{SHARE / path: maker for path, maker in completions.FILES.items()},
    }
