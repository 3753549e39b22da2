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
