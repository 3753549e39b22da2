"""The row triggers on aiservice.jobs and job_history (schema/functions/triggers.sql)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlapi import Conn, claim_tokens

# --- The row triggers on aiservice.jobs: work linear in the rows a statement changes, whatever the session did
# before.
#
# PL/pgSQL keeps a statement's plan for the session; a plan made for a one-row transition table joins a large one by
# nested loop. These tests count the rows every plan node produced, as the executor counted them (auto_explain with
# log_analyze, sent to the client), and compare the sum with a bound linear in the rows changed.


JOB = {"owner_service": "telephony", "task_type": "llm_chat", "model_profile": "qwen2.5-14b"}


def rows_produced(node: dict[str, Any]) -> int:
    """Rows produced by a plan node and everything under it, over all its loops."""
    own = int(node.get("Actual Rows", 0)) * int(node.get("Actual Loops", 1))
    return own + sum(rows_produced(child) for child in node.get("Plans", ()))


async def counting_rows(conn: Conn) -> list[dict[str, Any]]:
    """Send the plan of every statement, nested ones (triggers) included, to this connection."""
    if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("LOAD 'auto_explain' needs a superuser")
    plans: list[dict[str, Any]] = []

    def heard(_conn: object, message: Any) -> None:
        text = str(message.message)
        if "plan:" in text:
            plans.append(json.loads(text[text.index("{") :]))

    conn.add_log_listener(heard)
    await conn.execute(
        """
        LOAD 'auto_explain';
        SET auto_explain.log_min_duration = 0;
        SET auto_explain.log_analyze = on;
        SET auto_explain.log_timing = off;
        SET auto_explain.log_nested_statements = on;
        SET auto_explain.log_format = json;
        SET client_min_messages = log;
        """
    )
    return plans


async def test_a_large_cancel_after_a_one_row_update_reads_rows_linearly(conn: Conn) -> None:
    n = 10_000
    await conn.fetch("SELECT 1 FROM aiservice.create_jobs($1, $2)", [{"owner_ref": f"call/{i}"} for i in range(n)], JOB)
    batch = await conn.fetchval("SELECT max(id) FROM aiservice.batches")
    (other,) = await conn.fetch("SELECT (j.job).id FROM aiservice.create_jobs($1, $2) j", [{"owner_ref": "x"}], JOB)
    # One ordinary one-row update first, in the same session: every trigger plans its statements.
    await conn.fetch("SELECT 1 FROM aiservice.cancel_job($1)", other["id"])

    plans = await counting_rows(conn)
    async with conn.transaction():
        counts = json.loads(await conn.fetchval("SELECT aiservice.cancel_batch($1)::text", batch))["counts"]
    await conn.execute("SET client_min_messages = notice; SET auto_explain.log_min_duration = -1")
    assert counts["cancelled"] == n

    read = sum(rows_produced(p["Plan"]) for p in plans)
    assert len(plans) > 5, "the triggers' statements were not counted"
    # Linear: at most 100 rows per job over all the triggers' plans; a nested loop over the
    # transition tables alone would produce n * n (100,000,000).
    assert read < 100 * n, f"{read} rows produced for {n} jobs"


TRIGGERS_SQL = Path(__file__).resolve().parents[2] / "schema" / "functions" / "triggers.sql"


EVENTS = {4: "INSERT", 8: "DELETE", 16: "UPDATE"}  # pg_trigger.tgtype bits


TABLES = ("jobs", "job_history")


async def jobs_triggers(conn: Conn, table: str = "jobs") -> list[tuple[str, str, str, bool]]:
    """(name, event, function, statement level and AFTER) of every trigger on aiservice.<table>."""
    rows = await conn.fetch(
        """
        SELECT t.tgname, t.tgtype, p.proname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
        WHERE t.tgrelid = ('aiservice.' || $1)::regclass AND NOT t.tgisinternal ORDER BY t.tgname
        """,
        table,
    )
    out = []
    for r in rows:
        kind = r["tgtype"]
        for bit, event in EVENTS.items():
            if kind & bit:
                out.append((r["tgname"], event, r["proname"], kind & 1 == 0 and kind & 2 == 0 and kind & 64 == 0))
    return out


async def test_one_after_statement_trigger_per_event_on_jobs(conn: Conn) -> None:
    triggers = await jobs_triggers(conn)
    for event in EVENTS.values():
        on_event = [t for t in triggers if t[1] == event]
        assert len(on_event) == 1, f"{event}: {on_event}"
        assert on_event[0][3], f"{on_event[0][0]} is not an AFTER ... FOR EACH STATEMENT trigger"


async def test_job_history_has_one_after_statement_trigger_per_write_it_sees(conn: Conn) -> None:
    """Finished jobs are inserted (finishing) and deleted (retry, retention); never updated."""
    triggers = await jobs_triggers(conn, "job_history")
    assert sorted(t[1] for t in triggers) == ["DELETE", "INSERT"]
    assert all(t[3] for t in triggers), triggers


async def test_an_update_statement_calls_one_trigger_function(conn: Conn) -> None:
    """Counted by the server (track_functions): a claim and a plain update of jobs each call the
    trigger functions once in all; a batched completion twice (it moves the jobs: one delete from
    jobs, one insert into job_history)."""
    if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("SET track_functions needs a superuser")
    await conn.execute("SET track_functions = 'pl'")
    await conn.fetch("SELECT 1 FROM aiservice.create_jobs($1, $2)", [{"owner_ref": f"r/{i}"} for i in range(5)], JOB)
    functions = sorted({t[2] for table in TABLES for t in await jobs_triggers(conn, table)})
    calls = "SELECT sum(pg_stat_get_xact_function_calls(('aiservice.' || f)::regproc)) FROM unnest($1::text[]) f"
    async with conn.transaction():
        before = await conn.fetchval(calls, functions) or 0
        claimed = await conn.fetch("SELECT id, lease_token FROM aiservice.claim_jobs('w', 5)")
        after_claim = await conn.fetchval(calls, functions)
        await conn.execute("UPDATE aiservice.jobs SET updated_at = now() WHERE id = $1", claimed[0]["id"])
        after_update = await conn.fetchval(calls, functions)
        done = await conn.fetch(
            "SELECT outcome FROM aiservice.complete_jobs('w', $1, $2, $3)",
            [r["id"] for r in claimed],
            [{"ok": True}] * len(claimed),
            [r["lease_token"] for r in claimed],
        )
        after_complete = await conn.fetchval(calls, functions)
    assert [r["outcome"] for r in done] == ["completed"] * 5
    assert (after_claim - before, after_update - after_claim, after_complete - after_update) == (1, 1, 2)


async def test_the_trigger_list_in_triggers_sql_is_pg_trigger(conn: Conn) -> None:
    """The header of schema/functions/triggers.sql lists every trigger on jobs and job_history:
    name, event, table, function."""
    documented = set()
    for line in TRIGGERS_SQL.read_text(encoding="utf-8").splitlines():
        if not line.startswith("--"):
            break
        match = re.match(r"--\s+(\w+)\s+AFTER (INSERT|UPDATE|DELETE) ON (\w+)\s+(\w+)\(\)", line)
        if match:
            documented.add(match.groups())
    actual = {
        (name, event, table, function)
        for table in TABLES
        for name, event, function, _ in await jobs_triggers(conn, table)
    }
    assert len(actual) == 5
    assert documented == actual


# --- Live jobs apart from history: a finished job leaves aiservice.jobs for aiservice.job_history (partitioned by
# day), a retry brings it back, retention drops whole day partitions, and every read answers as if there were one
# table.


JOB_SPEC = {"owner_service": "telephony", "task_type": "llm_chat", "model_profile": "qwen"}


async def new_jobs(conn: Conn, n: int, **fields: Any) -> list[int]:
    rows = await conn.fetch(
        "SELECT (j.job).id FROM aiservice.create_jobs($1, $2) j",
        [{"owner_ref": f"call/{i}"} | fields for i in range(n)],
        JOB_SPEC,
    )
    return [r["id"] for r in rows]


async def complete(conn: Conn, claimed: list[asyncpg.Record]) -> list[str]:
    rows = await conn.fetch(
        "SELECT outcome FROM aiservice.complete_jobs('w', $1, $2, $3)",
        [r["id"] for r in claimed],
        [{"text": f"result {r['id']}", "usage": {"total_tokens": 7}} for r in claimed],
        [r["lease_token"] for r in claimed],
    )
    return [r["outcome"] for r in rows]


async def test_counts_and_batch_counts_follow_the_moves(conn: Conn) -> None:
    ids = await new_jobs(conn, 4, max_attempts=1)
    batch = await conn.fetchval("SELECT batch_id FROM aiservice.jobs WHERE id = $1", ids[0])
    claimed = await claim_tokens(conn)
    await complete(conn, claimed[:2])
    await conn.execute("SELECT 1 FROM aiservice.fail_job($1, 'w', 'invalid_input', p_retryable => false)", ids[2])
    await conn.execute("SELECT 1 FROM aiservice.retry_job($1)", ids[2])
    await conn.execute("SELECT 1 FROM aiservice.cancel_job($1)", ids[3])
    counts = json.loads(await conn.fetchval("SELECT aiservice.get_batch($1)::text", batch))["counts"]
    assert counts == {"total": 4, "pending": 1, "running": 0, "completed": 2, "failed": 0, "cancelled": 1}
    stats = json.loads(await conn.fetchval("SELECT aiservice.stats()::text"))
    assert {k: v for k, v in stats["totals"].items() if v} == {"pending": 1, "completed": 2, "cancelled": 1}
    assert stats["created"] == [
        {"task_type": "llm_chat", "model_profile": "qwen", "count": 4}
    ]  # a retry is no creation
