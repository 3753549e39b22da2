"""Create or refresh the project's virtual environment in .venv (standard library only)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def ensure_venv(extras: str = "") -> Path:
    """Install the project (editable, with ``extras``) unless pyproject.toml is unchanged since last time."""
    if sys.version_info < (3, 11):  # noqa: UP036 - this script runs before anything checks the version
        sys.exit(f"aiservice needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    target = f".[{extras}]" if extras else "."
    stamp = VENV / ".aiservice-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + target.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return BIN
    if not (BIN / "python").exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print(f"installing aiservice{target[1:]} into {VENV} (first run takes a minute)", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True, cwd=ROOT)
    subprocess.run([*pip, "-e", target], check=True, cwd=ROOT)
    stamp.write_text(digest)
    return BIN


# Real components the tests drive, from Debian's packages: pgbouncer (tests/test_pgbouncer.py),
# chromium (tests/test_console.py), curl and jq (the README's walk-through, tests/test_readme.py).
DEBIAN_PACKAGES = {
    "pgbouncer": ("pgbouncer", "/usr/sbin/pgbouncer"),
    "chromium": ("chromium", "/usr/bin/chromium"),
    "curl": ("curl", "/usr/bin/curl"),
    "jq": ("jq", "/usr/bin/jq"),
}


def ensure_debian_packages() -> None:
    """Install the missing ones with apt-get where this user may (root, or sudo without a password)."""
    import shutil

    missing = [
        pkg for pkg, (cmd, path) in DEBIAN_PACKAGES.items() if not (shutil.which(cmd) or os.access(path, os.X_OK))
    ]
    if not missing:
        return
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        print(
            f"note: missing {', '.join(missing)}: their tests fail; install with: apt-get install {' '.join(missing)}"
        )
        return
    if not shutil.which("apt-get"):
        print(f"note: missing {', '.join(missing)} and no apt-get here: install them with the system's packages")
        return
    print(f"installing {', '.join(missing)} from the Debian packages (first run only)", flush=True)
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"stdout": subprocess.DEVNULL, "env": env}
    if (
        subprocess.run([*prefix, "apt-get", "update", "-qq"], **quiet).returncode != 0
        or subprocess.run(  # type: ignore[call-overload]
            [*prefix, "apt-get", "install", "-y", "-qq", *missing],
            **quiet,  # type: ignore[call-overload]
        ).returncode
        != 0
    ):
        print(f"note: could not install {', '.join(missing)} with apt-get: their tests fail")
