"""bash, zsh and fish completions, made by shtab from the parser.

shtab completes the options and their choices; what an option's value is (an image, a folder, a
format, a live export) is said here, per option, in each shell's words.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import shtab

from docgen import full_parser
from fuse_disk_export.images import PROBED_FORMATS
from fuse_disk_export.mountfs.drivers import FS_TYPES

PROG = "fuse-disk-export"
#: The same tool under the name of the QEMU blog post's script.
ALIAS = "qemu-fuse-disk-export.py"

#: File names disk images usually have: offered first, every file when none match.
IMAGE_SUFFIXES = [
    "qcow2",
    "qcow",
    "img",
    "raw",
    "vmdk",
    "vdi",
    "vhdx",
    "vhd",
    "vpc",
    "qed",
    "hdd",
    "parallels",
    "dmg",
    "bochs",
    "cloop",
    "luks",
    "iso",
    "bin",
]

_BASH_IMAGES = r"""
# Disk images by their usual names, and directories to walk into; every file if none match.
_fuse_disk_export_file_images() {
  local f lower any=0
  local -a found=()
  while IFS= read -r f; do
    lower=${f,,}
    if [[ -d $f ]]; then
      found+=("$f")
    elif [[ $lower == *.@(SUFFIXES) ]]; then
      found+=("$f")
      any=1
    fi
  done < <(compgen -f -- "$1")
  if ((any)); then
    printf '%s\n' "${found[@]}"
  else
    compgen -f -- "$1"
  fi
}
""".replace("SUFFIXES", "|".join(IMAGE_SUFFIXES))

_FISH_IMAGES = r"""
# Disk images by their usual names, and directories to walk into; every file if none match.
function _fuse_disk_export_images
  set -l all (__fish_complete_path (commandline -ct))
  set -l images
  for candidate in $all
    set -l name (string split -m1 \t -- $candidate)[1]
    if string match -qir -- '(\.(SUFFIXES)|/)$' $name
      set -a images $candidate
    end
  end
  if string match -qvr -- '/$' $images
    printf '%s\n' $images
  else
    printf '%s\n' $all
  end
end
""".replace("SUFFIXES", "|".join(IMAGE_SUFFIXES))

# What --stop takes: the mount points and pids of live exports, as --list --json tells them.
_LIVE = (
    r"""--list --json 2>/dev/null | sed -n -e 's/^ *"mountpoint": "\(.*\)",\{0,1\}$/\1/p' """
    r"""-e 's/^ *"pid": \([0-9]*\),\{0,1\}$/\1/p' | sort -u"""
)

_BASH_LIVE = f"""
_fuse_disk_export_live() {{
  compgen -W "$("${{COMP_WORDS[0]}}" {_LIVE})" -- "$1"
}}
"""

_ZSH_LIVE = f"""
_fuse_disk_export_live() {{
  local -a live
  live=(${{(f)"$($words[1] {_LIVE})"}})
  compadd -a live
}}
"""

_FISH_LIVE = f"""
function _fuse_disk_export_live
  set -l command (commandline -opc)[1]
  $command {_LIVE}
end
"""


def _words(words: list[str]) -> dict[str, str]:
    """A fixed list of words, in each shell."""
    joined = " ".join(words)
    return {"bash": f"_fuse_disk_export_words_{words[0]}", "zsh": f"({joined})", "fish": joined}


def _bash_words(name: str, words: list[str]) -> str:
    return f'\n_fuse_disk_export_words_{name}() {{\n  compgen -W "{" ".join(words)}" -- "$1"\n}}\n'


FORMATS = sorted({"raw", *PROBED_FORMATS})
FS_TYPE_NAMES = sorted(FS_TYPES)

IMAGES: dict[str, object] = {
    "bash": "_fuse_disk_export_file_images",
    "zsh": "_files -g '*.(" + "|".join(IMAGE_SUFFIXES) + ")(-.)'",
    "fish": "(_fuse_disk_export_images)",
    "preamble": {"bash": _BASH_IMAGES, "fish": _FISH_IMAGES},
}
LIVE: dict[str, object] = {
    "bash": "_fuse_disk_export_live",
    "zsh": "_fuse_disk_export_live",
    "fish": "(_fuse_disk_export_live)",
    "preamble": {"bash": _BASH_LIVE, "zsh": _ZSH_LIVE, "fish": _FISH_LIVE},
}
FORMAT: dict[str, object] = {
    **_words(FORMATS),
    "preamble": {"bash": _bash_words(FORMATS[0], FORMATS)},
}
FS_TYPE: dict[str, object] = {
    **_words(FS_TYPE_NAMES),
    "preamble": {"bash": _bash_words(FS_TYPE_NAMES[0], FS_TYPE_NAMES)},
}

#: What each option's value (and the positional IMAGE) completes to, by ``dest``.
VALUES: dict[str, object] = {
    "images": IMAGES,
    "pid_file": shtab.FILE,
    "format": FORMAT,
    "mountpoint": shtab.FILE,
    "mountpoint_dir": shtab.DIRECTORY,
    "mount_fs": shtab.DIRECTORY,
    "fs_type": FS_TYPE,
    "nbd_socket": shtab.FILE,
    "overlay": shtab.FILE,
    "passphrase_file": shtab.FILE,
    "log_file": shtab.FILE,
    "stop": LIVE,
}


def _parser() -> argparse.ArgumentParser:
    parser = full_parser()
    for action in parser._actions:
        if action.dest in VALUES:
            action.complete = VALUES[action.dest]  # type: ignore[attr-defined]
    return parser


def bash() -> str:
    text = shtab.complete(_parser(), shell="bash")
    # bash-completion loads a file by the command's name; the alias shares this one once loaded.
    # shtab's text does not end its last line.
    return text.rstrip("\n") + f"\ncomplete -o bashdefault -F _shtab_fuse_disk_export {ALIAS}\n"


def zsh() -> str:
    text = shtab.complete(_parser(), shell="zsh")
    return text.replace(f"#compdef {PROG}\n", f"#compdef {PROG} {ALIAS}\n", 1)


def fish() -> str:
    return shtab.complete(_parser(), shell="fish")


#: Where each lands under ``share/``: the folders bash-completion, zsh and fish read from a
#: prefix (/usr/local, ~/.local, a venv).
FILES: dict[Path, Callable[[], str]] = {
    Path("bash-completion/completions") / PROG: bash,
    Path("zsh/site-functions") / f"_{PROG}": zsh,
    Path("fish/vendor_completions.d") / f"{PROG}.fish": fish,
}
