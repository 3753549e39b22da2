"""One command to set up and run aiservice on an embedded PostgreSQL: python3 scripts/dev.py"""

from __future__ import annotations

import os
import sys

from _bootstrap import BIN, ROOT, ensure_venv

if __name__ == "__main__":
    ensure_venv()
    os.chdir(ROOT)
    command = [str(BIN / "aiservice"), "dev", *sys.argv[1:]]
    os.execv(command[0], command)
