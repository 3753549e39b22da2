"""The row triggers on aiservice.jobs: work linear in the rows a statement changes, whatever the
session did before.

PL/pgSQL keeps a statement's plan for the session; a plan made for a one-row transition table
joins a large one by nested loop. These tests count the rows every plan node produced, as the
executor counted them (auto_explain with log_analyze, sent to the client), and compare the sum
with a bound linear in the rows changed."""

from __future__ import annotations

import json
from typing import Any, TypeAlias

import asyncpg
import pytest

Conn: TypeAlias = "asyncpg.Connection[Any]"

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
