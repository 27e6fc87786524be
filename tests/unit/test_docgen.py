"""The man page and the completions in share/ are what the parser makes now, and the man page
documents every option and renders without a warning."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from docgen import ROOT, full_parser, outputs
from docgen.manpage import manpage


def test_share_is_made_from_the_parser_as_it_is() -> None:
    stale = [
        str(path.relative_to(ROOT))
        for path, make in outputs().items()
        if not path.exists() or path.read_text() != make()
    ]
    assert not stale, f"out of date, run: .venv/bin/python -m docgen  ({', '.join(stale)})"


def test_man_page_documents_every_option_and_section() -> None:
    page = manpage()
    synopsis = page.split(".SH SYNOPSIS\n", 1)[1].split(".SH", 1)[0]
    for action in full_parser()._actions:
        for name in action.option_strings:
            roff = name.replace("-", "\\-")
            if name in ("-h", "--help"):  # argparse-manpage leaves help out of OPTIONS
                assert roff in synopsis.split(), name
            else:
                assert f"\\fB{roff}\\fR" in page, name
    for section in ("SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXAMPLES", "EXIT STATUS", "SIGNALS"):
        assert f"\n.SH {section}\n" in page, section
    for also in ("FILES", "ENVIRONMENT", "SEE ALSO"):
        assert f"\n.SH {also}\n" in page, also
    assert "qemu\\-storage\\-daemon (1)" in page and "fusermount3 (1)" in page
    assert "128+N" in page and "fuse\\-disk\\-export/" in page


def test_man_page_renders_without_warnings() -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is missing")
    out = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z"],
        input=manpage(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stderr == ""
