"""Two `aiservice serve` replicas and two `aiservice worker` processes on one PostgreSQL, through
pgbouncer in transaction pooling mode.

The module starts its own pgbouncer (the Debian package's binary) on a free loopback port with a
generated ini, in front of the test PostgreSQL, and an empty database. Both replicas start at once
with MIGRATE_ON_START=true through the pooler; the workers talk to the pooler too and LISTEN on
the direct DSN. Their poll interval is a minute, so only a notification explains a fast pickup.

pgbouncer missing: the tests fail under CI (.ci/run installs it) and are skipped elsewhere, saying
how to install it."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from conftest import SERVICE_VARIABLES, admin, with_database
from processes import Command, free_port
from stubs import OpenAIStub, slow

from aiservice.db.migrate import load_functions, load_migrations, migrate
from aiservice.db.pool import connect

pytestmark = pytest.mark.asyncio(loop_scope="module")

POLL_INTERVAL = 60.0  # seconds: longer than this module runs, so workers never poll after starting
LLM_MODEL = "qwen2.5-14b"
INSTALL = "install it with `apt-get install pgbouncer` (.ci/run does)"


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer") if os.access(p, os.X_OK)), None
    )
    if found is None:
        message = f"pgbouncer not found on PATH or in /usr/sbin: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@dataclass
class Pgbouncer:
    proc: subprocess.Popen[bytes]
    port: int
    user: str
    directory: Path

    def dsn(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def output(self) -> str:
        logs = [self.directory / "pgbouncer.out", self.directory / "pgbouncer.log"]
        return "".join(log.read_text(errors="replace") for log in logs if log.exists())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def start_pgbouncer(binary: str, server_dsn: str, directory: Path) -> Pgbouncer:
    """pgbouncer in transaction mode on 127.0.0.1, every database forwarded to the server of ``server_dsn``."""
    parts = urlsplit(server_dsn)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    host = query.get("host") or parts.hostname or "127.0.0.1"  # a directory for a Unix socket
    port = query.get("port") or parts.port or 5432
    user = parts.username or "postgres"
    server = f"host={host} port={port} user={user}" + (f" password={parts.password}" if parts.password else "")
    listen = free_port()
    lines = [
        "[databases]",
        f"* = {server}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {listen}",
        "unix_socket_dir =",
        "auth_type = any",
        "pool_mode = transaction",
        "default_pool_size = 8",
        "max_client_conn = 200",
        f"logfile = {directory / 'pgbouncer.log'}",
    ]
    if os.geteuid() == 0:
        # pgbouncer refuses to run as root: run it as the owner of PostgreSQL's socket, or nobody.
        owner = os.stat(host).st_uid if host.startswith("/") else 0
        account = pwd.getpwuid(owner) if owner else pwd.getpwnam("nobody")
        lines.append(f"user = {account.pw_name}")
        os.chown(directory, account.pw_uid, account.pw_gid)
    ini = directory / "pgbouncer.ini"
    ini.write_text("\n".join(lines) + "\n")
    with (directory / "pgbouncer.out").open("wb") as out:
        proc = subprocess.Popen([binary, str(ini)], stdout=out, stderr=subprocess.STDOUT)
    bouncer = Pgbouncer(proc, listen, user, directory)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"pgbouncer exited with {proc.returncode}:\n{bouncer.output()}")
        try:
            socket.create_connection(("127.0.0.1", listen), timeout=1).close()
            return bouncer
        except OSError:
            if time.monotonic() > deadline:
                bouncer.stop()
                raise AssertionError(f"pgbouncer not listening after 10s:\n{bouncer.output()}") from None
            time.sleep(0.05)


@dataclass
class Deployment:
    direct_dsn: str  # PostgreSQL itself: for LISTEN, and for the test's own reads
    pooled_dsn: str  # through pgbouncer: everything else
    pgbouncer: Pgbouncer
    stub: OpenAIStub
    apis: list[str]  # base URLs of the two replicas
    replicas: list[Command]
    workers: list[Command]
    worker_ids: list[str]

    def logs(self) -> str:
        return "\n".join(p.output() for p in [*self.replicas, *self.workers])


def environment(**values: str) -> dict[str, str]:
    outer = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    return outer | {"DATABASE_PGBOUNCER": "true", "MAINTENANCE_INTERVAL": "1s", "LOG_LEVEL": "INFO"} | values


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, processes: list[Command], within: float = 30.0
) -> None:
    """Until ``await check()`` is true; fails at once, with its output, when a process died."""
    deadline = time.monotonic() + within
    while not await check():
        for p in processes:
            if p.proc.poll() is not None:
                raise AssertionError(f"a process exited with {p.proc.returncode}:\n{p.output()}")
        if time.monotonic() > deadline:
            logs = "\n".join(p.output()[-3000:] for p in processes)
            raise AssertionError(f"timed out after {within}s waiting for {what}:\n{logs}")
        await asyncio.sleep(0.05)


async def answers(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as http, http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deployment(pg_server: str) -> AsyncIterator[Deployment]:
    binary = pgbouncer_binary()
    name = f"aiservice_pgb_{uuid.uuid4().hex[:12]}"
    direct = with_database(pg_server, name)
    tmp = Path(tempfile.mkdtemp(prefix="aiservice-pgbouncer-"))
    stub = OpenAIStub()
    bouncer: Pgbouncer | None = None
    processes: list[Command] = []
    try:
        bouncer = start_pgbouncer(binary, pg_server, tmp)
        await admin(pg_server, f'CREATE DATABASE "{name}"')
        await stub.start()
        pooled = bouncer.dsn(name)
        ports = [free_port(), free_port()]
        # Both replicas at once, each migrating the empty database through the pooler.
        for n, port in enumerate(ports):
            env = environment(
                DATABASE_URL=pooled,
                DATABASE_LISTEN_URL=direct,  # waiters on results LISTEN too
                MIGRATE_ON_START="true",
                HTTP_HOST="127.0.0.1",
                HTTP_PORT=str(port),
            )
            log = tmp / f"serve-{n}.log"
            processes.append(Command(["serve"], env, log))
        replicas = list(processes)
        apis = [f"http://127.0.0.1:{port}" for port in ports]
        for api in apis:
            await wait_until(partial(answers, f"{api}/readyz"), f"{api}/readyz", replicas)

        worker_ids = [f"pgb-worker-{n}-{uuid.uuid4().hex[:4]}" for n in range(2)]
        for wid in worker_ids:
            env = environment(
                DATABASE_URL=pooled,
                DATABASE_LISTEN_URL=direct,
                MIGRATE_ON_START="false",
                LLM_BASE_URL=stub.base_url,
                LLM_MODEL=LLM_MODEL,
                WORKER_ID=wid,
                WORKER_HTTP_HOST="127.0.0.1",
                WORKER_HTTP_PORT="0",
                WORKER_POLL_INTERVAL=f"{POLL_INTERVAL:g}s",
            )
            log = tmp / f"{wid}.log"
            processes.append(Command(["worker"], env, log))
        workers = processes[2:]

        async def listening() -> bool:
            conn = await asyncpg.connect(direct)
            try:
                count = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                    " AND application_name LIKE 'aiservice-listener %'",
                    name,
                )
            finally:
                await conn.close()
            return bool(count == len(worker_ids))

        await wait_until(listening, "both workers to LISTEN on the direct DSN", workers)
        await asyncio.sleep(0.5)  # the first claim each worker makes once connected
        yield Deployment(direct, pooled, bouncer, stub, apis, replicas, workers, worker_ids)
    finally:
        for p in processes:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(timeout=5)
        if bouncer is not None:
            bouncer.stop()
        await stub.close()
        await admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_errors_in_output(deployment: Deployment) -> Iterator[None]:
    """Nothing through the pooler may trip over session state: no prepared-statement errors anywhere."""
    yield
    markers = ("prepared statement", "maintenance pass failed", "claim failed", "Traceback")
    found = [line[:600] for line in deployment.logs().splitlines() if any(m in line for m in markers)]
    assert not found, "\n".join(found[:5])


def job_body(owner_service: str, n: int, **overrides: Any) -> dict[str, Any]:
    return {
        "owner_service": owner_service,
        "owner_ref": f"{owner_service}/{n}",
        "task_type": "llm_chat",
        "model_profile": LLM_MODEL,
        "input": {"user": f"{owner_service} {n}"},
    } | overrides


async def call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as response:
        return response.status, await response.json()


async def test_migrators_through_the_pooler_take_turns(deployment: Deployment, pg_server: str) -> None:
    """Four migrators at once on an empty database, as `aiservice migrate` connects: one applies
    everything, the others wait for it and find nothing to do."""
    name = f"aiservice_pgb_m_{uuid.uuid4().hex[:12]}"
    await admin(pg_server, f'CREATE DATABASE "{name}"')
    try:
        conns = [await connect(deployment.pgbouncer.dsn(name)) for _ in range(4)]
        try:
            results = await asyncio.gather(*(migrate(c) for c in conns))
            ledger = await conns[0].fetchval("SELECT count(*) FROM aiservice.migrations")
        finally:
            for c in conns:
                await c.close()
    finally:
        await admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    everything = [m.name for m in [*load_migrations(), *load_functions()]]
    assert sorted(results, key=len) == [[], [], [], everything]
    assert ledger == len(everything)


async def test_replicas_starting_together_migrate_once(deployment: Deployment) -> None:
    conn = await asyncpg.connect(deployment.direct_dsn)
    try:
        ledger = [r[0] for r in await conn.fetch("SELECT name FROM aiservice.migrations ORDER BY name")]
    finally:
        await conn.close()
    assert ledger == sorted(m.name for m in [*load_migrations(), *load_functions()])
    # The lock held one replica back until the other had committed everything; it found nothing to do.
    said = [next(line for line in p.output().splitlines() if "migrations applied" in line) for p in deployment.replicas]
    assert sorted("none (up to date)" in line for line in said) == [False, True], said
    assert all("0001_init.sql" in line for line in said if "up to date" not in line), said


async def test_jobs_created_through_both_replicas_are_completed_by_both_workers(deployment: Deployment) -> None:
    service = f"pgb-life-{uuid.uuid4().hex[:6]}"
    bodies = [job_body(service, n) for n in range(40)]
    for body in bodies:  # long enough that one worker's four slots cannot take them all
        deployment.stub.on(body["input"]["user"], slow(0.2))
    first, second = deployment.apis
    async with aiohttp.ClientSession() as http:
        status, batch = await call(http, "POST", f"{first}/api/v1/jobs/batch", {"jobs": bodies[:20]})
        assert status == 201, batch
        singles = await asyncio.gather(*(call(http, "POST", f"{second}/api/v1/jobs", b) for b in bodies[20:]))
        assert {s for s, _ in singles} == {201}, singles
        url = f"{second}/api/v1/jobs?owner_service={service}&limit=500"

        async def all_completed() -> bool:
            status, page = await call(http, "GET", url)
            return status == 200 and {j["status"] for j in page["jobs"]} == {"completed"}

        await wait_until(all_completed, "every job to complete", deployment.workers)
        _, page = await call(http, "GET", url.replace(second, first))
    jobs = page["jobs"]
    assert len(jobs) == 40
    assert {j["owner_ref"]: j["result"]["content"] for j in jobs} == {
        b["owner_ref"]: f"echo: {b['input']['user']}" for b in bodies
    }
    assert {j["attempts"] for j in jobs} == {1}
    assert {j["worker_id"] for j in jobs} == set(deployment.worker_ids)


async def test_workers_pick_up_on_notification_well_before_polling(deployment: Deployment) -> None:
    service = f"pgb-wake-{uuid.uuid4().hex[:6]}"
    pickups: list[float] = []
    async with aiohttp.ClientSession() as http:
        for n in range(8):
            await asyncio.sleep(0.3)  # idle workers: nothing in flight, nothing due, no poll for a minute
            api = deployment.apis[n % 2]
            status, job = await call(http, "POST", f"{api}/api/v1/jobs", job_body(service, n))
            assert status == 201, job
            done: dict[str, Any] = {}

            async def completed(api: str = api, job_id: int = job["id"]) -> bool:
                nonlocal done
                _, done = await call(http, "GET", f"{api}/api/v1/jobs/{job_id}")
                return bool(done["status"] == "completed")

            await wait_until(completed, f"job {job['id']} to complete", deployment.workers, within=POLL_INTERVAL / 4)
            started = datetime.fromisoformat(done["started_at"])
            pickups.append((started - datetime.fromisoformat(done["created_at"])).total_seconds())
    figures = (
        f"pickup after create: median {statistics.median(pickups) * 1000:.0f} ms, max {max(pickups) * 1000:.0f} ms"
    )
    print(figures)
    assert max(pickups) < 5.0, figures


async def test_stale_lease_is_expired_by_maintenance_and_refused_through_the_pooler(deployment: Deployment) -> None:
    """An external worker over HTTP: its lease runs out, maintain() in some replica or worker
    hands the job back, and the token of the first claim no longer completes it."""
    first, second = deployment.apis
    task = f"pgb_external_{uuid.uuid4().hex[:6]}"  # no built-in worker claims it
    body = job_body("pgb-fence", 0, task_type=task, model_profile="external-model")
    claim = {"worker_id": "ext-1", "limit": 1, "task_types": [task], "lease_timeout": 1}
    async with aiohttp.ClientSession() as http:
        status, job = await call(http, "POST", f"{first}/api/v1/jobs", body)
        assert status == 201, job
        status, claimed = await call(http, "POST", f"{second}/api/v1/jobs/claim", claim)
        assert status == 200 and [j["id"] for j in claimed["jobs"]] == [job["id"]], claimed
        stale = claimed["jobs"][0]["lease_token"]

        async def handed_back() -> bool:
            nonlocal job
            _, job = await call(http, "GET", f"{first}/api/v1/jobs/{job['id']}")
            return bool(job["status"] == "pending")

        await wait_until(handed_back, "maintenance to expire the lease", deployment.replicas, within=15)
        assert (job["attempts"], job["error_category"], job["lease_token"]) == (1, "lease_expired", None)
        assert "expired 1 leases nobody renewed" in deployment.logs()

        status, again = await call(http, "POST", f"{first}/api/v1/jobs/claim", claim | {"lease_timeout": 60})
        assert status == 200 and [j["id"] for j in again["jobs"]] == [job["id"]], again
        fresh = again["jobs"][0]["lease_token"]
        assert fresh != stale
        complete = f"{second}/api/v1/jobs/{job['id']}/complete"
        late = {"worker_id": "ext-1", "lease_token": stale, "result": {"content": "late"}}
        status, refused = await call(http, "POST", complete, late)
        assert (status, refused["error"]["code"]) == (409, "lease_lost"), refused
        heartbeat = {"worker_id": "ext-1", "lease_token": stale, "lease_timeout": 60}
        status, refused = await call(http, "POST", f"{first}/api/v1/jobs/{job['id']}/heartbeat", heartbeat)
        assert (status, refused["error"]["code"]) == (409, "lease_lost"), refused
        status, done = await call(http, "POST", complete, late | {"lease_token": fresh, "result": {"content": "ok"}})
        assert (status, done["status"], done["result"]) == (200, "completed", {"content": "ok"}), done
