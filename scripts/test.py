"""One command to set up and run the test suite: python3 scripts/test.py [pytest arguments]

PostgreSQL: an embedded server by default; set AISERVICE_TEST_DATABASE_URL to use an existing one,
or AISERVICE_TEST_POSTGRES=testcontainers on a machine with Docker. tests/test_pgbouncer.py needs the
pgbouncer binary (Debian's package): without it those tests are skipped, and fail under CI."""

from __future__ import annotations

import os
import shutil
import sys

from _bootstrap import BIN, ROOT, ensure_venv

if __name__ == "__main__":
    ensure_venv("test")
    os.chdir(ROOT)
    if not (shutil.which("pgbouncer") or os.access("/usr/sbin/pgbouncer", os.X_OK)):
        outcome = "fail (CI is set)" if os.environ.get("CI") else "are skipped"
        print(f"note: no pgbouncer binary: tests/test_pgbouncer.py {outcome}; apt-get install pgbouncer", flush=True)
    command = [str(BIN / "python"), "-m", "pytest", *sys.argv[1:]]
    os.execv(command[0], command)
