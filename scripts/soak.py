"""Soak: sustained create/claim/complete load with a long-running transaction held for part of it.

Not part of CI. Reports, every --interval seconds, throughput (jobs completed per second), dead and
live tuples (pg_stat_user_tables), table and index sizes, and at the end whether throughput
recovered after the long transaction ended.

    python scripts/soak.py --dsn postgresql://postgres@127.0.0.1:5432/postgres --minutes 5

The DSN names a server where the script may create (and at the end drop, unless --keep) its own
database, aiservice_soak. Load goes only where the DSN points: use 127.0.0.1. With --embedded the
script starts its own embedded PostgreSQL in a temporary directory instead (stock settings,
autovacuum on).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg

from aiservice.db.migrate import migrate
from aiservice.db.pool import connect, create_pool
from aiservice.db.store import JobStore
from aiservice.jobs import JobCreate

DATABASE = "aiservice_soak"
TABLES = ("jobs", "job_count_deltas", "job_counts", "job_finishes")


@dataclass
class Counters:
    created: int = 0
    completed: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


async def producer(store: JobStore, counters: Counters, stop: asyncio.Event, batch: int, backlog: int) -> None:
    n = 0
    while not stop.is_set():
        if counters.created - counters.completed > backlog:
            await asyncio.sleep(0.01)
            continue
        specs = [
            JobCreate(
                owner_service="soak",
                owner_ref=f"soak/{n + i}",
                task_type="soak",
                model_profile="m",
                input={"user": f"job {n + i}", "pad": "x" * 200},
            )
            for i in range(batch)
        ]
        n += batch
        await store.create_jobs(specs)
        counters.created += batch


async def consumer(store: JobStore, counters: Counters, stop: asyncio.Event, worker: str, limit: int) -> None:
    while not stop.is_set():
        jobs = await store.claim_jobs(worker, limit, lease_timeout=timedelta(minutes=5), task_types=["soak"])
        if not jobs:
            await asyncio.sleep(0.02)
            continue
        for job in jobs:
            await store.complete_job(job.id, worker, {"content": "ok"}, lease_token=job.lease_token)
            counters.completed += 1


async def maintenance(store: JobStore, stop: asyncio.Event) -> None:
    """What the API does every MAINTENANCE_INTERVAL."""
    while not stop.is_set():
        await asyncio.sleep(5)
        await store.expire_leases()
        await store.compact_counts()


async def long_transaction(dsn: str, start: float, hold: float, log: list[str]) -> None:
    """A REPEATABLE READ transaction that has read the queue and then just sits: it pins xmin."""
    await asyncio.sleep(start)
    conn = await asyncpg.connect(dsn)
    try:
        tr = conn.transaction(isolation="repeatable_read")
        await tr.start()
        await conn.fetchval("SELECT count(*) FROM aiservice.jobs")
        log.append(f"long transaction opened at t={start:.0f}s for {hold:.0f}s")
        await asyncio.sleep(hold)
        await tr.rollback()
        log.append(f"long transaction closed at t={start + hold:.0f}s")
    finally:
        await conn.close()


async def sample(conn: asyncpg.Connection[Any]) -> dict[str, Any]:
    rows = await conn.fetch(
        """
        SELECT relname, n_live_tup, n_dead_tup, autovacuum_count, last_autovacuum IS NOT NULL AS vacuumed,
               pg_table_size(relid) AS table_bytes, pg_indexes_size(relid) AS index_bytes
        FROM pg_stat_user_tables WHERE schemaname = 'aiservice' AND relname = ANY($1::text[])
        """,
        list(TABLES),
    )
    pending = await conn.fetchval("SELECT count(*) FROM aiservice.jobs WHERE status = 'pending'")
    return {"tables": {r["relname"]: dict(r) for r in rows}, "pending": pending}


def mb(n: int) -> str:
    return f"{n / 1024 / 1024:.1f}MB"


async def run(args: argparse.Namespace) -> int:
    admin = await asyncpg.connect(args.dsn)
    try:
        autovacuum = await admin.fetchval("SHOW autovacuum")
        version = await admin.fetchval("SHOW server_version")
        print(f"PostgreSQL {version}, autovacuum={autovacuum}", flush=True)
        if autovacuum != "on":
            print("warning: autovacuum is off on this server: dead tuples will only grow", flush=True)
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await admin.close()
    dsn = with_database(args.dsn, DATABASE)
    conn = await connect(dsn)
    await migrate(conn)
    pool = await create_pool(dsn, max_size=args.consumers + args.producers + 2)
    store = JobStore(pool)
    counters = Counters()
    stop = asyncio.Event()
    total = args.minutes * 60
    tx_start, tx_hold = total * args.long_tx_start, total * args.long_tx_length
    events: list[str] = []
    tasks = [
        *(
            asyncio.create_task(producer(store, counters, stop, args.batch, args.backlog))
            for _ in range(args.producers)
        ),
        *(asyncio.create_task(consumer(store, counters, stop, f"soak-{i}", args.claim)) for i in range(args.consumers)),
        asyncio.create_task(maintenance(store, stop)),
    ]
    long_tx = asyncio.create_task(long_transaction(dsn, tx_start, tx_hold, events))
    print(
        f"soak: {args.minutes} min, {args.producers} producers x {args.batch}, {args.consumers} consumers x "
        f"{args.claim}; long transaction from t={tx_start:.0f}s for {tx_hold:.0f}s",
        flush=True,
    )
    print("    t  phase   jobs/s  pending  jobs live/dead  deltas dead  jobs table+idx  vacuums", flush=True)
    started = time.monotonic()
    last_done, last_t = 0, 0.0
    try:
        while (elapsed := time.monotonic() - started) < total:
            await asyncio.sleep(min(args.interval, total - elapsed))
            for failed in (t for t in tasks if t.done() and t.exception()):
                raise RuntimeError("a load task failed") from failed.exception()
            now = time.monotonic() - started
            rate = (counters.completed - last_done) / (now - last_t)
            last_done, last_t = counters.completed, now
            phase = "before" if now <= tx_start else "during" if now <= tx_start + tx_hold else "after"
            snap = await sample(conn)
            jobs, deltas = snap["tables"]["jobs"], snap["tables"].get("job_count_deltas", {})
            counters.samples.append({"t": now, "phase": phase, "rate": rate, **snap})
            print(
                f"{now:5.0f}  {phase:6} {rate:8.0f} {snap['pending']:8d}"
                f"  {jobs['n_live_tup']:>7}/{jobs['n_dead_tup']:<7}"
                f" {deltas.get('n_dead_tup', 0):>10}  {mb(jobs['table_bytes'])}+{mb(jobs['index_bytes'])}"
                f"  {jobs['autovacuum_count']}/{deltas.get('autovacuum_count', 0)}",
                flush=True,
            )
            for line in events:
                print(f"       {line}", flush=True)
            events.clear()
    finally:
        stop.set()
        long_tx.cancel()
        await asyncio.gather(*tasks, long_tx, return_exceptions=True)
        await pool.close()
        await conn.close()

    by_phase = {
        p: [s["rate"] for s in counters.samples if s["phase"] == p][1:] or [0.0]  # first sample warms up
        for p in ("before", "during", "after")
    }
    means = {p: statistics.mean(v) for p, v in by_phase.items()}
    dead = {
        p: max((s["tables"]["jobs"]["n_dead_tup"] for s in counters.samples if s["phase"] == p), default=0)
        for p in means
    }
    last = counters.samples[-1]["tables"]["jobs"] if counters.samples else {}
    after_tail = by_phase["after"][-max(1, len(by_phase["after"]) // 2) :]
    recovered = statistics.mean(after_tail) >= 0.8 * means["before"]
    print(
        f"\nsummary: completed {counters.completed} jobs in {args.minutes} min; "
        f"jobs/s before {means['before']:.0f}, during long tx {means['during']:.0f}, after {means['after']:.0f} "
        f"(last half of after: {statistics.mean(after_tail):.0f}); peak dead tuples in jobs: "
        f"before {dead['before']}, during {dead['during']}, after {dead['after']}; "
        f"final jobs table {mb(last.get('table_bytes', 0))} + indexes {mb(last.get('index_bytes', 0))}; "
        f"throughput recovered after the long transaction: {'yes' if recovered else 'NO'}",
        flush=True,
    )
    if not args.keep:
        admin = await asyncpg.connect(args.dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        finally:
            await admin.close()
    return 0 if recovered else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default=os.environ.get("SOAK_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between reports")
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=50, help="jobs per create_jobs call")
    parser.add_argument("--claim", type=int, default=10, help="jobs per claim")
    parser.add_argument("--backlog", type=int, default=2000, help="producers pause above this many pending jobs")
    parser.add_argument("--long-tx-start", type=float, default=1 / 3, help="fraction of the run before it opens")
    parser.add_argument("--long-tx-length", type=float, default=1 / 3, help="fraction of the run it stays open")
    parser.add_argument("--keep", action="store_true", help="keep the aiservice_soak database afterwards")
    parser.add_argument("--embedded", action="store_true", help="run on a throwaway embedded PostgreSQL")
    args = parser.parse_args()
    if args.embedded:
        import shutil
        import tempfile

        from aiservice import embedded

        tmp = Path(tempfile.mkdtemp(prefix="aiservice-soak-"))
        server = embedded.start(tmp / "pgdata", keep=False)
        args.dsn = str(server.get_uri("postgres"))
        try:
            return asyncio.run(run(args))
        finally:
            server.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
    host = urlsplit(args.dsn).hostname
    if host not in (None, "", "127.0.0.1", "localhost", "::1"):
        parser.error(f"the soak loads only a local PostgreSQL (127.0.0.1), not {host}")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
