"""The upgrade to live jobs apart from history (issue 18, migration 0018), on real-looking data.

A database at the previous layout (migrations 0001-0017) gets rows as the old code wrote them:
jobs in every state, finished ones over several days, idempotency keys on live and finished jobs,
batches with their counts, dependencies, a webhook with deliveries, statistics counters. Then the
whole migrator runs, and every job must be there once with the same values (read through the
public SQL functions), live ones in aiservice.jobs and finished ones in aiservice.job_history, and
keys, batches, dependencies, deliveries, retry, statistics and maintenance must go on working.
Written apart from the migration, against the layout issue 18 describes."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest

from aiservice.db.migrate import load_migrations, migrate
from aiservice.db.pool import connect

Conn: TypeAlias = "asyncpg.Connection[Any]"

LIVE = {"pending", "running"}
FINISHED = {"completed", "failed", "cancelled"}
OWNER = "telephony"
WEBHOOK_URL = "https://hooks.example.com/aiservice"


@dataclass
class Seeded:
    """What the old code left behind: ids by name, and every row as it was before the upgrade."""

    now: datetime
    ids: dict[str, int] = field(default_factory=dict)
    leases: dict[str, uuid.UUID] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    batch_counts: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    deliveries: list[dict[str, Any]] = field(default_factory=list)

    def by_status(self) -> Counter[str]:
        return Counter(str(j["status"]) for j in self.jobs.values())


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def insert(conn: Conn, table: str, row: dict[str, Any]) -> int:
    names = ", ".join(row)
    values = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    new_id: int = await conn.fetchval(
        f"INSERT INTO aiservice.{table} ({names}) VALUES ({values}) RETURNING id", *row.values()
    )
    return new_id


def job_rows(now: datetime, batches: dict[str, int], leases: dict[str, uuid.UUID]) -> dict[str, dict[str, Any]]:
    """One row per job, as the 0017 code wrote them (every CHECK of jobs holds)."""

    def ago(**delta: float) -> datetime:
        return now - timedelta(**delta)

    def job(name: str, status: str, created: datetime, **cols: Any) -> dict[str, Any]:
        row: dict[str, Any] = {
            "owner_service": OWNER,
            "owner_ref": f"beeline/{name}",
            "task_type": "llm_chat",
            "model_profile": "qwen2.5-14b",
            "input": {"system": "Answer as JSON.", "user": f"Classify call {name}", "max_tokens": 256},
            "status": status,
            "created_at": created,
            "run_at": created,
            "updated_at": cols.get("finished_at") or cols.get("started_at") or created,
        }
        return row | cols

    def ran(started: datetime, worker: str = "worker-a", attempts: int = 1) -> dict[str, Any]:
        return {"worker_id": worker, "started_at": started, "attempts": attempts}

    def running(name: str, started: datetime, expires: datetime, worker: str, attempts: int = 1) -> dict[str, Any]:
        leases[name] = uuid.uuid4()
        return ran(started, worker, attempts) | {"lease_token": leases[name], "lease_expires_at": expires}

    def completed(name: str, finished: datetime, tokens: tuple[int, int] = (120, 40)) -> dict[str, Any]:
        created = finished - timedelta(minutes=3)
        return job(
            name,
            "completed",
            created,
            **ran(created + timedelta(seconds=5)),
            result={"text": f"summary of {name}", "usage": usage(*tokens)},
            finished_at=finished,
        )

    a, b = batches["in_progress"], batches["finished"]
    return {
        # Live: pending (due), keyed, scheduled for later, backing off after a retryable failure,
        # blocked on its dependencies, running with a lease, running with a lease nobody renewed.
        "pending": job("pending", "pending", ago(minutes=2), priority=5),
        "pending_keyed": job(
            "pending_keyed", "pending", ago(minutes=1), idempotency_key="beeline/pending_keyed/analysis"
        ),
        "scheduled": job(
            "scheduled",
            "pending",
            ago(minutes=1),
            run_at=ago(hours=-1),
            requested_run_at=ago(hours=-1),
            scheduled=True,
        ),
        "backing_off": job(
            "backing_off",
            "pending",
            ago(minutes=10),
            run_at=ago(minutes=-5),
            scheduled=True,
            attempts=1,
            error_category="timeout",
            error_message="provider did not answer in 120 s",
            updated_at=ago(minutes=1),
        ),
        "blocked": job(
            "blocked",
            "pending",
            ago(minutes=4),
            task_type="summarize",
            blocked=True,
            scheduled=True,
            input={"user": "Summarize: {{dependencies.0.result.text}} / {{dependencies.1.result.text}}"},
        ),
        "running": job(
            "running",
            "running",
            ago(minutes=5),
            task_type="transcribe",
            model_profile="whisper-large",
            **running("running", ago(minutes=1), ago(minutes=-14), "worker-b"),
        ),
        "running_expired": job(
            "running_expired",
            "running",
            ago(hours=1),
            max_attempts=3,
            **running("running_expired", ago(minutes=30), ago(minutes=15), "worker-dead", attempts=3),
        ),
        # Finished: now, a day, three days and forty days ago.
        "completed_now": completed("completed_now", ago(seconds=5), tokens=(900, 350)),
        "completed_1d": completed("completed_1d", ago(days=1))
        | {"idempotency_key": "beeline/completed_1d/analysis", "requested_run_at": None},
        "completed_3d": completed("completed_3d", ago(days=3)),
        "completed_40d": completed("completed_40d", ago(days=40)),
        "completed_retried": completed("completed_retried", ago(hours=2)) | {"attempts": 2, "max_attempts": 5},
        "failed_1d": job(
            "failed_1d",
            "failed",
            ago(days=1, minutes=2),
            **ran(ago(days=1, minutes=1)),
            error_category="invalid_input",
            error_message="audio is empty",
            finished_at=ago(days=1),
            idempotency_key="beeline/failed_1d/analysis",
        ),
        "failed_3d": job(
            "failed_3d",
            "failed",
            ago(days=3, hours=1),
            **ran(ago(days=3, minutes=5), attempts=3),
            error_category="provider_error",
            error_message="HTTP 500 from provider",
            finished_at=ago(days=3),
        ),
        "cancelled_3d": job("cancelled_3d", "cancelled", ago(days=3, minutes=1), finished_at=ago(days=3)),
        "failed_dependency": job(
            "failed_dependency",
            "failed",
            ago(days=3, minutes=1),
            task_type="summarize",
            error_category="dependency_failed",
            error_message=None,  # "dependency <id of cancelled_3d> is cancelled", set by seed_0017
            finished_at=ago(days=3),
        ),
        "cancelled_running_1d": job(
            "cancelled_running_1d",
            "cancelled",
            ago(days=1, minutes=3),
            **ran(ago(days=1, minutes=2), worker="worker-c"),
            finished_at=ago(days=1),
        ),
        "cancelled_40d": job("cancelled_40d", "cancelled", ago(days=40, minutes=1), finished_at=ago(days=40)),
        # A batch in progress: one job in each of four states.
        "batch_pending": job("batch_pending", "pending", ago(minutes=30), batch_id=a, owner_ref="beeline/batch"),
        "batch_running": job(
            "batch_running",
            "running",
            ago(minutes=30),
            batch_id=a,
            owner_ref="beeline/batch",
            task_type="transcribe",
            model_profile="whisper-large",
            **running("batch_running", ago(minutes=2), ago(minutes=-13), "worker-b"),
        ),
        "batch_completed": completed("batch_completed", ago(minutes=20))
        | {"batch_id": a, "owner_ref": "beeline/batch", "idempotency_key": "beeline/batch/0"},
        "batch_failed": job(
            "batch_failed",
            "failed",
            ago(minutes=30),
            batch_id=a,
            owner_ref="beeline/batch",
            **ran(ago(minutes=25)),
            error_category="content_filter",
            error_message="refused by the provider",
            finished_at=ago(minutes=24),
        ),
        # A finished batch, a day old.
        "batch_b_completed": completed("batch_b_completed", ago(days=1, minutes=5)) | {"batch_id": b},
        "batch_b_cancelled": job(
            "batch_b_cancelled", "cancelled", ago(days=1, minutes=10), batch_id=b, finished_at=ago(days=1)
        ),
    }


async def seed_0017(conn: Conn) -> Seeded:
    """Rows in the 0017 tables as the previous code left them (no function files: plain INSERTs)."""
    now: datetime = await conn.fetchval("SELECT now()")
    seeded = Seeded(now=now)
    b = seeded.batches
    b["in_progress"] = await insert(
        conn,
        "batches",
        {"owner_service": OWNER, "created_at": now - timedelta(minutes=30), "total": 4}
        | {"pending": 1, "running": 1, "completed": 1, "failed": 1},
    )
    b["finished"] = await insert(
        conn,
        "batches",
        {"owner_service": OWNER, "created_at": now - timedelta(days=1, minutes=10)}
        | {"finished_at": now - timedelta(days=1), "total": 2, "completed": 1, "cancelled": 1},
    )
    rows = job_rows(now, b, seeded.leases)
    for name, row in rows.items():
        if name == "failed_dependency":
            row["error_message"] = f"dependency {seeded.ids['cancelled_3d']} is cancelled"
        seeded.ids[name] = await insert(conn, "jobs", row)
    ids = seeded.ids
    await conn.executemany(
        "INSERT INTO aiservice.job_dependencies (job_id, position, depends_on) VALUES ($1, $2, $3)",
        [
            (ids["blocked"], 0, ids["completed_3d"]),
            (ids["blocked"], 1, ids["running"]),
            (ids["failed_dependency"], 0, ids["cancelled_3d"]),
        ],
    )

    # Counters as the triggers and compact_counts() kept them.
    await conn.execute(
        """
        INSERT INTO aiservice.job_counts (task_type, model_profile, status, n)
        SELECT task_type, model_profile, status, count(*) FROM aiservice.jobs GROUP BY 1, 2, 3;
        INSERT INTO aiservice.job_creations (task_type, model_profile, n)
        SELECT task_type, model_profile, count(*) FROM aiservice.jobs GROUP BY 1, 2;
        INSERT INTO aiservice.job_finishes (minute, task_type, model_profile, status, error_category, n)
        SELECT date_trunc('minute', finished_at), task_type, model_profile, status, coalesce(error_category, ''),
               count(*)
        FROM aiservice.jobs WHERE finished_at >= now() - interval '8 days' GROUP BY 1, 2, 3, 4, 5;
        INSERT INTO aiservice.limits (scope, name, max_running, weight)
        VALUES ('model_profile', 'qwen2.5-14b', 100, 2);
        """
    )

    # The owner's webhook and its outbox: delivered, retrying, given up, due, and a batch event.
    await conn.execute(
        "INSERT INTO aiservice.webhooks (owner_service, url, secret, created_at, updated_at)"
        " VALUES ($1, $2, 'whsec-0123456789abcdef', $3, $3)",
        OWNER,
        WEBHOOK_URL,
        now - timedelta(days=60),
    )
    outbox: list[dict[str, Any]] = [
        {"job": "completed_now", "status": "pending", "attempts": 0},
        {"job": "batch_completed", "status": "pending", "attempts": 2, "last_status": 503, "delay": 30},
        {"job": "completed_1d", "status": "delivered", "attempts": 1, "last_status": 200},
        {"job": "failed_1d", "status": "failed", "attempts": 9, "last_error": "connection refused"},
        {"job": "completed_40d", "status": "delivered", "attempts": 1, "last_status": 204},
        {"batch": "finished", "status": "delivered", "attempts": 1, "last_status": 200},
    ]
    for d in outbox:
        at = rows[d["job"]]["finished_at"] if "job" in d else now - timedelta(days=1)
        row: dict[str, Any] = {
            "owner_service": OWNER,
            "event": "job.finished" if "job" in d else "batch.finished",
            "job_id": ids[d["job"]] if "job" in d else None,
            "batch_id": b[d["batch"]] if "batch" in d else rows[d["job"]].get("batch_id"),
            "status": d["status"],
            "attempts": d["attempts"],
            "created_at": at,
            "next_attempt_at": at + timedelta(seconds=d.get("delay", 0)),
            "delivered_at": at + timedelta(seconds=1) if d["status"] == "delivered" else None,
            "last_status": d.get("last_status"),
            "last_error": d.get("last_error"),
        }
        await insert(conn, "webhook_deliveries", row)

    seeded.jobs = {r["id"]: dict(r) for r in await conn.fetch("SELECT * FROM aiservice.jobs ORDER BY id")}
    seeded.deliveries = [dict(r) for r in await conn.fetch("SELECT * FROM aiservice.webhook_deliveries ORDER BY id")]
    for name, batch_id in b.items():
        seeded.batch_counts[name] = dict(
            await conn.fetchrow(
                "SELECT total, pending, running, completed, failed, cancelled, finished_at FROM aiservice.batches"
                " WHERE id = $1",
                batch_id,
            )
        )
    return seeded


@pytest.fixture
async def upgraded(empty_database_url: str) -> AsyncIterator[tuple[Conn, Seeded]]:
    """A database at 0017 with the seeded rows, then migrated by the current code."""
    conn = await connect(empty_database_url)
    try:
        await migrate(conn, [m for m in load_migrations() if m.name[:4] <= "0017"], functions=[])
        seeded = await seed_0017(conn)
        await migrate(conn)
        yield conn, seeded
    finally:
        await conn.close()


async def get_job(conn: Conn, job_id: int) -> dict[str, Any]:
    return dict(await conn.fetchrow("SELECT * FROM aiservice.get_job($1)", job_id))


async def where_is(conn: Conn, job_id: int) -> tuple[int, int]:
    """How many rows of the job aiservice.jobs and aiservice.job_history hold."""
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM aiservice.jobs WHERE id = $1) AS live,"
        " (SELECT count(*) FROM aiservice.job_history WHERE id = $1) AS history",
        job_id,
    )
    return row["live"], row["history"]


async def totals(conn: Conn) -> dict[str, int]:
    """Jobs per status, counted in the rows themselves (both tables)."""
    counted = {
        r["status"]: r["n"]
        for r in await conn.fetch("SELECT status::text, count(*) AS n FROM aiservice.all_jobs GROUP BY 1")
    }
    return {s: counted.get(s, 0) for s in ("pending", "running", "completed", "failed", "cancelled")}


async def refused(conn: Conn, sqlstate: str, sql: str, *args: Any) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as info:
        await conn.execute(sql, *args)
    assert info.value.sqlstate == sqlstate, f"{info.value.sqlstate}: {info.value}"
    return info.value


def same_columns(got: dict[str, Any], before: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The columns whose values differ, as (before, got); a column gone counts as differing."""
    return {k: (v, got.get(k, "<missing>")) for k, v in before.items() if got.get(k, "<missing>") != v}


async def test_every_job_is_kept_once_with_the_same_values(upgraded: tuple[Conn, Seeded]) -> None:
    conn, seeded = upgraded
    for job_id, before in seeded.jobs.items():
        assert same_columns(await get_job(conn, job_id), before) == {}, f"job {job_id} ({before['owner_ref']})"

    every = await conn.fetch("SELECT * FROM aiservice.all_jobs")
    assert sorted(r["id"] for r in every) == sorted(seeded.jobs), "all_jobs holds each job exactly once"
    for r in every:
        assert same_columns(dict(r), seeded.jobs[r["id"]]) == {}, f"all_jobs row of job {r['id']}"

    live = sorted(r["id"] for r in await conn.fetch("SELECT id FROM aiservice.jobs"))
    history = {
        r["id"]: r
        for r in await conn.fetch("SELECT id, finished_at, tableoid::regclass::text AS part FROM aiservice.job_history")
    }
    assert live == sorted(i for i, j in seeded.jobs.items() if j["status"] in LIVE)
    assert sorted(history) == sorted(i for i, j in seeded.jobs.items() if j["status"] in FINISHED)
    today = datetime.now(UTC).strftime("%Y%m%d")
    for job_id, r in history.items():
        day = r["finished_at"].astimezone(UTC).strftime("%Y%m%d")
        part = r["part"].removeprefix("aiservice.")
        # Finished before today: the upgrade's own partition; today: a day partition or the default.
        expected = ("job_history_before",) if day < today else (f"job_history_p{day}", "job_history_default")
        assert part in expected, f"job {job_id} finished {day} is in {part}"

    keys = {
        (r["owner_service"], r["idempotency_key"], r["job_id"])
        for r in await conn.fetch("SELECT owner_service, idempotency_key, job_id FROM aiservice.job_keys")
    }
    assert keys == {
        (j["owner_service"], j["idempotency_key"], i)
        for i, j in seeded.jobs.items()
        if j["idempotency_key"] is not None
    }

    # Lists read both tables, newest first, in pages as before.
    listed = [dict(r) for r in await conn.fetch("SELECT * FROM aiservice.list_jobs(p_limit => NULL)")]
    assert [r["id"] for r in listed] == sorted(seeded.jobs, reverse=True)
    assert all(same_columns(r, seeded.jobs[r["id"]]) == {} for r in listed)
    pages: list[int] = []
    before_id = None
    while True:
        page = await conn.fetch(
            "SELECT id FROM aiservice.list_jobs(p_owner_service => $1, p_statuses => '{failed,cancelled,running}',"
            " p_before_id => $2, p_limit => 3)",
            OWNER,
            before_id,
        )
        if not page:
            break
        pages += [r["id"] for r in page]
        before_id = page[-1]["id"]
    assert pages == sorted(
        (i for i, j in seeded.jobs.items() if j["status"] in {"failed", "cancelled", "running"}), reverse=True
    )
    in_batch = await conn.fetch(
        "SELECT id FROM aiservice.list_jobs(p_batch_ids => $1)", [seeded.batches["in_progress"]]
    )
    assert sorted(r["id"] for r in in_batch) == sorted(
        i for i, j in seeded.jobs.items() if j["batch_id"] == seeded.batches["in_progress"]
    )


CREATE_AGAIN = """
    SELECT c.created, (c.job).* FROM aiservice.create_job(
        p_owner_service => $1, p_owner_ref => $2, p_task_type => $3, p_model_profile => $4, p_input => $5,
        p_priority => $6, p_max_attempts => $7, p_idempotency_key => $8) c
"""


def request_of(job: dict[str, Any]) -> list[Any]:
    """create_job's arguments for the request that made this job (CREATE_AGAIN's parameters)."""
    return [
        job["owner_service"],
        job["owner_ref"],
        job["task_type"],
        job["model_profile"],
        job["input"],
        job["priority"],
        job["max_attempts"],
        job["idempotency_key"],
    ]


async def test_idempotency_keys_answer_across_the_split(upgraded: tuple[Conn, Seeded]) -> None:
    conn, seeded = upgraded
    for name in ("pending_keyed", "completed_1d", "failed_1d"):
        before = seeded.jobs[seeded.ids[name]]
        again = dict(await conn.fetchrow(CREATE_AGAIN, *request_of(before)))
        assert again.pop("created") is False, name
        assert same_columns(again, before) == {}, name

        error = await refused(conn, "AS412", CREATE_AGAIN, *request_of(before | {"input": {"user": "another call"}}))
        assert f"names job {before['id']}" in str(error), error

    # A batch repeating a finished keyed job and creating a new one: the repeat answers the old job.
    done = seeded.jobs[seeded.ids["batch_completed"]]
    answered = await conn.fetch(
        "SELECT c.created, (c.job).id FROM aiservice.create_jobs($1) c",
        [
            {
                k: done[k]
                for k in ("owner_service", "owner_ref", "task_type", "model_profile", "input", "idempotency_key")
            },
            {
                "owner_service": OWNER,
                "owner_ref": "beeline/new",
                "task_type": "llm_chat",
                "model_profile": "qwen2.5-14b",
                "idempotency_key": "beeline/new/analysis",
            },
        ],
    )
    assert [r["created"] for r in answered] == [False, True]
    assert answered[0]["id"] == done["id"]
    new_id = answered[1]["id"]
    assert new_id > max(seeded.jobs), "new ids come after every old one"
    assert await where_is(conn, new_id) == (1, 0)
    assert (
        await conn.fetchval(
            "SELECT job_id FROM aiservice.job_keys WHERE owner_service = $1 AND idempotency_key = $2",
            OWNER,
            "beeline/new/analysis",
        )
        == new_id
    )
    error = await refused(
        conn,
        "AS412",
        "SELECT (c.job).id FROM aiservice.create_jobs($1) c",
        [
            {
                "owner_service": OWNER,
                "owner_ref": "beeline/other",
                "task_type": "llm_chat",
                "model_profile": "qwen2.5-14b",
                "idempotency_key": done["idempotency_key"],
            }
        ],
    )
    assert f"names job {done['id']}" in str(error), error


async def test_batches_dependencies_and_deliveries_keep_working(upgraded: tuple[Conn, Seeded]) -> None:
    conn, seeded = upgraded
    ids, batches = seeded.ids, seeded.batches
    for name, batch_id in batches.items():
        got = await conn.fetchval("SELECT aiservice.get_batch($1)", batch_id)
        counts = seeded.batch_counts[name]
        assert got["counts"] == {
            k: counts[k] for k in ("total", "pending", "running", "completed", "failed", "cancelled")
        }, name
        assert got["status"] == ("finished" if counts["finished_at"] else "in_progress"), name
    listed = await conn.fetch("SELECT b FROM aiservice.list_batches($1) b", OWNER)
    assert [r["b"]["id"] for r in listed] == sorted(batches.values(), reverse=True)

    deliveries = [
        dict(r) for r in await conn.fetch("SELECT * FROM aiservice.list_deliveries($1, p_limit => 100)", OWNER)
    ]
    assert deliveries == seeded.deliveries[::-1]
    retrying = await conn.fetch("SELECT id, job_id FROM aiservice.list_deliveries($1, 'retrying')", OWNER)
    assert [r["job_id"] for r in retrying] == [ids["batch_completed"]]

    # The blocked job waits for a completed job (now in history) and a running one (live).
    deps = await conn.fetchval("SELECT aiservice.list_dependencies($1)", ids["blocked"])
    assert [(d["id"], d["status"]) for d in deps["depends_on"]] == [
        (ids["completed_3d"], "completed"),
        (ids["running"], "running"),
    ]
    dependents = await conn.fetchval("SELECT aiservice.list_dependencies($1)", ids["completed_3d"])
    assert [d["id"] for d in dependents["dependents"]] == [ids["blocked"]]
    assert await conn.fetch("SELECT id FROM aiservice.claim_jobs('worker-x', 10, '{summarize}')") == []

    lease = seeded.leases["running"]
    done = await conn.fetchrow(
        "SELECT * FROM aiservice.complete_job($1, 'worker-b', $2, $3)", ids["running"], {"text": "transcript"}, lease
    )
    assert done["status"] == "completed"
    assert await where_is(conn, ids["running"]) == (0, 1)
    claimed = await conn.fetch(
        "SELECT to_jsonb(c.job) AS job, c.dependencies FROM aiservice.claim_jobs_v2('worker-x', 10, '{summarize}') c"
    )
    assert [r["job"]["id"] for r in claimed] == [ids["blocked"]], "unblocked once its running dependency completed"
    assert [(d["id"], d["status"], d["result"]) for d in claimed[0]["dependencies"]] == [
        (ids["completed_3d"], "completed", seeded.jobs[ids["completed_3d"]]["result"]),
        (ids["running"], "completed", {"text": "transcript"}),
    ]
    assert (await get_job(conn, ids["blocked"]))["status"] == "running"

    # The outbox: jobs finished before and after the upgrade are sent with their data read now.
    sent = await conn.fetch("SELECT * FROM aiservice.claim_deliveries_v2(50, interval '1 minute', 50)")
    by_job = {r["job"]["id"]: r for r in sent if r["event"] == "job.finished"}
    # (the claims expired running_expired's lease: it failed, and is queued too)
    finished = ("completed_now", "batch_completed", "running", "running_expired")
    assert sorted(by_job) == sorted(ids[n] for n in finished)
    for job_id, r in by_job.items():
        now = await get_job(conn, job_id)
        assert (r["job"]["status"], r["job"]["result"]) == (str(now["status"]), now["result"]), job_id
        assert (r["url"], r["secret"]) == (WEBHOOK_URL, "whsec-0123456789abcdef")

    # Live jobs of the batch in progress: claimed and completed, then the batch cancelled.
    claimed_ids = sorted(
        r["id"] for r in await conn.fetch("SELECT id FROM aiservice.claim_jobs('worker-y', 10, '{llm_chat}')")
    )
    assert claimed_ids == sorted([ids["pending"], ids["pending_keyed"], ids["batch_pending"]])
    outcomes = await conn.fetch(
        "SELECT * FROM aiservice.complete_jobs('worker-y', $1, $2)", claimed_ids, [{"n": i} for i in claimed_ids]
    )
    assert [r["outcome"] for r in outcomes] == ["completed"] * 3
    assert [await where_is(conn, i) for i in claimed_ids] == [(0, 1)] * 3
    batch = await conn.fetchval("SELECT aiservice.get_batch($1)", batches["in_progress"])
    assert batch["counts"] == {"total": 4, "pending": 0, "running": 1, "completed": 2, "failed": 1, "cancelled": 0}
    batch = await conn.fetchval("SELECT aiservice.cancel_batch($1)", batches["in_progress"])
    assert batch["counts"] == {"total": 4, "pending": 0, "running": 0, "completed": 2, "failed": 1, "cancelled": 1}
    assert batch["status"] == "finished"
    assert await where_is(conn, ids["batch_running"]) == (0, 1)
    events = await conn.fetch(
        "SELECT event, job_id, batch_id FROM aiservice.list_deliveries($1, 'pending', p_limit => 100)", OWNER
    )
    assert ("batch.finished", None, batches["in_progress"]) in [tuple(r) for r in events]


async def test_retry_statistics_and_maintenance_after_the_upgrade(upgraded: tuple[Conn, Seeded]) -> None:
    conn, seeded = upgraded
    ids = seeded.ids
    stats = await conn.fetchval("SELECT aiservice.stats()")
    assert (
        stats["totals"]
        == await totals(conn)
        == {s: seeded.by_status().get(s, 0) for s in ("pending", "running", "completed", "failed", "cancelled")}
    )
    by_kind = Counter((str(j["status"]), j["task_type"], j["model_profile"]) for j in seeded.jobs.values())
    assert {(r["status"], r["task_type"], r["model_profile"]): r["count"] for r in stats["by_status"]} == by_kind
    recent = Counter(
        j["task_type"]
        for j in seeded.jobs.values()
        if j["finished_at"] and j["started_at"] and j["finished_at"] >= seeded.now - timedelta(hours=1)
    )
    assert {r["task_type"]: r["count"] for r in stats["latency"]} == recent
    assert {r["worker_id"]: r["count"] for r in stats["running_by_worker"]} == Counter(
        j["worker_id"] for j in seeded.jobs.values() if j["status"] == "running"
    )

    retried = await conn.fetchrow("SELECT * FROM aiservice.retry_job($1)", ids["failed_1d"])
    assert (retried["status"], retried["attempts"], retried["error_category"]) == ("pending", 0, None)
    assert await where_is(conn, ids["failed_1d"]) == (1, 0)
    # Retried while its dependency stays cancelled: blocked again, then failed again by maintain().
    again = await conn.fetchrow("SELECT * FROM aiservice.retry_job($1)", ids["failed_dependency"])
    assert (again["status"], again["blocked"]) == ("pending", True)
    await refused(conn, "AS409", "SELECT (aiservice.retry_job($1)).id", ids["completed_1d"])

    ran = await conn.fetchval("SELECT aiservice.maintain()")
    assert ran["ran"] is True and ran["errors"] == {}, ran
    # maintain() made today's partition: the jobs that finished today, before the upgrade or since, are in it.
    today = await conn.fetchval("SELECT 'aiservice.job_history_p' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')")
    finished_today = await conn.fetch(
        "SELECT id, tableoid::regclass::text AS part FROM aiservice.job_history"
        " WHERE finished_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
    )
    assert ids["running_expired"] in {r["id"] for r in finished_today}  # failed by this pass
    assert {r["part"] for r in finished_today} == {today}
    expired = await get_job(conn, ids["running_expired"])
    assert (expired["status"], expired["error_category"]) == ("failed", "lease_expired")
    assert await where_is(conn, ids["running_expired"]) == (0, 1)
    refailed = await get_job(conn, ids["failed_dependency"])
    assert (refailed["status"], refailed["error_category"]) == ("failed", "dependency_failed")
    assert refailed["error_message"] == f"dependency {ids['cancelled_3d']} is cancelled"
    assert await where_is(conn, ids["failed_dependency"]) == (0, 1)
    assert (await conn.fetchval("SELECT aiservice.stats()"))["totals"] == await totals(conn)

    # Retention retires the jobs older than it, and only those, however the upgrade stored them.
    ran = await conn.fetchval("SELECT aiservice.maintain(p_retention => interval '30 days')")
    assert ran["ran"] is True and ran["errors"] == {}, ran
    old = {ids["completed_40d"], ids["cancelled_40d"]}
    for job_id in seeded.jobs:
        if job_id in old:
            await refused(conn, "AS404", "SELECT (aiservice.get_job($1)).id", job_id)
        else:
            await get_job(conn, job_id)
    kept = await conn.fetch("SELECT job_id FROM aiservice.list_deliveries($1, p_limit => 100)", OWNER)
    assert ids["completed_40d"] not in {r["job_id"] for r in kept}
    assert (await conn.fetchval("SELECT aiservice.stats()"))["totals"] == await totals(conn)
