"""Create or refresh the project's virtual environment in .venv (standard library only)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = ".aiservice-installed"


def parse_extras(extras: str | Iterable[str]) -> frozenset[str]:
    """``"test,bench"`` or ``["test"]`` -> the set of extras; ``""`` -> none."""
    names = extras.split(",") if isinstance(extras, str) else extras
    return frozenset(name.strip() for name in names if name.strip())


def read_stamp(stamp: Path) -> tuple[str, frozenset[str]] | None:
    """The pyproject.toml digest and the extras of the last install, or None (none yet, or unreadable)."""
    try:
        data = json.loads(stamp.read_text())
        return str(data["pyproject"]), parse_extras(data["extras"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def extras_to_install(stamp: Path, pyproject: bytes, wanted: frozenset[str]) -> frozenset[str] | None:
    """None when the venv already has what is wanted: pyproject.toml unchanged since the last install
    and every wanted extra installed then (a venv installed with the test extras serves `dev` too).
    Otherwise the extras to install: the wanted ones plus those installed before, so that switching
    between scripts/test.py and scripts/dev.py never installs twice."""
    found = read_stamp(stamp)
    if found is None:
        return wanted
    digest, installed = found
    if digest == hashlib.sha256(pyproject).hexdigest() and wanted <= installed:
        return None
    return wanted | installed


def pip_install(venv_dir: Path, extras: frozenset[str]) -> None:
    bin_dir = venv_dir / ("Scripts" if os.name == "nt" else "bin")
    if not (bin_dir / "python").exists():
        print(f"creating virtual environment in {venv_dir}", flush=True)
        venv.EnvBuilder(with_pip=True).create(venv_dir)
    target = f".[{','.join(sorted(extras))}]" if extras else "."
    print(f"installing aiservice{target[1:]} into {venv_dir} (first run takes a minute)", flush=True)
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True, cwd=ROOT)
    subprocess.run([*pip, "-e", target], check=True, cwd=ROOT)


def ensure_venv(
    extras: str = "",
    *,
    root: Path = ROOT,
    venv_dir: Path = VENV,
    install: Callable[[Path, frozenset[str]], None] = pip_install,
) -> Path:
    """Install the project (editable, with ``extras``) unless the venv already has it: see
    ``extras_to_install``. Returns the venv's bin directory."""
    if sys.version_info < (3, 11):  # noqa: UP036 - this script runs before anything checks the version
        sys.exit(f"aiservice needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    bin_dir = venv_dir / ("Scripts" if os.name == "nt" else "bin")
    stamp = venv_dir / STAMP
    pyproject = (root / "pyproject.toml").read_bytes()
    todo = extras_to_install(stamp, pyproject, parse_extras(extras))
    if todo is None and (bin_dir / "python").exists():
        return bin_dir
    todo = parse_extras(extras) if todo is None else todo
    install(venv_dir, todo)
    stamp.write_text(json.dumps({"pyproject": hashlib.sha256(pyproject).hexdigest(), "extras": sorted(todo)}))
    return bin_dir


# Real components the tests drive, from Debian's packages: the package, a command that shows it is
# installed, where that command lives when PATH lacks it, and the tests that need it.
DEBIAN_PACKAGES = {
    "pgbouncer": ("pgbouncer", "/usr/sbin/pgbouncer", "tests/test_pgbouncer.py"),
    "chromium": ("chromium", "/usr/bin/chromium", "tests/test_console.py (the console in a browser)"),
    "curl": ("curl", "/usr/bin/curl", "tests/test_readme.py (the README's curl examples)"),
    "jq": ("jq", "/usr/bin/jq", "tests/test_readme.py (the README's curl examples)"),
}


def missing_debian_packages() -> list[str]:
    return [
        pkg for pkg, (cmd, path, _) in DEBIAN_PACKAGES.items() if not (shutil.which(cmd) or os.access(path, os.X_OK))
    ]


def ensure_debian_packages() -> None:
    """Install the missing ones with apt-get where this user may (root, or sudo without a password),
    saying first what it installs, how, and which tests need each."""
    missing = missing_debian_packages()
    if not missing:
        return
    needed_by = "".join(f"\n  {pkg}: {DEBIAN_PACKAGES[pkg][2]}" for pkg in missing)
    if os.geteuid() == 0:
        prefix: list[str] = []
        who = "as root"
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
        who = "with sudo"
    else:
        print(
            f"note: missing Debian packages; these tests fail without them:{needed_by}\n"
            f"install them with: apt-get install {' '.join(missing)}",
            flush=True,
        )
        return
    if not shutil.which("apt-get"):
        print(f"note: missing, and no apt-get here to install them:{needed_by}", flush=True)
        return
    print(
        f"installing Debian packages {who} (apt-get update; apt-get install -y {' '.join(missing)}),"
        f" for the tests that drive them:{needed_by}",
        flush=True,
    )
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        if subprocess.run([*prefix, *command], stdout=subprocess.DEVNULL, env=env).returncode != 0:
            print(f"note: could not install {', '.join(missing)} with apt-get: their tests fail", flush=True)
            return
