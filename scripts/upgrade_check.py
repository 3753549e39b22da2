"""Upgrade check on real data: a database built and loaded by an earlier main, migrated by this tree.

    .venv/bin/python scripts/upgrade_check.py --dsn postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python scripts/upgrade_check.py                 # an embedded PostgreSQL in a temporary directory
    .venv/bin/python scripts/upgrade_check.py --old 5fc449d --pipelines 200

The earlier commit's schema (git archive of --old, default 5fc449d: main before migration 0018)
migrates a new database, and its SQL functions put load on it: webhook, limit, batches of
three-job pipelines with idempotency keys and dependencies, keyed single jobs, claims, completions,
failures (final and retried), cancellations, jobs left running; some finished jobs are then dated
1, 3 and 40 days back. Every job (get_job, list_jobs), batch, delivery, dependency list, key and
the statistics are recorded, this tree's migrator runs, and all of it must read the same. Then
every request is sent again (each answers its job, created false), the load is drained with this
tree's functions, and the counts, batch counts and retention are checked against the rows.
Prints what differs and exits 1 if anything does. The database is dropped unless --keep."""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiservice import embedded  # noqa: E402
from aiservice.db.migrate import Migration, load_functions, load_migrations, migrate  # noqa: E402
from aiservice.db.pool import connect  # noqa: E402

Conn = Any
OWNER = "telephony"
STATUSES = ("pending", "running", "completed", "failed", "cancelled")
problems: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        problems.append(what)
        print("PROBLEM:", what)


def pipeline(i: int) -> dict[str, Any]:
    """The README's telephony pipeline for call i; every fifth transcription is scheduled for later."""
    first: dict[str, Any] = {
        "task_type": "transcribe",
        "model_profile": "whisperx",
        "input": {"audio_url": f"https://records.example/{i}.wav"},
        "idempotency_key": f"beeline/{i}/transcribe",
    }
    if i % 5 == 4:
        first["run_at"] = "2099-01-01T00:00:00Z"
    return {
        "defaults": {"owner_service": OWNER, "owner_ref": f"beeline/{i}"},
        "jobs": [
            first,
            {
                "task_type": "call_analysis",
                "model_profile": "qwen2.5-14b",
                "depends_on": ["$0"],
                "input": {"user": "Classify: {{dependencies.0.result.text}}"},
                "idempotency_key": f"beeline/{i}/analysis",
            },
            {
                "task_type": "summarize",
                "model_profile": "qwen2.5-14b",
                "depends_on": ["$0", "$1"],
                "priority": 1,
                "input": {"user": "Summarize"},
            },
        ],
    }


def single(i: int) -> dict[str, Any]:
    return {
        "p_owner_service": OWNER if i % 3 else "billing",
        "p_owner_ref": f"single/{i}",
        "p_task_type": "llm_chat",
        "p_model_profile": "qwen2.5-14b",
        "p_input": {"user": f"hello {i}"},
        "p_priority": i % 4,
        "p_idempotency_key": f"single/{i}" if i % 2 else None,
    }


async def create_all(conn: Conn, pipelines: int, singles: int, keyed_only: bool = False) -> list[tuple[bool, int]]:
    answers = []
    for i in range(pipelines):
        body = pipeline(i)
        if keyed_only:  # the keyed jobs of the pipeline (the first two: "$0" still names the first)
            body["jobs"] = body["jobs"][:2]
        answers += [
            (r["created"], r["id"])
            for r in await conn.fetch(
                "SELECT c.created, (c.job).id FROM aiservice.create_jobs($1, $2) c", body["jobs"], body["defaults"]
            )
        ]
    for i in range(singles):
        args = single(i)
        if keyed_only and args["p_idempotency_key"] is None:
            continue
        names = ", ".join(f"{k} => ${n}" for n, k in enumerate(args, 1))
        r = await conn.fetchrow(f"SELECT c.created, (c.job).id FROM aiservice.create_job({names}) c", *args.values())
        answers.append((r["created"], r["id"]))
    return answers


async def work(conn: Conn, worker: str, rounds: int, mixed: bool) -> None:
    """Claim and finish jobs; with mixed, by id: 6 in 10 complete, and one each fails for good,
    fails to be retried, stays running, is cancelled."""
    for _ in range(rounds):
        await conn.fetchval("SELECT aiservice.maintain()")
        claimed = await conn.fetch(
            "SELECT (c.job).id, (c.job).lease_token FROM aiservice.claim_jobs_v2($1, 40) c", worker
        )
        if not claimed:
            return
        done = [r["id"] for r in claimed if not mixed or r["id"] % 10 < 6]
        await conn.fetch(
            "SELECT * FROM aiservice.complete_jobs($1, $2, $3)",
            worker,
            done,
            [{"text": f"result {i}", "usage": {"total_tokens": i % 700}} for i in done],
        )
        for r in claimed if mixed else []:
            if r["id"] % 10 in (6, 7):
                await conn.execute(
                    "SELECT (aiservice.fail_job($1, $2, $3, 'provider said no', p_retryable => $4,"
                    " p_retry_after => interval '0', p_lease_token => $5)).id",
                    r["id"],
                    worker,
                    "invalid_input" if r["id"] % 10 == 6 else "timeout",
                    r["id"] % 10 == 7,
                    r["lease_token"],
                )
            elif r["id"] % 10 == 9:
                await conn.execute("SELECT aiservice.cancel_jobs(p_ids => $1)", [r["id"]])


async def record(conn: Conn) -> dict[str, Any]:
    """Everything a caller can read, through the public SQL functions."""
    ids = [r["id"] for r in await conn.fetch("SELECT id FROM aiservice.list_jobs(p_limit => NULL)")]
    jobs = {i: dict(await conn.fetchrow("SELECT * FROM aiservice.get_job($1)", i)) for i in ids}
    batches = [b["b"] for b in await conn.fetch("SELECT b FROM aiservice.list_batches(p_limit => 100000) b")]
    stats = await conn.fetchval("SELECT aiservice.stats()")
    return {
        "jobs": jobs,
        "list_jobs": [dict(r) for r in await conn.fetch("SELECT * FROM aiservice.list_jobs(p_limit => NULL)")],
        "batches": {b["id"]: await conn.fetchval("SELECT aiservice.get_batch($1)", b["id"]) for b in batches},
        "list_batches": batches,
        "deliveries": [
            dict(r) for r in await conn.fetch("SELECT * FROM aiservice.list_deliveries($1, p_limit => 100000)", OWNER)
        ],
        "dependencies": {i: await conn.fetchval("SELECT aiservice.list_dependencies($1)", i) for i in ids},
        "dependencies_of": {i: await conn.fetchval("SELECT aiservice.dependencies_of($1)", i) for i in ids},
        "keys": sorted((j["owner_service"], j["idempotency_key"], i) for i, j in jobs.items() if j["idempotency_key"]),
        "stats": {k: stats[k] for k in ("totals", "by_status", "created", "errors", "running_by_worker")},
    }


def compare(before: dict[str, Any], after: dict[str, Any]) -> None:
    for section, old in before.items():
        new = after[section]
        if isinstance(old, dict) and section != "stats":
            check(
                sorted(old) == sorted(new),
                f"{section}: keys differ: lost {sorted(set(old) - set(new))[:10]},"
                f" new {sorted(set(new) - set(old))[:10]}",
            )
            differing = [k for k in old if k in new and old[k] != new[k]]
            for k in differing[:5]:
                check(False, f"{section}[{k}]: before {old[k]!r}\n    after {new[k]!r}")
            check(len(differing) <= 5, f"{section}: {len(differing)} entries differ")
        else:
            check(old == new, f"{section}: before {old!r}\n    after {new!r}")
        print(f"  {section}: {len(old)} compared")


def old_schema(commit: str) -> tuple[list[Migration], list[Migration]]:
    """The migrations and function files of an earlier commit."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "schema"], check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tmp, filter="data")
        schema = Path(tmp) / "schema"
        return load_migrations(schema / "migrations"), load_functions(schema / "functions")


async def upgrade_check(dsn: str, old: str, pipelines: int, singles: int) -> None:
    conn = await connect(dsn)
    print("PostgreSQL", await conn.fetchval("SHOW server_version"))
    await migrate(conn, *old_schema(old))
    print(
        f"migrated by {old}:", await conn.fetchval("SELECT max(name) FROM aiservice.migrations WHERE name ~ '^[0-9]'")
    )

    await conn.execute(
        "SELECT secret_shown FROM aiservice.set_webhook($1, 'https://hooks.example.com/in', 'whsec-0123456789abcdef')",
        OWNER,
    )
    await conn.execute("SELECT (aiservice.set_limit('model_profile', 'qwen2.5-14b', '{\"max_running\": 30}')).name")
    await create_all(conn, pipelines, singles)
    await work(conn, "w1", 12, mixed=True)
    await conn.fetch("SELECT * FROM aiservice.claim_deliveries(20)")  # some deliveries in flight
    for days, digit in ((1, 1), (3, 2), (40, 3)):  # spread the finished jobs over several days
        await conn.execute(
            "UPDATE aiservice.jobs SET finished_at = finished_at - make_interval(days => $1)"
            " WHERE finished_at IS NOT NULL AND id % 4 = $2",
            days,
            digit,
        )
    await conn.fetchval("SELECT aiservice.maintain()")
    before = await record(conn)
    print(
        "before:",
        before["stats"]["totals"],
        f"{len(before['batches'])} batches,",
        f"{len(before['deliveries'])} deliveries, {len(before['keys'])} keys",
    )

    applied = await migrate(conn)
    print("migrated by this tree:", [a for a in applied if not a.startswith("functions/")])
    after = await record(conn)
    compare(before, after)
    layout = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM aiservice.jobs) AS live, (SELECT count(*) FROM aiservice.job_history) AS history,"
        " (SELECT count(*) FROM aiservice.job_keys) AS keys"
    )
    finished = sum(1 for j in before["jobs"].values() if j["status"] in ("completed", "failed", "cancelled"))
    check(
        dict(layout) == {"live": len(before["jobs"]) - finished, "history": finished, "keys": len(before["keys"])},
        f"layout {dict(layout)}",
    )

    again = await create_all(conn, pipelines, singles, keyed_only=True)
    check(not any(created for created, _ in again), "a repeated request created a job")
    check({i for _, i in again} <= set(before["jobs"]), "a repeated request answered another job")

    # Every failed job retried (back to live, blocked again behind a failed dependency), then drained.
    retried = await conn.fetchval("SELECT count(*) FROM aiservice.retry_jobs(p_statuses => '{failed}')")
    live = await conn.fetchval("SELECT count(*) FROM aiservice.jobs WHERE status = 'pending' AND attempts = 0")
    check(retried == before["stats"]["totals"]["failed"] and live >= retried, f"retried {retried}, {live} pending")
    # The jobs scheduled far ahead are due now, so that everything can be drained.
    await conn.execute("UPDATE aiservice.jobs SET run_at = now() WHERE run_at > now() + interval '1 year'")
    running = [r["id"] for r in await conn.fetch("SELECT id FROM aiservice.jobs WHERE status = 'running'")]
    await conn.fetch("SELECT * FROM aiservice.complete_jobs('w1', $1, $2)", running, [{}] * len(running))
    await work(conn, "w2", 200, mixed=False)
    ran = await conn.fetchval("SELECT aiservice.maintain()")
    check(ran["errors"] == {}, f"maintain: {ran}")
    left = await conn.fetchval("SELECT count(*) FROM aiservice.jobs")
    check(left == 0, f"{left} live jobs left after draining")
    await counts_match(conn, "after draining")
    ran = await conn.fetchval("SELECT aiservice.maintain(p_retention => interval '30 days')")
    check(ran["errors"] == {}, f"maintain with retention: {ran}")
    old_left = await conn.fetchval(
        "SELECT count(*) FROM aiservice.all_jobs WHERE finished_at < now() - interval '31 days'"
    )
    check(old_left == 0, f"{old_left} jobs older than retention kept")
    await counts_match(conn, "after retention", batches=False)
    await conn.close()


async def counts_match(conn: Conn, when: str, batches: bool = True) -> None:
    """stats() totals, and each batch's counts unless retention deleted some of its jobs, match the rows."""
    rows = dict(await conn.fetch("SELECT status::text, count(*) FROM aiservice.all_jobs GROUP BY 1"))
    totals = (await conn.fetchval("SELECT aiservice.stats()"))["totals"]
    check(totals == {s: rows.get(s, 0) for s in STATUSES}, f"stats totals {when}: {totals}, rows {rows}")
    for b in await conn.fetch(
        "SELECT b.id, aiservice.get_batch(b.id) AS got, (SELECT jsonb_object_agg(s, n) FROM"
        " (SELECT status::text AS s, count(*) AS n FROM aiservice.all_jobs j WHERE j.batch_id = b.id GROUP BY 1) x)"
        " AS counted FROM aiservice.batches b WHERE $1",
        batches,
    ):
        counts = b["got"]["counts"]
        check(
            all(counts[s] == (b["counted"] or {}).get(s, 0) for s in STATUSES),
            f"batch {b['id']} {when}: {counts}, rows {b['counted']}",
        )
    print(f"counts {when}: {totals}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="a server where databases may be created (default: embedded PostgreSQL)")
    parser.add_argument("--old", default="5fc449d", help="the commit whose schema builds the database")
    parser.add_argument("--pipelines", type=int, default=120)
    parser.add_argument("--singles", type=int, default=80)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    args = parser.parse_args()

    tmp, server = None, None
    if args.dsn:
        server_dsn = args.dsn
    else:
        tmp = Path(tempfile.mkdtemp(prefix="aiservice-upgrade-"))
        server = embedded.start(tmp / "pgdata", keep=False)
        server_dsn = str(server.get_uri("postgres"))
    name = f"aiservice_upgrade_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        c = await asyncpg.connect(server_dsn)
        try:
            await c.execute(sql)
        finally:
            await c.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    parts = urlsplit(server_dsn)
    dsn = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    try:
        asyncio.run(upgrade_check(dsn, args.old, args.pipelines, args.singles))
    finally:
        if not args.keep:
            asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if server is not None:
            server.cleanup()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        "OK: every job, batch, delivery, dependency and key read the same"
        if not problems
        else f"{len(problems)} problems"
    )
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
