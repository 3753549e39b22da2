"""Result delivery under faults: PostgreSQL restarted under waiting requests, an API process
SIGKILLed with a webhook in flight, and two API replicas sending from one outbox.

Waiters must answer once their job finished however the notification was lost; a webhook whose
sender died mid-request is sent again (same webhook-id) once its lease ran out; two replicas never
send one event twice in normal operation. Receivers verify every request with the standardwebhooks
package."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import job_spec
from processes import Command, OwnPostgres, free_port, own_postgres
from standardwebhooks.webhooks import Webhook as Verifier
from stubs import Receiver, finish, register, wait_for

from aiservice.api.app import create_app
from aiservice.api.handlers import WAITERS
from aiservice.db.pool import create_pool
from aiservice.db.store import JobStore
from aiservice.jobs import JobCreate
from aiservice.settings import Settings

__all__ = ["own_postgres"]

API = "/api/v1"
LEASE = timedelta(minutes=5)


async def in_process_api(settings: Settings) -> TestClient[Any, Any]:
    """The real app with its own pool, listener and webhook sender (not the tests' shared store)."""
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    return client


# (a) ------------------------------------------------------------------------------------------


async def test_waiters_survive_a_postgres_restart(own_postgres: OwnPostgres) -> None:
    """A GET ?wait= and a POST /jobs/wait held across a restart answer once their jobs finish.

    Job a finishes right after the restart, typically before the waiters' listener is back: the
    re-check, which goes on every second while the listener is down, finds it. The periodic
    re-check is then turned off (60 s), so job b, finished later, can only be answered in time
    through the re-opened LISTEN connection."""
    dsn = own_postgres.dsn
    settings = Settings(database_url=dsn, migrate_on_start=False, db_pool_max_size=4)
    api = await in_process_api(settings)
    waiters = api.server.app[WAITERS]
    requests: list[asyncio.Task[Any]] = []
    try:
        ids = {}
        for name in ("a", "b"):
            spec = job_spec(owner_service="restart", model_profile=f"wait-{name}")
            created = await api.post(f"{API}/jobs", json=spec)
            assert created.status == 201, await created.text()
            ids[name] = (await created.json())["id"]

        async def listening() -> bool:
            return waiters.connected

        await wait_for(listening, what="the waiters' listener")
        by_get = asyncio.create_task(api.get(f"{API}/jobs/{ids['a']}", params={"wait": "30"}))
        by_post = asyncio.create_task(api.post(f"{API}/jobs/wait", json={"ids": [ids["b"]], "timeout": 30}))
        requests += [by_get, by_post]

        async def both_waiting() -> bool:
            return waiters.waiting == 2

        await wait_for(both_waiting, what="both requests to wait")
        await asyncio.sleep(0.5)  # registered first, then each reads its jobs once: let that read end

        await asyncio.to_thread(own_postgres.stop)
        await wait_for(lambda: _is(not waiters.connected), what="the listener to notice the outage")
        await asyncio.sleep(1.5)  # a few failed re-checks and reconnects
        assert not by_get.done() and not by_post.done()
        await asyncio.to_thread(own_postgres.start)

        pool = await create_pool(dsn, max_size=2, wait=10)
        try:
            store = JobStore(pool)
            (job_a,) = await store.claim_jobs("w", 1, lease_timeout=LEASE, model_profiles=["wait-a"])
            await store.complete_job(job_a.id, "w", {"text": "after the restart"})
            a_finished = time.monotonic()
            listener_was_up = waiters.connected
            got_a = await asyncio.wait_for(by_get, 8)
            a_waited = time.monotonic() - a_finished
            body_a = await got_a.json()
            assert got_a.status == 200, body_a
            assert (body_a["id"], body_a["status"], body_a["result"]) == (
                ids["a"],
                "completed",
                {"text": "after the restart"},
            )
            assert a_waited < 7, a_waited  # a re-check (every second) once the pool reaches PostgreSQL again
            assert not by_post.done()

            await wait_for(listening, within=10, what="the listener to reconnect")
            waiters.recheck = 60.0  # from here on only a notification can wake the waiter in time
            await asyncio.sleep(1.2)  # the loop's current 1 s wait ends; the next one uses 60 s
            (job_b,) = await store.claim_jobs("w", 1, lease_timeout=LEASE, model_profiles=["wait-b"])
            await store.complete_job(job_b.id, "w", {"text": "notified"})
            b_finished = time.monotonic()
            got_b = await asyncio.wait_for(by_post, 5)
            b_waited = time.monotonic() - b_finished
            body_b = await got_b.json()
            assert got_b.status == 200, body_b
            assert [(j["id"], j["status"]) for j in body_b["jobs"]] == [(ids["b"], "completed")]
            assert b_waited < 0.9, b_waited  # faster than any re-check: the notification woke it
        finally:
            await pool.close()
        print(f"restart: a answered {a_waited:.2f}s after completion (listener up then: {listener_was_up}), "
              f"b {b_waited * 1000:.0f} ms")  # fmt: skip
    finally:
        for request in requests:
            request.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
        await api.close()


async def _is(value: bool) -> bool:
    return value


class HoldingProxy:
    """A TCP proxy to PostgreSQL that, when the server ends a connection, holds the client's side
    open for ``hold`` seconds: what the client read last (a FATAL) arrives well before the close."""

    def __init__(self, dsn: str, hold: float) -> None:
        self.upstream = dsn
        self.hold = hold
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        self._host = query.get("host", [parts.hostname or "localhost"])[0]
        self._port = parts.port or int(query.get("port", ["0"])[0])
        if self._host.startswith("/") and not self._port:  # the server's one socket in that directory
            (socket_file,) = (p for p in Path(self._host).iterdir() if re.fullmatch(r"\.s\.PGSQL\.\d+", p.name))
            self._port = int(socket_file.name.rsplit(".", 1)[1])
        self.server_closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._host.startswith("/"):
            return await asyncio.open_unix_connection(f"{self._host}/.s.PGSQL.{self._port}")
        return await asyncio.open_connection(self._host, self._port or 5432)

    @property
    def dsn(self) -> str:
        """The upstream DSN, through the proxy."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self.upstream)
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")])
        userinfo = parts.netloc.rpartition("@")[0]
        return urlunsplit((parts.scheme, f"{userinfo}@127.0.0.1:{port}", parts.path, query, ""))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await self._open_upstream()

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

        to_server = asyncio.create_task(pipe(client_reader, up_writer))
        try:
            with contextlib.suppress(ConnectionError):
                await pipe(up_reader, client_writer)
            if not to_server.done():  # the server, not the client, ended it
                self.server_closed.set()
                await asyncio.sleep(self.hold)
        finally:
            to_server.cancel()
            client_writer.close()
            up_writer.close()
            self._tasks.discard(task)


@pytest.fixture
async def holding_proxy(database_url: str) -> AsyncIterator[HoldingProxy]:
    proxy = HoldingProxy(database_url, hold=3.0)
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_a_connection_ended_by_postgres_under_the_api_answers_503_not_500(
    database_url: str, holding_proxy: HoldingProxy
) -> None:
    """PostgreSQL ends an idle pooled connection (a restart, pg_terminate_backend): its FATAL is read
    before the socket's close. A query started in between failed with asyncpg's InternalClientError
    ("cannot switch to state 12; another operation (2) is in progress"), which the API answered with
    500 internal error: a waiter whose first read met a PostgreSQL restart got it (test above, now
    and then). The proxy widens that moment to seconds."""
    settings = Settings(database_url=holding_proxy.dsn, migrate_on_start=False, db_pool_max_size=1)
    api = await in_process_api(settings)
    try:
        assert (await api.get(f"{API}/jobs")).status == 200
        conn = await asyncpg.connect(database_url)
        try:
            ended = await conn.fetchval(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                   WHERE datname = current_database() AND application_name = 'aiservice-api'"""
            )
        finally:
            await conn.close()
        assert ended == 1
        await asyncio.wait_for(holding_proxy.server_closed.wait(), 5)
        await asyncio.sleep(0.2)  # the FATAL is read; the close is still held back
        refused = await api.get(f"{API}/jobs")
        body = await refused.json()
        assert (refused.status, body["error"]["code"]) == (503, "database_unavailable"), body

        async def recovered() -> bool:
            return (await api.get(f"{API}/jobs")).status == 200

        await wait_for(recovered, within=10, what="the API to reconnect once the close arrived")
    finally:
        await api.close()


# (b) ------------------------------------------------------------------------------------------


class ApiProcess:
    """`python -m aiservice.cli serve` on a port of its own, its output going to a log file."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def ready(self, within: float = 30) -> None:
        async def answers() -> bool:
            assert self.proc.poll() is None, f"the API exited ({self.proc.returncode}):\n{self.output()}"
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as response,
                ):
                    return response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.1)
                return False

        await wait_for(answers, within=within, what="the API process to be ready")

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.proc.wait, 10)


class ApiProcesses:
    """Starts API processes; every one is killed and reaped at the end of the test."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[ApiProcess] = []

    def spawn(self, database_url: str, **env: str) -> ApiProcess:
        port = free_port()
        environment = dict(
            os.environ,
            DATABASE_URL=database_url,
            HTTP_HOST="127.0.0.1",
            HTTP_PORT=str(port),
            MIGRATE_ON_START="false",
            LOG_LEVEL="INFO",
            **env,
        )
        log = self.logs / f"api-{len(self.started) + 1}.log"
        api = ApiProcess(Command(["serve"], environment, log).proc, port, log)
        self.started.append(api)
        return api

    async def start(self, database_url: str, **env: str) -> ApiProcess:
        api = self.spawn(database_url, **env)
        await api.ready()
        return api

    def stop_all(self) -> None:
        for api in self.started:
            if api.proc.poll() is None:
                api.proc.kill()
            api.proc.wait(10)


@pytest.fixture
def api_processes(tmp_path: Path) -> Iterator[ApiProcesses]:
    processes = ApiProcesses(tmp_path)
    yield processes
    processes.stop_all()


class HoldingReceiver(Receiver):
    """Verifies like Receiver, but never answers the first ``hold`` requests (the sender stays in flight)."""

    def __init__(self, hold: int = 1) -> None:
        super().__init__()
        self.hold = hold
        self.held = asyncio.Event()
        self.abandoned = asyncio.Event()  # a held request's client went away
        self.arrived: list[float] = []

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        self.arrived.append(time.monotonic())
        if self.hold <= 0:
            return await super()._hook(request)
        self.hold -= 1
        body = await request.text()
        self.verified.append(Verifier(self.secret).verify(body, dict(request.headers.items())))
        self.ids.append(request.headers["webhook-id"])
        self.held.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.abandoned.set()
            raise
        raise AssertionError("unreachable")


@pytest.fixture
async def holding_receiver() -> AsyncIterator[HoldingReceiver]:
    server = HoldingReceiver()
    await server.start()
    yield server
    await server.close()


async def delivery_rows(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch("SELECT * FROM aiservice.webhook_deliveries ORDER BY id")
    finally:
        await conn.close()


async def test_a_webhook_in_flight_when_the_api_is_killed_is_sent_again(
    database_url: str, store: JobStore, holding_receiver: HoldingReceiver, api_processes: ApiProcesses
) -> None:
    receiver = holding_receiver
    # The lease of an attempt is twice the timeout: 4 s.
    first = await api_processes.start(database_url, WEBHOOK_TIMEOUT="2s")
    async with aiohttp.ClientSession(base_url=first.url) as session:
        await register(session, receiver, owner="killed", events=["job.finished"])
        created = await session.post(f"{API}/jobs", json=job_spec(owner_service="killed"))
        job_id = (await created.json())["id"]
    await finish(store, job_id, {"text": "once or more"})

    await asyncio.wait_for(receiver.held.wait(), 10)
    await first.kill()  # before its 2 s timeout: no outcome is recorded
    await asyncio.wait_for(receiver.abandoned.wait(), 5)
    (row,) = await delivery_rows(database_url)
    assert (row["status"], row["attempts"], row["last_status"], row["last_error"]) == ("pending", 1, None, None)

    await api_processes.start(database_url, WEBHOOK_TIMEOUT="2s")

    async def delivered() -> bool:
        (row,) = await delivery_rows(database_url)
        return bool(row["status"] == "delivered")

    await wait_for(delivered, within=15, what="the delivery to be sent again and recorded")
    (row,) = await delivery_rows(database_url)
    assert (row["attempts"], row["last_status"]) == (2, 204)
    assert receiver.ids == [f"msg_{row['id']}"] * 2  # the same webhook-id both times
    assert [e["type"] for e in receiver.verified] == ["job.finished"] * 2
    assert [e["data"]["id"] for e in receiver.verified] == [job_id] * 2
    assert receiver.verified[1]["data"]["result"] == {"text": "once or more"}
    # Not sent again before the first attempt's lease ran out.
    assert receiver.arrived[1] - receiver.arrived[0] > 3.0, receiver.arrived


# (c) ------------------------------------------------------------------------------------------


class SlowReceiver(Receiver):
    """Answers after a short delay, so a sender is still busy with its claim when the next wave is due."""

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.1)
        return await super()._hook(request)


@pytest.fixture
async def slow_receiver() -> AsyncIterator[SlowReceiver]:
    server = SlowReceiver()
    await server.start()
    yield server
    await server.close()


async def test_two_replicas_deliver_each_event_exactly_once(
    settings: Settings, database_url: str, store: JobStore, slow_receiver: SlowReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = slow_receiver
    # Which replica's store claimed how many deliveries (each replica opens its own pool and store).
    claimed_by: Counter[int] = Counter()
    claim = JobStore.claim_deliveries

    async def counting_claim(self: JobStore, *args: Any) -> list[asyncpg.Record]:
        rows = await claim(self, *args)
        if rows:
            claimed_by[id(self)] += len(rows)
        return rows

    monkeypatch.setattr(JobStore, "claim_deliveries", counting_claim)
    replicas = [await in_process_api(settings) for _ in range(2)]
    try:
        await register(replicas[0], receiver, owner="replicas", events=["job.finished"])
        specs = [JobCreate.model_validate(job_spec(owner_service="replicas", model_profile="two")) for _ in range(50)]
        jobs = [(await store.create_job(spec))[0] for spec in specs]
        claimed = await store.claim_jobs("w", 50, lease_timeout=LEASE, model_profiles=["two"])
        assert sorted(j.id for j in claimed) == sorted(j.id for j in jobs)
        # Ten waves of five completions: every wave wakes both senders at once.
        for wave in range(10):
            await asyncio.gather(
                *(store.complete_job(j.id, "w", {"n": j.id}) for j in claimed[wave * 5 : wave * 5 + 5])
            )
            await asyncio.sleep(0.05)

        async def all_delivered() -> bool:
            rows = await delivery_rows(database_url)
            return len(rows) == 50 and all(r["status"] == "delivered" for r in rows)

        await wait_for(all_delivered, within=20, what="every delivery to be recorded")
        await asyncio.sleep(1.5)  # a sender round more: nothing is sent again
        rows = await delivery_rows(database_url)
    finally:
        for api in replicas:
            await api.close()
    counts = Counter(receiver.ids)
    assert len(counts) == 50 and set(counts.values()) == {1}, counts.most_common(3)
    assert sorted(e["data"]["id"] for e in receiver.verified) == sorted(j.id for j in jobs)
    assert {e["type"] for e in receiver.verified} == {"job.finished"}
    assert [r["attempts"] for r in rows] == [1] * 50  # claimed once each: SKIP LOCKED, no lease expired
    print(f"replicas: claims per replica {sorted(claimed_by.values())}")
    assert len(claimed_by) == 2 and sum(claimed_by.values()) == 50, claimed_by  # both replicas sent
