"""--help fits on one screen and names every option; the completions, generated from the parser
into share/ (docgen), know every option in bash, zsh and fish."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from fuse_disk_export.cli import build_parser
from tests.helpers.completion import (
    COMPLETION,
    SCRIPTS,
    check_syntax,
    complete,
    complete_fish,
)

# Named in the usage line or in another option's help.
HIDDEN = {"-h", "--help", "-V", "--version", "-n", "--nocache", "--json"}


def options() -> list[argparse.Action]:
    return [a for a in build_parser()._actions if a.option_strings]


def test_help_fits_on_one_screen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    text = build_parser().format_help()
    lines = text.splitlines()
    assert len(lines) <= 40, text
    assert max(map(len, lines)) <= 100, text
    for action in options():
        for name in action.option_strings:
            assert name in text or name in HIDDEN, name
    assert "--json" in lines[1] and "examples:" in text


def test_completion_offers_every_option() -> None:
    offered = set(complete("-"))
    wanted = {name for action in options() for name in action.option_strings}
    assert wanted <= offered, f"missing from the completion: {sorted(wanted - offered)}"
    assert offered <= wanted, f"no longer options: {sorted(offered - wanted)}"
    assert complete("--back") == ["--backing"]


def test_bash_completion_is_registered_for_both_names() -> None:
    """Sourced as bash-completion loads it: the function is bound to the command and to the
    alias (a missing newline once glued the two ``complete`` lines into one)."""
    if shutil.which("bash") is None:
        pytest.skip("bash is missing")
    script = f"source {COMPLETION}\ncomplete -p fuse-disk-export qemu-fuse-disk-export.py\n"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        f"complete -o bashdefault -F _shtab_fuse_disk_export {name}"
        for name in ("fuse-disk-export", "qemu-fuse-disk-export.py")
    ], out


@pytest.mark.parametrize(
    "action", [a for a in options() if a.choices], ids=lambda a: a.option_strings[-1]
)
def test_completion_offers_the_choices(action: argparse.Action) -> None:
    assert action.choices is not None
    assert complete(action.option_strings[-1], "") == sorted(map(str, action.choices))


def test_completion_offers_images_for_positional_arguments(tmp_path: Path) -> None:
    for name in ("a.qcow2", "b.VMDK", "c.img", "notes.txt", "my disk.vdi"):
        (tmp_path / name).touch()
    (tmp_path / "sub").mkdir()
    assert complete("", cwd=tmp_path) == ["a.qcow2", "b.VMDK", "c.img", "my disk.vdi", "sub"]
    assert complete("-r", "my", cwd=tmp_path) == ["my disk.vdi"]
    # When nothing looks like an image, every file.
    assert complete("no", cwd=tmp_path) == ["notes.txt"]
    assert complete("--format", "qc") == ["qcow", "qcow2"]
    assert complete("--mountpoint-dir", "", cwd=tmp_path) == ["sub"]


@pytest.mark.parametrize("shell", sorted(SCRIPTS))
def test_completion_scripts_parse_and_name_every_option(shell: str) -> None:
    check_syntax(shell)
    script = SCRIPTS[shell]
    text = script.read_text()
    for action in options():
        for name in action.option_strings:
            # zsh groups short and long: {-d,--daemonize}; fish: -s d -l daemonize.
            word = name.lstrip("-")
            assert name in text or (shell == "fish" and f" {word} " in text + " "), name


def test_fish_completes_options_choices_and_images(tmp_path: Path) -> None:
    longs = {n for a in options() for n in a.option_strings if n.startswith("--")}
    assert set(complete_fish("--")) == longs
    assert complete_fish("--back") == ["--backing"]
    assert complete_fish("--cache", "") == sorted(
        build_parser()._option_string_actions["--cache"].choices or ()
    )
    assert complete_fish("--format", "qc") == ["qcow", "qcow2"]
    for name in ("a.qcow2", "b.VMDK", "notes.txt"):
        (tmp_path / name).touch()
    (tmp_path / "sub").mkdir()
    assert complete_fish("-r", "", cwd=tmp_path) == ["a.qcow2", "b.VMDK", "sub/"]
    assert complete_fish("no", cwd=tmp_path) == ["notes.txt"]


@pytest.mark.parametrize(
    ("argv", "cache", "discard"),
    [
        (["-n", "a.qcow2"], "none", "unmap"),
        (["--nocache", "a.qcow2"], "none", "unmap"),
        (["--discard", "off", "a.qcow2"], "writeback", "ignore"),
        (["--discard=on", "a.qcow2"], "writeback", "unmap"),
        (["--discard", "ignore", "a.qcow2"], "writeback", "ignore"),
    ],
)
def test_qemu_nbd_spellings_are_understood(argv: list[str], cache: str, discard: str) -> None:
    """qemu-nbd's -n and --discard off|on mean what they mean there."""
    from fuse_disk_export.cli import options_from

    options = options_from(build_parser().parse_args(argv))
    assert (options.cache, options.discard) == (cache, discard)


def test_an_unknown_discard_mode_is_still_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--discard", "yes", "a.qcow2"])
    assert "invalid choice: 'yes'" in capsys.readouterr().err
