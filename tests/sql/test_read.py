"""aiservice.get_job and list_jobs (schema/functions/read.sql): filters, keyset pages over live and finished
jobs, and what a page reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlapi import JOB, Conn, call, claim, claim_tokens, create, create_jobs, get, refused, rows_read


async def test_get_job(conn: Conn) -> None:
    job = await create(conn, input={"x": 1})
    got = await get(conn, job["id"])
    assert (got["id"], got["input"], got["status"]) == (job["id"], {"x": 1}, "pending")
    message = await refused("AS404", get(conn, 123456))
    assert "123456" in message


async def _fleet(conn: Conn) -> dict[str, int]:
    """Jobs of two owners, three kinds and every status; returns ids by name."""
    ids: dict[str, int] = {}
    specs = {
        "tel_chat": {"owner_ref": "call/1"},
        "tel_chat2": {"owner_ref": "call/2"},
        "tel_whisper": {"owner_ref": "call/1", "task_type": "transcribe", "model_profile": "whisperx"},
        "tg_chat": {"owner_service": "monitoring-tg", "owner_ref": "channel/1"},
        "tg_vision": {"owner_service": "monitoring-tg", "owner_ref": "channel/2", "model_profile": "vision"},
    }
    for name, spec in specs.items():
        ids[name] = (await create(conn, **spec))["id"]
    # tel_chat completed, tg_chat failed, tg_vision cancelled, tel_whisper running, tel_chat2 pending
    (c,) = await call(
        conn, "claim_jobs", worker_id="w", limit=1, task_types=["llm_chat"], model_profiles=["qwen2.5-14b"]
    )
    assert c["id"] == ids["tel_chat"]
    await call(conn, "complete_job", id=c["id"], worker_id="w", result={})
    await conn.execute("UPDATE aiservice.jobs SET priority = 1 WHERE id = $1", ids["tg_chat"])
    (f,) = await claim(conn, "w")
    assert f["id"] == ids["tg_chat"]
    await call(conn, "fail_job", id=f["id"], worker_id="w", error_category="bad_input")
    await call(conn, "cancel_job", id=ids["tg_vision"])
    (r,) = await call(conn, "claim_jobs", worker_id="w", task_types=["transcribe"])
    assert r["id"] == ids["tel_whisper"]
    return ids


async def listed(conn: Conn, **filters: Any) -> list[int]:
    return [r["id"] for r in await call(conn, "list_jobs", **filters)]


async def test_list_jobs_newest_first_with_every_filter(conn: Conn) -> None:
    ids = await _fleet(conn)
    assert await listed(conn) == sorted(ids.values(), reverse=True)
    for filters, expected in [
        ({"owner_service": "telephony"}, ["tel_chat", "tel_chat2", "tel_whisper"]),
        ({"owner_service": "nobody"}, []),
        ({"owner_ref": "call/1"}, ["tel_chat", "tel_whisper"]),
        ({"task_type": "transcribe"}, ["tel_whisper"]),
        ({"model_profile": "qwen2.5-14b"}, ["tel_chat", "tel_chat2", "tg_chat"]),
        ({"statuses": ["pending"]}, ["tel_chat2"]),
        ({"statuses": ["running"]}, ["tel_whisper"]),
        ({"statuses": ["completed"]}, ["tel_chat"]),
        ({"statuses": ["failed"]}, ["tg_chat"]),
        ({"statuses": ["cancelled"]}, ["tg_vision"]),
        ({"statuses": ["failed", "cancelled", "completed"]}, ["tel_chat", "tg_chat", "tg_vision"]),
        ({"statuses": []}, []),
        ({"owner_service": "monitoring-tg", "model_profile": "vision"}, ["tg_vision"]),
        ({"owner_service": "telephony", "owner_ref": "call/1", "statuses": ["running"]}, ["tel_whisper"]),
        (
            {"owner_service": "telephony", "task_type": "llm_chat", "statuses": ["pending", "completed"]},
            ["tel_chat", "tel_chat2"],
        ),
    ]:
        assert await listed(conn, **filters) == sorted((ids[name] for name in expected), reverse=True), filters
    wanted = [ids["tel_chat"], ids["tg_vision"], 999_999]
    assert await listed(conn, ids=wanted) == sorted(wanted[:2], reverse=True)
    assert await listed(conn, ids=wanted, statuses=["cancelled"]) == [ids["tg_vision"]]


async def test_list_jobs_created_after_is_inclusive_and_created_before_exclusive(conn: Conn) -> None:
    day = datetime(2024, 3, 1, tzinfo=UTC)
    jobs = [(await create(conn, owner_ref=str(i)))["id"] for i in range(4)]
    for i, job_id in enumerate(jobs):
        await conn.execute("UPDATE aiservice.jobs SET created_at = $2 WHERE id = $1", job_id, day + timedelta(days=i))
    assert await listed(conn, created_after=day + timedelta(days=1)) == jobs[:0:-1]
    assert await listed(conn, created_before=day + timedelta(days=2)) == jobs[1::-1]
    window = {"created_after": day + timedelta(days=1), "created_before": day + timedelta(days=3)}
    assert await listed(conn, **window) == [jobs[2], jobs[1]]
    assert await listed(conn, created_after=day + timedelta(hours=1), created_before=day + timedelta(hours=2)) == []


async def test_list_jobs_keyset_pagination(conn: Conn) -> None:
    jobs = [r["id"] for r in await create_jobs(conn, [{"owner_ref": str(i)} for i in range(7)], JOB)]
    await create(conn, owner_service="other")  # filtered out on every page
    pages: list[list[int]] = []
    before: int | None = None
    while True:
        page = await listed(conn, owner_service="telephony", limit=3, before_id=before)
        if not page:
            break
        pages.append(page)
        before = page[-1]
    newest_first = sorted(jobs, reverse=True)
    assert pages == [newest_first[0:3], newest_first[3:6], newest_first[6:]]


async def test_list_jobs_limit(conn: Conn) -> None:
    await create_jobs(conn, [{"owner_ref": str(i)} for i in range(60)], JOB)
    assert len(await listed(conn)) == 50  # the default
    assert len(await listed(conn, limit=7)) == 7
    assert len(await listed(conn, limit=None)) == 60


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


async def test_a_list_pages_through_live_and_finished_jobs_in_id_order(conn: Conn) -> None:
    ids = await new_jobs(conn, 6)
    claimed = await claim_tokens(conn, 3)
    await complete(conn, claimed)
    page = "SELECT id FROM aiservice.list_jobs(p_owner_service => 'telephony', p_before_id => $1, p_limit => 4)"
    first = [r["id"] for r in await conn.fetch(page, None)]
    second = [r["id"] for r in await conn.fetch(page, first[-1])]
    assert first + second == sorted(ids, reverse=True)


# --- The read routes the operator console uses: batches listed newest first, jobs by error category, a job's
# dependencies and dependents, webhook deliveries that keep retrying. SQL and HTTP alike.


async def test_a_rare_error_category_reads_a_page_of_rows(conn: Conn) -> None:
    fill = """
    INSERT INTO aiservice.jobs (owner_service, owner_ref, task_type, model_profile, error_category)
    SELECT 'bulk', 'r' || i, 'llm_chat', 'm', $2 FROM generate_series(1, $1) i
    """
    await conn.execute(fill, 3000, None)
    await conn.execute(fill, 2, "rare")
    await conn.execute(fill, 3000, "timeout")
    await conn.execute("ANALYZE aiservice.jobs")
    start = await rows_read(conn, "aiservice.jobs")
    assert len(await conn.fetch("SELECT * FROM aiservice.list_jobs(p_error_category => 'rare', p_limit => 50)")) == 2
    assert await rows_read(conn, "aiservice.jobs") - start <= 10
