"""scripts/test-requirements lists every external command the code runs, and only those.

scripts/setup installs the Debian package of each command listed there. This test reads the tests,
the package, the benchmarks and the shell scripts that run tools (scripts/demo, scripts/bench),
collects the commands they run -- ``shutil.which("X")``, ``require(..., "X")``, ``tool("X")``,
argv literals such as ``subprocess.run(["X", ...])`` or ``run("X", ...)``, and commands in the shell
scripts -- and fails when one is missing from the list, or when the list names a command that
nothing runs any more: the two cannot drift apart silently.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "scripts" / "test-requirements"
PYTHON_SOURCES = ("tests", "fuse_disk_export", "benchmarks")
SHELL_SOURCES = ("scripts/demo", "scripts/bench")
# Commands that only the fetch scripts run (arrays and functions this reader does not follow),
# listed here with the script that must name them, so that they too stay in step.
FETCH_ONLY = {"patchelf": "scripts/qemu-fetch"}

COMMAND = re.compile(r"[A-Za-z0-9][\w.+-]*\Z")
DEBIAN_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+\Z")
SYSTEM_BIN_DIRS = {"/bin", "/sbin", "/usr/bin", "/usr/sbin"}

# Calls whose first argument is an argv: a list literal (possibly ``[*name, ...]``), or the command
# itself followed by its arguments (``run("truncate", "-s", "64M", path)``).
ARGV_CALLS = {"run", "Popen", "check_output", "check_call", "call", "first_line"}
ARGV_CALLS |= {"create_subprocess_exec"}
# Calls whose first argument names a command.
NAME_CALLS = {"which", "tool", "_tool"}
# ``module.run(...)`` counts only for these modules (``fde.run("-dp", ...)`` is not a command).
MODULES = {"subprocess", "shutil", "asyncio"}

Found = dict[str, list[str]]  # command -> ["path:line", ...]


def read_requirements(text: str) -> dict[str, str]:
    """``command package`` pairs; ``#`` starts a comment; ValueError on a malformed line."""
    pairs: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"line {number}: want 'command package', got {raw!r}")
        command, package = fields
        if not COMMAND.match(command) or not (package == "-" or DEBIAN_PACKAGE.match(package)):
            raise ValueError(f"line {number}: not a command and a Debian package: {raw!r}")
        if command in pairs:
            raise ValueError(f"line {number}: {command} is listed twice")
        pairs[command] = package
    return pairs


def _command(value: str) -> str | None:
    """The command a string names: ``/usr/bin/x`` counts as ``x``; other paths, options don't."""
    if value.startswith("/") and value.rsplit("/", 1)[0] in SYSTEM_BIN_DIRS:
        value = value.rsplit("/", 1)[1]
    return value if COMMAND.match(value) else None


def _str_seq(node: ast.AST) -> list[str] | None:
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)) and node.elts:
        values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
        if len(values) == len(node.elts) and all(isinstance(v, str) for v in values):
            return [str(v) for v in values]
    return None


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return func.attr if func.value.id in MODULES else None
    return None


def python_commands(source: str) -> dict[str, list[int]]:
    """Commands a Python source runs or looks for, with the lines where it does."""
    tree = ast.parse(source)
    # Names bound to literals: ``NEEDED = ("a", "b")``, ``create = ["qemu-img", "create", ...]``.
    literals: dict[str, ast.expr] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and isinstance(value, (ast.List, ast.Tuple, ast.Set)):
            literals[target.id] = value
    # Loop variables over string literals: ``for tool in ("parted", "mkfs.ext4"): ...``.
    loops: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name):
            it = node.iter
            if isinstance(it, ast.Name) and it.id in literals:
                it = literals[it.id]
            loops.setdefault(node.target.id, []).extend(_str_seq(it) or [])

    def named(node: ast.expr) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Name):
            return loops.get(node.id, [])
        return []

    def argv_head(node: ast.expr) -> list[str]:
        if isinstance(node, ast.Name) and node.id in literals:
            node = literals[node.id]
        if not isinstance(node, (ast.List, ast.Tuple)) or not node.elts:
            return []
        first = node.elts[0]
        if isinstance(first, ast.Starred):
            return argv_head(first.value)
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return [first.value]
        return []

    found: dict[str, list[int]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = _call_name(node.func)
        values: list[str] = []
        if name in NAME_CALLS:
            values = named(node.args[0])
        elif name == "require" and len(node.args) >= 2:
            values = [v for v in named(node.args[1]) if "/" not in v]
        elif name == "Driver" and len(node.args) >= 2:
            # fuse_disk_export.mountfs.drivers: Driver(fs, program, package, ...) runs ``program``.
            values = named(node.args[1])
        elif name in ARGV_CALLS:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                values = [first.value]
            else:
                values = argv_head(first.value if isinstance(first, ast.Starred) else first)
        for word in values:
            command = _command(word)
            if command is not None:
                found.setdefault(command, []).append(node.lineno)
    return found


# shlex joins adjacent operator characters (`()`, `);`): every such word is a control operator
# except these redirections.
SHELL_REDIRECTIONS = {">", ">>", "<", "<<", "<<<", ">&", "<&", "&>", "&>>", "<>", ">|"}
SHELL_OPERATOR = re.compile(r"[();<>|&]+\Z")
# Words after which the next word is a command again.
SHELL_PREFIX = {"if", "then", "else", "elif", "do", "while", "until", "!", "{", "time", "exec"}
SHELL_PREFIX |= {"command", "nohup"}
SHELL_BUILTINS = {
    "[", "[[", "]]", "]", "}", ".", ":", "break", "case", "cd", "continue", "declare", "done",
    "echo", "esac", "eval", "exit", "export", "false", "fi", "for", "function", "in", "kill",
    "local", "mapfile", "printf", "pwd", "read", "readarray", "return", "select", "set", "shift",
    "source", "test", "trap", "true", "type", "ulimit", "umask", "unset", "wait",
}  # fmt: skip
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*(\[[^]]*\])?\+?=")


def shell_commands(source: str) -> dict[str, list[int]]:
    """Commands a bash script runs, with their lines.

    A small reader, enough for this project's scripts: it splits each logical line into words with
    shlex (quotes, ``|``, ``;``, ``&&``, ``$(``), and takes the word at each command position.
    Heredocs and case patterns are not understood; words holding a ``/`` or a ``$`` are paths
    and expansions, not commands.
    """
    functions = set(re.findall(r"^\s*(?:function\s+)?([\w.-]+)\s*\(\)", source, re.M))
    source = re.sub(r"(\$\{?)#", r"\1N", source)  # $# and ${#x} are not comments
    found: dict[str, list[int]] = {}
    lines = source.splitlines()
    i = 0
    while i < len(lines):
        start, chunk = i, lines[i]
        while True:
            if chunk.endswith("\\") and i + 1 < len(lines):  # a line continuation
                i += 1
                chunk = chunk[:-1] + " " + lines[i]
                continue
            lexer = shlex.shlex(chunk, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            try:
                words = list(lexer)
                break
            except ValueError:  # a quote spans lines
                i += 1
                if i >= len(lines):
                    raise
                chunk += "\n" + lines[i]
        i += 1
        at_command = True
        for word in words:
            if SHELL_OPERATOR.match(word) and word not in SHELL_REDIRECTIONS:
                at_command = True
            elif word == "$" or word.endswith("=$"):
                at_command = True  # `$(cmd` and `x=$(cmd`: the `(` comes next
            elif not at_command:
                continue
            elif ASSIGNMENT.match(word) or word in SHELL_PREFIX:
                pass  # still at a command position
            else:
                at_command = False
                if word in SHELL_BUILTINS or word in functions or "/" in word or "$" in word:
                    continue
                if COMMAND.match(word):
                    found.setdefault(word, []).append(start + 1)
    return found


def _merge(found: Found, path: Path, commands: dict[str, list[int]]) -> None:
    where = path.relative_to(ROOT)
    for command, lines in commands.items():
        found.setdefault(command, []).extend(f"{where}:{n}" for n in lines)


def scan(python: Iterable[Path], shell: Iterable[Path]) -> Found:
    found: Found = {}
    for path in python:
        _merge(found, path, python_commands(path.read_text()))
    for path in shell:
        _merge(found, path, shell_commands(path.read_text()))
    return found


def scan_project() -> Found:
    python = sorted(p for d in PYTHON_SOURCES for p in (ROOT / d).rglob("*.py"))
    found = scan(python, [ROOT / s for s in SHELL_SOURCES])
    for command, script in FETCH_ONLY.items():
        if re.search(rf"^\s*{re.escape(command)}\s", (ROOT / script).read_text(), re.M):
            found.setdefault(command, []).append(script)
    return found


def test_requirements_file_is_well_formed() -> None:
    listed = read_requirements(REQUIREMENTS.read_text())
    assert "qemu-storage-daemon" in listed and "fusermount3" in listed


def test_every_command_run_is_listed() -> None:
    listed = read_requirements(REQUIREMENTS.read_text())
    missing = {c: w for c, w in scan_project().items() if c not in listed}
    assert not missing, (
        "add to scripts/test-requirements (command and Debian package):\n"
        + "\n".join(
            f"  {command}  (run at {', '.join(where[:3])})"
            for command, where in sorted(missing.items())
        )
    )


def test_every_listed_command_is_run() -> None:
    found = scan_project()
    stale = sorted(c for c in read_requirements(REQUIREMENTS.read_text()) if c not in found)
    assert not stale, f"nothing runs these any more; remove from scripts/test-requirements: {stale}"


def test_python_patterns_are_found() -> None:
    source = """
import shutil, subprocess
from tests.helpers.host import require
NEEDED = ("n1", "n2")
def f(tool, run, fde, path):
    shutil.which("w1")
    require(shutil.which("w2") is not None, "w2")
    require(ok, "root, to mount a tmpfs")
    require(ok, "/dev/fuse")
    for t in ("l1", "l2"):
        require(shutil.which(t) is not None, t)
    missing = [t for t in NEEDED if shutil.which(t) is None]
    tool("t1")
    subprocess.run(["s1", "-x"], check=True)
    subprocess.Popen(["/usr/sbin/s2"])
    subprocess.check_output(("s3", path))
    run("r1", "-s", "64M")
    create = ["r2", "create"]
    run([*create, path])
    run(tool("t2"), "--json")
    fde.run("-dp", "not-a-command")
    subprocess.run([path, "--version"])
    subprocess.run(["/opt/x/bin/not-either"])
"""
    found = python_commands(source)
    assert set(found) == {
        "w1", "w2", "l1", "l2", "n1", "n2", "t1", "t2", "s1", "s2", "s3", "r1", "r2",
    }  # fmt: skip
    assert found["s1"] == [14]


def test_shell_patterns_are_found() -> None:
    source = """#!/usr/bin/env bash
set -euo pipefail
cleanup() { rm -f "$x"; }   # a comment: notacommand
work=$(mktemp -d "${TMPDIR:-/tmp}/x.XXXXXX")
echo "\\$ file demo.qcow2"; file -b "$img" | sed 's/^/  /'
{ parted -s "$img" print 2>&1 || true; } | grep -v udevadm
debugfs -w "$raw" >/dev/null 2>&1 \\
  || mkfs.ext4 -q "$raw"
if loop=$(losetup -f --show "$img" 2>/dev/null); then e2fsck -fn "$loop"; fi
for _ in $(seq 100); do [[ -f $p ]] || break; sleep 0.1; done
"${fde[@]}" -dp "$pid_file" "$img"
echo "two
lines: notacommand either"; cleanup
exec .venv/bin/python -m benchmarks "$@"
n=${#words[@]}
"""
    found = shell_commands(source)
    assert set(found) == {
        "rm", "mktemp", "file", "sed", "parted", "grep", "debugfs", "mkfs.ext4", "losetup",
        "e2fsck", "seq", "sleep",
    }  # fmt: skip
    assert found["mkfs.ext4"] == [7] and found["sleep"] == [10]


def test_requirements_reader_rejects_malformed_lines() -> None:
    assert read_requirements("# c\n\nfio fio  # why\nfusermount -\n") == {
        "fio": "fio",
        "fusermount": "-",
    }
    for bad in ("fio\n", "fio fio extra\n", "fio fio\nfio fio\n", "fio Not_A_Package\n"):
        try:
            read_requirements(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")
