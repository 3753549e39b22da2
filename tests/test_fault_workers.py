"""Worker processes killed (SIGKILL) and frozen (SIGSTOP past their lease) with jobs in flight.

Several real `aiservice worker` processes share a few hundred jobs with one-second leases. Each
worker reaches the provider stub under its own URL prefix, so the stub knows who asked, and its
answer names the worker: a stored result must name the job's final worker_id. An audit trigger
(test-only, in the test database) records every transition, so "completed exactly once" is
checked on the history, not only on the final rows."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

from audit import audit_rows, install_audit
from processes import Command, WorkerSpawn, spawn_workers
from stubs import SigningStub, poll, signing_stub

from aiservice.db.pool import connect
from aiservice.db.store import JobStore
from aiservice.jobs import JobCreate, JobStatus

__all__ = ["signing_stub", "spawn_workers"]


JOBS = 300


async def test_killed_and_frozen_workers_lose_no_job_and_write_no_stale_result(
    database_url: str, store: JobStore, signing_stub: SigningStub, spawn_workers: WorkerSpawn
) -> None:
    await install_audit(database_url)
    created = await store.create_jobs(
        JobCreate(
            owner_service="fault",
            owner_ref=f"kill/{n}",
            task_type="llm_chat",
            model_profile="qwen2.5-14b",
            input={"user": f"job {n}"},
            max_attempts=20,
        )
        for n in range(JOBS)
    )
    ids = [job.id for job, _ in created]
    prompt_of = {job.id: f"job {n}" for n, (job, _) in enumerate(created)}

    def spawn(worker_id: str) -> Command:
        return spawn_workers(worker_id, database_url, signing_stub.base_url(worker_id))

    workers = {wid: spawn(wid) for wid in ("doomed-1", "doomed-2", "frozen", "steady")}
    conn = await connect(database_url)
    try:

        async def running_by(worker_id: str) -> list[int]:
            rows = await conn.fetch(
                "SELECT id FROM aiservice.all_jobs WHERE status = 'running' AND worker_id = $1", worker_id
            )
            return [r["id"] for r in rows]

        async def completed() -> int:
            n: int = await conn.fetchval("SELECT count(*) FROM aiservice.all_jobs WHERE status = 'completed'")
            return n

        # Let the fleet get going, then kill two workers while each holds jobs.
        await poll(lambda: _at_least(completed, 40), within=60, what="40 jobs to complete")
        for wid in ("doomed-1", "doomed-2"):

            async def holds(wid: str = wid) -> list[int]:
                return await running_by(wid)

            await poll(holds, within=10, what=f"{wid} to hold jobs", every=0.005)
            workers[wid].proc.kill()
            assert workers[wid].proc.wait(timeout=5) == -signal.SIGKILL

            # A statement the worker sent just before dying still runs (and may complete a job):
            # wait until PostgreSQL has ended every session of the dead worker.
            async def sessions_gone(wid: str = wid) -> bool:
                n = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1", f"% {wid}"
                )
                return bool(n == 0)

            await poll(sessions_gone, within=10, what=f"{wid}'s sessions to end")
        # Their leases are still held now: what they held is what the dead workers took with them.
        orphaned = set(await running_by("doomed-1")) | set(await running_by("doomed-2"))
        assert orphaned, "the killed workers held no job: the test proves nothing"
        workers["fresh"] = spawn("fresh")

        # Freeze a third worker past its lease while it holds jobs, then let it run on.
        frozen_jobs = await poll(lambda: running_by("frozen"), within=10, what="frozen to hold jobs", every=0.005)
        workers["frozen"].proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.2)
        frozen_jobs = await running_by("frozen")
        assert frozen_jobs, "the frozen worker held no job: the test proves nothing"

        async def taken_over() -> bool:
            rows = await conn.fetch("SELECT status FROM aiservice.all_jobs WHERE id = ANY($1::bigint[])", frozen_jobs)
            return all(r["status"] == "completed" for r in rows)

        await poll(taken_over, within=20, what="the frozen worker's jobs to be completed by others")
        workers["frozen"].proc.send_signal(signal.SIGCONT)

        await poll(lambda: _at_least(completed, JOBS), within=90, what=f"all {JOBS} jobs to complete")
        await asyncio.sleep(1.0)  # the thawed worker has had its say
        final = {r["id"]: r for r in await conn.fetch("SELECT * FROM aiservice.all_jobs ORDER BY id")}
    finally:
        await conn.close()

    for wid in ("frozen", "steady", "fresh"):
        assert workers[wid].proc.poll() is None, f"{wid} died:\n{workers[wid].output()}"

    # Every job completed, none left running, each once: the table and the history agree.
    assert sorted(final) == sorted(ids)
    assert Counter(r["status"] for r in final.values()) == {JobStatus.COMPLETED: JOBS}
    assert all(r["lease_token"] is None and r["attempts"] <= r["max_attempts"] for r in final.values())
    history = await audit_rows(database_url)
    completions = Counter(h["id"] for h in history if h["new_status"] == "completed")
    assert completions == dict.fromkeys(ids, 1), "a job was completed more than once (or never)"
    assert not [h for h in history if h["old_status"] == "completed"], "a completed job changed again"

    # The stored result is the answer given to the job's final worker: no stale worker wrote one.
    for job_id, row in final.items():
        worker = row["worker_id"]
        assert row["result"]["content"] == f"{worker}|{prompt_of[job_id]}", (job_id, worker, row["result"])
        assert signing_stub.answered[worker, prompt_of[job_id]] >= 1

    # The killed workers' jobs ran again elsewhere, after their leases expired.
    for job_id in orphaned:
        row = final[job_id]
        assert row["worker_id"] not in ("doomed-1", "doomed-2"), job_id
        assert row["attempts"] >= 2, job_id
        expiries = [h for h in history if h["id"] == job_id and h["old_worker"] in ("doomed-1", "doomed-2")]
        assert any(h["old_status"] == "running" and h["new_status"] == "pending" for h in expiries), job_id
    # The frozen worker's jobs were finished by others; whatever it sent after thawing was refused.
    for job_id in frozen_jobs:
        assert final[job_id]["worker_id"] != "frozen", job_id
    assert "lease lost" in workers["frozen"].output()

    # No claim ever took a job that was running (no job held by two workers at once).
    claims = [h for h in history if h["new_status"] == "running" and h["old_status"] != "running"]
    assert all(h["old_status"] == "pending" for h in claims)
    stale = sum(1 for h in history if h["old_status"] == "running" and h["new_status"] == "pending")
    print(
        f"jobs={JOBS} killed=2 frozen=1 orphaned={len(orphaned)} frozen_jobs={len(frozen_jobs)} "
        f"claims={len(claims)} lease_expiries={stale} lost=0"
    )


async def _at_least(count: Callable[[], Any], n: int) -> bool:
    return bool(await count() >= n)
