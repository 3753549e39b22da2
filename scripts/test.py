"""One command to set up and run the test suite: python3 scripts/test.py [pytest arguments]

PostgreSQL: an embedded server by default; set AISERVICE_TEST_DATABASE_URL to use an existing one,
or AISERVICE_TEST_POSTGRES=testcontainers on a machine with Docker."""

from __future__ import annotations

import os
import sys

from _bootstrap import BIN, ROOT, ensure_venv

if __name__ == "__main__":
    ensure_venv("test")
    os.chdir(ROOT)
    command = [str(BIN / "python"), "-m", "pytest", *sys.argv[1:]]
    os.execv(command[0], command)
