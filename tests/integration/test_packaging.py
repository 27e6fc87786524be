"""What ``python -m build`` makes installs as a tool: both console scripts run from a fresh venv
holding only the wheel and its declared dependencies, and the man page and the completions land
under the venv's share/.  Offline: the dependencies come from the wheels scripts/setup keeps in
.venv/wheelhouse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuse_disk_export import __version__

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = ROOT / ".venv" / "wheelhouse"
SHARE = (
    "share/man/man1/fuse-disk-export.1",
    "share/bash-completion/completions/fuse-disk-export",
    "share/zsh/site-functions/_fuse-disk-export",
    "share/fish/vendor_completions.d/fuse-disk-export.fish",
)
RUNTIME = {"psutil", "python-daemon", "rich"}

pytestmark = pytest.mark.slow


def _run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"{argv}: {out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the built wheel installed: its folder."""
    if not any(WHEELHOUSE.glob("*.whl")):
        pytest.fail(f"{WHEELHOUSE}: no wheels; run ./scripts/setup")
    tmp = tmp_path_factory.mktemp("packaging")
    dist = tmp / "dist"
    # --no-isolation: the build backend from our venv, not downloaded into a fresh one.
    _run(sys.executable, "-m", "build", "--no-isolation", "-o", dist, ROOT, cwd=tmp)
    wheels = list(dist.glob("fuse_disk_export-*.whl"))
    assert len(wheels) == 1 and list(dist.glob("fuse_disk_export-*.tar.gz")), list(dist.iterdir())
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run(*pip, "--no-index", "--find-links", WHEELHOUSE, wheels[0], cwd=tmp)
    return venv


def _clean_env(venv: Path) -> dict[str, str]:
    # Nothing of the checkout: no PYTHONPATH, and run from elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def test_both_console_scripts_run_from_the_wheel(installed: Path) -> None:
    env = _clean_env(installed)
    bin_dir = installed / "bin"
    assert _run(bin_dir / "fuse-disk-export", "--version", cwd=installed, env=env).strip() == (
        f"fuse-disk-export {__version__}"
    )
    usage = _run(bin_dir / "qemu-fuse-disk-export.py", "--help", cwd=installed, env=env)
    assert "--doctor" in usage
    where = _run(
        bin_dir / "python", "-c", "import fuse_disk_export; print(fuse_disk_export.__file__)",
        cwd=installed, env=env,
    )  # fmt: skip
    assert where.startswith(str(installed)), where
    # The lazily imported parts, and the runtime dependencies, are there too.
    report = subprocess.run(
        [bin_dir / "fuse-disk-export", "--doctor", "--json"],
        cwd=installed, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert report.returncode in (0, 1), report.stderr
    assert {c["name"] for c in json.loads(report.stdout)["checks"]} >= {"/dev/fuse", "registry"}


def test_runtime_dependencies_are_declared_and_none_of_the_tests(installed: Path) -> None:
    code = (
        "import importlib.metadata as m, json\n"
        "print(json.dumps([m.requires('fuse-disk-export'),"
        " sorted(d.metadata['Name'].lower() for d in m.distributions())]))"
    )
    requires, present = json.loads(
        _run(installed / "bin" / "python", "-c", code, cwd=installed, env=_clean_env(installed))
    )
    always = {r.split(">")[0].split("=")[0].split(";")[0].strip() for r in requires if ";" not in r}
    assert always == RUNTIME
    for test_only in ("pytest", "hypothesis", "mypy", "shtab", "argparse-manpage", "build"):
        assert test_only not in present, test_only


def test_man_page_and_completions_are_installed(installed: Path) -> None:
    for path in SHARE:
        assert (installed / path).read_bytes() == (ROOT / path).read_bytes(), path
