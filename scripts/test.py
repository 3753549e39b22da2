"""One command to set up and run the test suite: python3 scripts/test.py [pytest arguments]

PostgreSQL: an embedded server by default; set AISERVICE_TEST_DATABASE_URL to use an existing one,
or AISERVICE_TEST_POSTGRES=testcontainers on a machine with Docker. The pgbouncer and console tests
drive Debian's pgbouncer and chromium packages, the README test curl and jq: installed here with
apt-get when missing (as root or with passwordless sudo), after saying which and for which tests."""

from __future__ import annotations

import os
import sys

from _bootstrap import BIN, ROOT, ensure_debian_packages, ensure_venv

if __name__ == "__main__":
    ensure_venv("test")
    ensure_debian_packages()
    os.chdir(ROOT)
    command = [str(BIN / "python"), "-m", "pytest", *sys.argv[1:]]
    os.execv(command[0], command)
