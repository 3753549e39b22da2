"""The `delivery` scenario of bench.py: waiting for results over HTTP and webhook throughput.

Everything runs against a real `aiservice serve` process (python -m aiservice.cli serve, default
settings: DB_POOL_MAX_SIZE 10) on a fresh database; jobs are created and finished through the
SQL API (JobStore) from this process, on a pool of its own whose connections are not named
aiservice*.

  wake     One waiter at a time: GET /jobs/{id}?wait=30 for a running job, then complete_job;
           the time from complete_job's return (its commit) to the HTTP answer, p50/p99 over
           pickup_samples waiters (200 by default), after 5 warm-up ones.
  waiters  1,000 concurrent GET /jobs/{id}?wait=30 on distinct running jobs (one aiohttp
           connector, no connection limit): the PostgreSQL connections the API process holds
           while they wait (pg_stat_activity rows of this database named aiservice*, the highest
           of a few samples), then all 1,000 completed in one complete_jobs call: the time from
           its commit until the last answer, and p50/p99 of the answers.
  webhooks http_jobs jobs (5,000 by default) of an owner with a webhook (job.finished) to a
           local aiohttp receiver in this process that answers 204, cancelled in one
           cancel_batch call: deliveries per second from the cancel's commit to the last
           delivered_at (PostgreSQL's clock), median of the measured runs after a warm-up.
  mixed    On a fresh database, min(http_jobs, 1,000) jobs of a fast owner and a tenth as many of
           a slow owner (its receiver answers after 1 s), interleaved in one batch and cancelled
           at once: the fast owner's deliveries/s, and when the slow owner's last was delivered.
           One run.

bench.py wraps each (metric, value, unit, runs, note) row returned by measure() in its Result.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WAITERS = 1_000
WARMUP = 5
LEASE = timedelta(minutes=30)
API = "/api/v1"

Row = tuple[str, float, str, list[float], str]  # metric, value, unit, runs, note

TARGETS = {
    "wake_p50_ms": "<= 5 ms",
    "wake_p99_ms": "<= 20 ms",
    "waiters_pg_connections": "<= 11 (pool + 1)",
}
CHECKS: dict[str, Callable[[float], bool]] = {
    "wake_p50_ms": lambda v: v <= 5,
    "wake_p99_ms": lambda v: v <= 20,
    # The pool (DB_POOL_MAX_SIZE, 10 by default) and the one LISTEN connection: not one per waiter.
    "waiters_pg_connections": lambda v: v <= 11,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_open_files(wanted: int = 8192) -> None:
    """1,000 sockets on each side: raise the soft limit (the API process inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


@asynccontextmanager
async def aiservice_serve(dsn: str, **env: str) -> AsyncIterator[str]:
    """`aiservice serve` in a child process on a free port; yields its base URL once /readyz answers."""
    import aiohttp

    port = free_port()
    environment = dict(
        os.environ,
        DATABASE_URL=dsn,
        HTTP_HOST="127.0.0.1",
        HTTP_PORT=str(port),
        MIGRATE_ON_START="false",
        LOG_LEVEL="WARNING",
        **env,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiservice.cli", "serve", env=environment, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as session:
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"aiservice serve exited with {proc.returncode}")
                try:
                    async with session.get(f"{base}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("aiservice serve did not become ready")
                await asyncio.sleep(0.1)
        yield base
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def running_jobs(store: Any, n: int, *, owner: str = "bench-wait") -> list[Any]:
    """n jobs claimed by one worker: running, ready to be completed."""
    from aiservice.jobs import JobCreate

    spec = JobCreate(owner_service=owner, owner_ref="r", task_type="noop", model_profile="wait")
    for start in range(0, n, 10_000):
        await store.create_jobs([spec] * min(10_000, n - start))
    jobs: list[Any] = []
    while len(jobs) < n:
        jobs += await store.claim_jobs("bench-waiter", min(1_000, n - len(jobs)), lease_timeout=LEASE)
    return jobs


async def api_connections(conn: Any) -> dict[str, int]:
    rows = await conn.fetch(
        """SELECT application_name, count(*) AS n FROM pg_stat_activity
           WHERE datname = current_database() AND application_name LIKE 'aiservice%'
           GROUP BY 1 ORDER BY 1"""
    )
    return {r["application_name"]: int(r["n"]) for r in rows}


async def wake_latency(session: Any, base: str, store: Any, samples: int) -> list[float]:
    """One waiter at a time; ms from complete_job's return to the HTTP answer."""
    jobs = await running_jobs(store, samples + WARMUP)
    latencies: list[float] = []
    answered = 0.0

    async def wait(job_id: int) -> None:
        nonlocal answered
        async with session.get(f"{base}{API}/jobs/{job_id}", params={"wait": "30"}) as response:
            body = await response.json()
        answered = time.perf_counter()
        if response.status != 200 or body["status"] != "completed":
            raise RuntimeError(f"job {job_id}: {response.status} {body}")

    for i, job in enumerate(jobs):
        waiting = asyncio.create_task(wait(job.id))
        await asyncio.sleep(0.03)  # the request is in and waiting
        if waiting.done():
            await waiting
            raise RuntimeError(f"job {job.id} answered before it finished")
        await store.complete_job(job.id, "bench-waiter", {}, lease_token=job.lease_token)
        committed = time.perf_counter()
        await asyncio.wait_for(waiting, 10)
        if i >= WARMUP:
            latencies.append(max(0.0, answered - committed) * 1000)
    return latencies


@dataclass
class Crowd:
    held: dict[str, int]  # the API's connections by application_name, at the highest sample
    ramp: float  # seconds until every waiter's request was out
    answers: list[float]  # ms from the complete_jobs commit to each answer
    plain: list[float]  # ms from the start to each answer of as many plain GETs at once


async def many_waiters(base: str, store: Any, conn: Any, n: int) -> Crowd:
    """n concurrent waiters: the API's connections while they wait, then all completed at once.

    For scale, the same n jobs are then read with as many concurrent plain GETs on the same
    (warm) connections: what answering n requests at once costs without any waiting."""
    import aiohttp

    jobs = await running_jobs(store, n)
    sent = 0

    async def headers_sent(*_: Any) -> None:
        nonlocal sent
        sent += 1

    async def get(session: aiohttp.ClientSession, job_id: int, params: dict[str, str]) -> float:
        async with session.get(f"{base}{API}/jobs/{job_id}", params=params) as response:
            body = await response.json()
        if response.status != 200 or body["status"] != "completed":
            raise RuntimeError(f"job {job_id}: {response.status} {body}")
        return time.perf_counter()

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(headers_sent)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        started = time.perf_counter()
        waiting = [asyncio.create_task(get(session, job.id, {"wait": "30"})) for job in jobs]
        deadline = time.monotonic() + 20
        while sent < n:
            if time.monotonic() > deadline or any(t.done() for t in waiting):
                raise RuntimeError(f"only {sent} of {n} waiters got their request out")
            await asyncio.sleep(0.05)
        ramp = time.perf_counter() - started
        await asyncio.sleep(2)  # the API reads them and registers each waiter
        highest: dict[str, int] = {}
        for _ in range(5):
            now = await api_connections(conn)
            if sum(now.values()) > sum(highest.values()):
                highest = now
            await asyncio.sleep(0.2)
        if any(t.done() for t in waiting):
            raise RuntimeError("a waiter answered before its job finished")
        await store.complete_jobs("bench-waiter", [(j.id, j.lease_token, {}) for j in jobs])
        committed = time.perf_counter()
        answered = await asyncio.wait_for(asyncio.gather(*waiting), 60)

        await asyncio.sleep(0.5)
        started = time.perf_counter()
        plain = await asyncio.wait_for(asyncio.gather(*(get(session, job.id, {}) for job in jobs)), 60)
    return Crowd(highest, ramp, [(t - committed) * 1000 for t in answered], [(t - started) * 1000 for t in plain])


async def webhook_rate(base: str, store: Any, conn: Any, n: int, runs: int) -> tuple[float, list[float], int]:
    """Deliveries/s for n finished jobs; returns (median, runs, requests received in all)."""
    import aiohttp
    from aiohttp import web

    from aiservice.jobs import JobCreate

    received = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal received
        await request.read()
        received += 1
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        endpoint = {"url": url, "events": ["job.finished"]}
        async with (
            aiohttp.ClientSession() as session,
            session.put(f"{base}{API}/webhooks/bench-hooks", json=endpoint) as r,
        ):
            if r.status != 200:
                raise RuntimeError(f"webhook registration: {r.status} {await r.text()}")
        spec = JobCreate(owner_service="bench-hooks", owner_ref="r", task_type="noop", model_profile="hook")

        async def once() -> float:
            created = await store.create_jobs([spec] * n)
            batch_id = created[0][0].batch_id
            await store.cancel_batch(batch_id)
            deadline = time.monotonic() + 600
            while True:
                left = await conn.fetchval("SELECT count(*) FROM aiservice.webhook_deliveries WHERE status = 'pending'")
                if left == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{left} deliveries still pending")
                await asyncio.sleep(0.05)
            row = await conn.fetchrow(
                """SELECT count(*) AS n, count(*) FILTER (WHERE d.status = 'delivered') AS delivered,
                          extract(epoch FROM max(d.delivered_at) - min(d.created_at)) AS seconds
                   FROM aiservice.webhook_deliveries d JOIN aiservice.jobs j ON j.id = d.job_id
                   WHERE j.batch_id = $1""",
                batch_id,
            )
            if (row["n"], row["delivered"]) != (n, n):
                raise RuntimeError(f"{row['delivered']} of {row['n']} deliveries delivered, {n} expected")
            return n / float(row["seconds"])

        await once()  # warm-up
        values = [await once() for _ in range(runs)]
        return statistics.median(values), values, received
    finally:
        await runner.cleanup()


SLOW_ANSWER = 1.0  # seconds a slow receiver takes to answer


async def webhook_rate_beside_a_slow_receiver(base: str, store: Any, conn: Any, n: int) -> tuple[float, float]:
    """One batch of n jobs of a fast owner and n/10 of a slow one, interleaved (one slow job after
    each ten fast ones), cancelled at once: the fast owner's deliveries/s (its first event to its
    last delivered_at) and the seconds until the slow owner's last delivery (its receiver answers
    after SLOW_ANSWER s)."""
    import aiohttp
    from aiohttp import web

    from aiservice.jobs import JobCreate

    async def fast(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(SLOW_ANSWER)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/fast", fast)
    app.router.add_post("/slow", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            for owner in ("fast", "slow"):
                endpoint = {"url": f"{url}/{owner}", "events": ["job.finished"]}
                async with session.put(f"{base}{API}/webhooks/bench-{owner}", json=endpoint) as r:
                    if r.status != 200:
                        raise RuntimeError(f"webhook registration: {r.status} {await r.text()}")
        specs = [
            JobCreate(owner_service="bench-slow" if i % 11 == 10 else "bench-fast", owner_ref="r",
                      task_type="noop", model_profile="mixed")
            for i in range(n + n // 10)
        ]  # fmt: skip
        created = await store.create_jobs(specs)
        await store.cancel_batch(created[0][0].batch_id)
        deadline = time.monotonic() + 600
        while await conn.fetchval("SELECT count(*) FROM aiservice.webhook_deliveries WHERE status = 'pending'"):
            if time.monotonic() > deadline:
                raise RuntimeError("deliveries still pending after 600 s")
            await asyncio.sleep(0.05)
        rows = {
            r["owner_service"]: r
            for r in await conn.fetch(
                """SELECT owner_service, count(*) AS n,
                          extract(epoch FROM max(delivered_at) - min(created_at)) AS seconds
                   FROM aiservice.webhook_deliveries WHERE status = 'delivered' GROUP BY 1"""
            )
        }
        if rows["bench-fast"]["n"] != n or rows["bench-slow"]["n"] != n // 10:
            raise RuntimeError(f"not every delivery was delivered: {dict(rows)}")
        return n / float(rows["bench-fast"]["seconds"]), float(rows["bench-slow"]["seconds"])
    finally:
        await runner.cleanup()


async def measure(db: Any, sz: Any, percentile: Callable[[list[float], float], float]) -> list[Row]:
    """The scenario: ``db`` is bench.py's Databases, ``sz`` its Sizes."""
    import aiohttp

    from aiservice.db.pool import create_pool
    from aiservice.db.store import JobStore

    raise_open_files()
    rows: list[Row] = []
    dsn = await db.fresh("ai")
    pool = await create_pool(dsn, max_size=4, application_name="bench-delivery")
    store = JobStore(pool)
    try:
        async with aiservice_serve(dsn) as base, pool.acquire() as conn:
            async with aiohttp.ClientSession() as session:
                wake = await wake_latency(session, base, store, sz.pickup_samples)
            note = f"GET ?wait=30, complete_job commit -> answer, {len(wake)} samples"
            rows.append(("wake_p50_ms", percentile(wake, 0.5), "ms", [], note))
            rows.append(("wake_p99_ms", percentile(wake, 0.99), "ms", [], note))

            crowd = await many_waiters(base, store, conn, WAITERS)
            detail = ", ".join(f"{name} {count}" for name, count in crowd.held.items())
            rows.append(
                ("waiters_pg_connections", float(sum(crowd.held.values())), "conns", [],
                 f"API process while {WAITERS:,} wait: {detail}; all waiting after {crowd.ramp:.1f}s")
            )  # fmt: skip
            note = f"{WAITERS:,} waiters, one complete_jobs commit -> answer"
            rows.append(("waiters_all_answered_ms", max(crowd.answers), "ms", [], note))
            rows.append(("waiters_p50_ms", percentile(crowd.answers, 0.5), "ms", [], note))
            rows.append(("waiters_p99_ms", percentile(crowd.answers, 0.99), "ms", [], note))
            note = f"for scale: {WAITERS:,} plain GET /jobs/{{id}} at once, same connections, start -> answer"
            rows.append(("plain_gets_all_answered_ms", max(crowd.plain), "ms", [], note))
            rows.append(("plain_gets_p50_ms", percentile(crowd.plain, 0.5), "ms", [], note))

            rate, values, received = await webhook_rate(base, store, conn, sz.http_jobs, sz.runs)
            rows.append(
                ("webhook_deliveries_s", rate, "msg/s", values,
                 f"{sz.http_jobs:,} jobs cancelled at once -> last delivered_at, receiver answers 204; "
                 f"{received:,} requests for {sz.http_jobs * (sz.runs + 1):,} deliveries")
            )  # fmt: skip

        # A database of its own: the outbox above is full of delivered rows.
        mixed = await db.fresh("ai")
        mixed_pool = await create_pool(mixed, max_size=4, application_name="bench-delivery")
        try:
            async with aiservice_serve(mixed) as base, mixed_pool.acquire() as conn:
                n = min(sz.http_jobs, 1_000)
                fast_rate, slow_seconds = await webhook_rate_beside_a_slow_receiver(base, JobStore(mixed_pool), conn, n)
            note = f"{n:,} to a receiver answering at once, {n // 10} interleaved to one taking {SLOW_ANSWER:g} s"
            rows.append(("webhook_fast_beside_slow_s", fast_rate, "msg/s", [], note))
            rows.append(("webhook_slow_all_delivered_s", slow_seconds, "s", [], note))
        finally:
            await mixed_pool.close()
            await db.drop(mixed)
    finally:
        await pool.close()
        await db.drop(dsn)
    return rows
