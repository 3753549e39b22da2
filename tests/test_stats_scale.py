"""The statistics path with a million jobs kept: no read may grow with the table.

Counted, not timed: PostgreSQL's own per-table counters say how many rows each call read."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg

Conn: TypeAlias = "asyncpg.Connection[Any]"

MILLION = 1_000_000

FILL = """
INSERT INTO aiservice.job_history (id, owner_service, owner_ref, task_type, model_profile, status, attempts,
                                   worker_id, result, created_at, started_at, finished_at, run_at)
SELECT nextval('aiservice.jobs_id_seq'), 'bulk', 'r' || i, 'llm_chat', 'qwen', 'completed', 1, 'w', '{}',
       now() - interval '3 hours', now() - interval '3 hours', now() - interval '2 hours' + i * interval '1 ms',
       now() - interval '3 hours'
FROM generate_series(1, $1) i
"""

# Live and finished jobs: aiservice.jobs and every partition of aiservice.job_history.
READS = """
SELECT sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)) AS rows_read
FROM pg_stat_user_tables
WHERE relid = 'aiservice.jobs'::regclass
   OR relid IN (SELECT relid FROM pg_partition_tree('aiservice.job_history') WHERE isleaf)
"""


async def rows_read(conn: Conn) -> int:
    # Flush this backend's counters, then read them afresh.
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    value = int(await conn.fetchval(READS))
    return value


async def test_stats_and_filtered_lists_read_little_of_a_million_jobs(conn: Conn) -> None:
    await conn.execute("SELECT aiservice.prepare_history(0)")  # today's partition: the million go there
    await conn.execute(FILL, MILLION)
    await conn.fetch(
        "SELECT (r.job).id AS id FROM aiservice.create_jobs($1, $2) r",
        [{"owner_ref": "a"}, {"owner_ref": "b"}, {"owner_ref": "c"}],
        {"owner_service": "live", "task_type": "transcribe", "model_profile": "whisperx"},
    )
    claimed = await conn.fetch("SELECT id FROM aiservice.claim_jobs('w2', 2)")
    await conn.fetch("SELECT status FROM aiservice.fail_job($1, 'w2', 'invalid_input', 'bad')", claimed[0]["id"])
    await conn.execute("SELECT aiservice.compact_counts()")
    await conn.execute("ANALYZE aiservice.jobs, aiservice.job_history")

    start = await rows_read(conn)
    stats = await conn.fetchval("SELECT aiservice.stats()")
    after_stats = await rows_read(conn)
    failed = await conn.fetch("SELECT id FROM aiservice.list_jobs(p_statuses => '{failed}')")
    by_owner = await conn.fetch("SELECT id FROM aiservice.list_jobs(p_owner_service => 'live')")
    by_type = await conn.fetch("SELECT id FROM aiservice.list_jobs(p_task_type => 'transcribe', p_limit => 2)")
    after_lists = await rows_read(conn)

    counts = {(s["status"], s["task_type"]): s["count"] for s in stats["by_status"]}
    assert counts[("completed", "llm_chat")] == MILLION
    assert counts[("failed", "transcribe")] == 1 and counts[("running", "transcribe")] == 1
    assert [e["count"] for e in stats["errors"]] == [1]
    assert (len(failed), len(by_owner), len(by_type)) == (1, 3, 2)
    # A scan of the table would read a million rows; each call may read its own few.
    assert after_stats - start < 1_000, after_stats - start
    assert after_lists - after_stats < 1_000, after_lists - after_stats
