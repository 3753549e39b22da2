"""What every function shares (schema/functions/common.sql): the status enum, backoff, and the guard: bad
arguments refused with documented SQLSTATEs, changing nothing."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import asyncpg
from sqlapi import Conn, q, refused_statement

from aiservice.db.store import JobStore
from aiservice.jobs import JobStatus


async def test_python_status_enum_equals_the_sql_enum(store: JobStore) -> None:
    assert await store.statuses() == [s.value for s in JobStatus]


async def test_backoff_function_bounds_and_jitter(conn: Conn) -> None:
    for attempts, base in [(0, 10), (1, 10), (2, 20), (4, 80), (12, 3600), (100, 3600), (10_000, 3600)]:
        seconds = [
            r[0]
            for r in await conn.fetch(
                "SELECT extract(epoch FROM aiservice.backoff($1))::float8 FROM generate_series(1, 200)", attempts
            )
        ]
        assert base * 0.75 <= min(seconds) <= max(seconds) <= base * 1.25, attempts
        assert max(seconds) - min(seconds) > base * 0.1, "no jitter"


# --- A caller reaching PostgreSQL directly through the SQL API cannot corrupt state.
#
# Each function is called with what a careless or hostile caller might pass: NULLs, negative or infinite values, bad
# categories, wrong or missing lease tokens, fields that are not arguments. Every call is refused with a documented
# SQLSTATE (AS404/AS409/AS410/AS422, or a check violation, which the API answers 422 as well), and afterwards every
# job is exactly as it was.


CHECK = "23514"


NOT_NULL = "23502"


async def snapshot(conn: Conn) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch("SELECT * FROM aiservice.all_jobs ORDER BY id")]


async def running_job(conn: Conn) -> asyncpg.Record:
    await conn.fetch(q("SELECT * FROM aiservice.create_job('guard', 'running', 'guard_t', 'm')"))
    rows = await conn.fetch("SELECT * FROM aiservice.claim_jobs('w1', 1, ARRAY['guard_t'])")
    job: asyncpg.Record = rows[0]
    return job


async def test_bad_arguments_are_refused_with_documented_sqlstates_and_change_nothing(conn: Conn) -> None:
    await conn.fetch(q("SELECT * FROM aiservice.create_job('guard', 'done', 'other', 'm')"))
    (finished,) = await conn.fetch("SELECT * FROM aiservice.claim_jobs('w0', 1, ARRAY['other'])")
    await conn.fetch(
        "SELECT * FROM aiservice.complete_job($1, 'w0', '{}'::jsonb, $2)", finished["id"], finished["lease_token"]
    )
    job = await running_job(conn)
    jid, token = job["id"], job["lease_token"]
    await conn.fetch(q("SELECT * FROM aiservice.create_job('guard', 'pending', 'guard_p', 'm')"))
    before = await snapshot(conn)

    cases: list[tuple[str, str, tuple[Any, ...]]] = [
        # create_job: required fields, bounds, input shape, times.
        (NOT_NULL, "SELECT * FROM aiservice.create_job(NULL, 'r', 't', 'm')", ()),
        (NOT_NULL, "SELECT * FROM aiservice.create_job('s', NULL, 't', 'm')", ()),
        (CHECK, "SELECT * FROM aiservice.create_job('', 'r', 't', 'm')", ()),
        (CHECK, "SELECT * FROM aiservice.create_job('s', 'r', repeat('t', 201), 'm')", ()),
        ("AS422", "SELECT * FROM aiservice.create_job('s', 'r', 't', 'm', NULL)", ()),
        ("AS422", "SELECT * FROM aiservice.create_job('s', 'r', 't', 'm', '[1]')", ()),
        ("AS422", "SELECT * FROM aiservice.create_job('s', 'r', 't', 'm', '\"text\"')", ()),
        (CHECK, "SELECT * FROM aiservice.create_job('s', 'r', 't', 'm', '{}', -1001)", ()),
        (CHECK, "SELECT * FROM aiservice.create_job('s', 'r', 't', 'm', '{}', 1001)", ()),
        (CHECK, "SELECT * FROM aiservice.create_job('s', 'r', 't', 'm', '{}', 0, NULL, 0)", ()),
        (CHECK, "SELECT * FROM aiservice.create_job('s', 'r', 't', 'm', '{}', 0, NULL, -3)", ()),
        (CHECK, "SELECT * FROM aiservice.create_job('s', 'r', 't', 'm', '{}', 0, NULL, 101)", ()),
        (CHECK, "SELECT * FROM aiservice.create_job('s', 'r', 't', 'm', '{}', 0, '-infinity')", ()),
        (CHECK, "SELECT * FROM aiservice.create_job('s', 'r', 't', 'm', '{}', 0, 'infinity')", ()),
        (CHECK, "SELECT * FROM aiservice.create_job('s', 'r', 't', 'm', '{}', 0, NULL, 3, '')", ()),
        # create_jobs: shapes, and all-or-nothing when one job is bad.
        ("AS422", "SELECT * FROM aiservice.create_jobs(NULL)", ()),
        ("AS422", "SELECT * FROM aiservice.create_jobs('{}')", ()),
        ("AS422", "SELECT * FROM aiservice.create_jobs('[1]')", ()),
        ("AS422", "SELECT * FROM aiservice.create_jobs('[]', NULL)", ()),
        ("AS422", "SELECT * FROM aiservice.create_jobs('[{\"input\": [1]}]')", ()),
        (
            CHECK,
            'SELECT * FROM aiservice.create_jobs(\'[{"owner_ref": "a"}, {"owner_ref": "b", "priority": 5000}]\','
            ' \'{"owner_service": "s", "task_type": "t", "model_profile": "m"}\')',
            (),
        ),
        (
            CHECK,
            'SELECT * FROM aiservice.create_jobs(\'[{"run_at": "-infinity"}]\','
            ' \'{"owner_service": "s", "owner_ref": "r", "task_type": "t", "model_profile": "m"}\')',
            (),
        ),
        (NOT_NULL, 'SELECT * FROM aiservice.create_jobs(\'[{"owner_ref": "a"}]\')', ()),
        # claim_jobs: worker id, limit, lease.
        ("AS422", "SELECT * FROM aiservice.claim_jobs(NULL)", ()),
        ("AS422", "SELECT * FROM aiservice.claim_jobs('')", ()),
        ("AS422", "SELECT * FROM aiservice.claim_jobs(repeat('w', 201))", ()),
        ("AS422", "SELECT * FROM aiservice.claim_jobs('w2', NULL)", ()),
        ("AS422", "SELECT * FROM aiservice.claim_jobs('w2', 0)", ()),
        ("AS422", "SELECT * FROM aiservice.claim_jobs('w2', -5)", ()),
        ("AS422", "SELECT * FROM aiservice.claim_jobs('w2', 1001)", ()),
        ("AS422", "SELECT * FROM aiservice.claim_jobs('w2', 1, NULL, NULL, NULL)", ()),
        ("AS422", "SELECT * FROM aiservice.claim_jobs('w2', 1, NULL, NULL, interval '-1 second')", ()),
        ("AS422", "SELECT * FROM aiservice.claim_jobs('w2', 1, NULL, NULL, interval '0')", ()),
        # The running job: wrong worker, wrong or made-up token, NULLs.
        ("AS410", "SELECT * FROM aiservice.complete_job($1, 'intruder', '{}')", (jid,)),
        ("AS410", "SELECT * FROM aiservice.complete_job($1, NULL, '{}')", (jid,)),
        ("AS410", "SELECT * FROM aiservice.complete_job($1, 'w1', '{}', $2)", (jid, uuid4())),
        ("AS422", "SELECT * FROM aiservice.complete_job($1, 'w1', NULL, $2)", (jid, token)),
        ("AS422", "SELECT * FROM aiservice.complete_job($1, 'w1', '[]', $2)", (jid, token)),
        ("AS422", "SELECT * FROM aiservice.complete_job($1, 'w1', '\"done\"', $2)", (jid, token)),
        ("AS404", "SELECT * FROM aiservice.complete_job(NULL, 'w1', '{}')", ()),
        ("AS404", "SELECT * FROM aiservice.complete_job(-1, 'w1', '{}')", ()),
        (
            "AS410",
            "SELECT * FROM aiservice.complete_job($1, 'w0', '{\"again\": 1}', $2)",
            (finished["id"], finished["lease_token"]),
        ),
        ("AS422", "SELECT * FROM aiservice.fail_job($1, 'w1', NULL)", (jid,)),
        ("AS422", "SELECT * FROM aiservice.fail_job($1, 'w1', '')", (jid,)),
        ("AS422", "SELECT * FROM aiservice.fail_job($1, 'w1', 'Timeout')", (jid,)),
        ("AS422", "SELECT * FROM aiservice.fail_job($1, 'w1', 'x''; DROP TABLE aiservice.jobs; --')", (jid,)),
        ("AS422", "SELECT * FROM aiservice.fail_job($1, 'w1', repeat('a', 65))", (jid,)),
        ("AS422", "SELECT * FROM aiservice.fail_job($1, 'w1', 'timeout', NULL, NULL, interval '-1 second')", (jid,)),
        ("AS422", "SELECT * FROM aiservice.fail_job($1, 'w1', 'timeout', NULL, NULL, interval '8 days')", (jid,)),
        ("AS410", "SELECT * FROM aiservice.fail_job($1, 'intruder', 'timeout')", (jid,)),
        ("AS410", "SELECT * FROM aiservice.fail_job($1, 'w1', 'timeout', NULL, NULL, NULL, $2)", (jid, uuid4())),
        ("AS422", "SELECT aiservice.heartbeat_job($1, 'w1', NULL)", (jid,)),
        ("AS422", "SELECT aiservice.heartbeat_job($1, 'w1', interval '-1 minute')", (jid,)),
        ("AS410", "SELECT aiservice.heartbeat_job($1, 'intruder')", (jid,)),
        ("AS410", "SELECT aiservice.heartbeat_job($1, 'w1', interval '1 minute', $2)", (jid, uuid4())),
        ("AS410", "SELECT * FROM aiservice.release_job($1, 'intruder')", (jid,)),
        ("AS410", "SELECT * FROM aiservice.release_job($1, 'w1', $2)", (jid, uuid4())),
        ("AS404", "SELECT * FROM aiservice.release_job(NULL, 'w1')", ()),
        # Bulk actions need a filter; the status narrowing is checked.
        ("AS422", "SELECT * FROM aiservice.cancel_jobs()", ()),
        ("AS422", "SELECT * FROM aiservice.cancel_jobs(p_all => NULL)", ()),
        ("AS422", "SELECT * FROM aiservice.cancel_jobs(p_statuses => '{completed}')", ()),
        ("AS422", "SELECT * FROM aiservice.retry_jobs()", ()),
        ("AS422", "SELECT * FROM aiservice.retry_jobs(p_statuses => '{pending,completed}')", ()),
        ("AS409", "SELECT * FROM aiservice.cancel_job($1)", (finished["id"],)),
        ("AS409", "SELECT * FROM aiservice.retry_job($1)", (finished["id"],)),
        ("AS404", "SELECT * FROM aiservice.cancel_job(NULL)", ()),
        ("AS404", "SELECT * FROM aiservice.retry_job(9223372036854775807)", ()),
        ("AS404", "SELECT * FROM aiservice.get_job(NULL)", ()),
        # Reading with a negative limit is refused (never "no limit").
        ("AS422", "SELECT * FROM aiservice.list_jobs(p_limit => -1)", ()),
        # Enum and type checks on the way in.
        ("22P02", "SELECT * FROM aiservice.list_jobs(p_statuses => '{bogus}')", ()),
        ("22P02", "SELECT * FROM aiservice.cancel_jobs(p_statuses => '{bogus}')", ()),
    ]
    for sqlstate, sql, args in cases:
        await refused_statement(conn, sqlstate, sql, *args)
    assert await snapshot(conn) == before
    # What is refused inside a batch leaves no row behind.
    assert await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs") == len(before)
