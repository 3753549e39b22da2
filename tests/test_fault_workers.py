"""Worker processes killed (SIGKILL) and frozen (SIGSTOP past their lease) with jobs in flight.

Several real `aiservice worker` processes share a few hundred jobs with one-second leases. Each
worker reaches the provider stub under its own URL prefix, so the stub knows who asked, and its
answer names the worker: a stored result must name the job's final worker_id. An audit trigger
(test-only, in the test database) records every transition, so "completed exactly once" is
checked on the history, not only on the final rows."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from stubs import start_worker_process

from aiservice.db.pool import connect
from aiservice.db.store import JobStore
from aiservice.jobs import JobCreate, JobStatus

# Row triggers that record every change of a job (test databases only): an update of a live job,
# and a move between jobs and job_history (finishing, retry), which is a delete from one table and
# an insert into the other in one statement: the delete leaves the old row for the insert to pair.
AUDIT_SQL = """
CREATE TABLE public.job_audit (
    seq          bigserial PRIMARY KEY,
    id           bigint NOT NULL,
    old_status   text NOT NULL,
    new_status   text NOT NULL,
    old_token    uuid,
    new_token    uuid,
    old_worker   text,
    new_worker   text,
    attempts     integer NOT NULL,
    max_attempts integer NOT NULL,
    result       jsonb
);
CREATE FUNCTION public.job_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.job_audit
        (id, old_status, new_status, old_token, new_token, old_worker, new_worker, attempts, max_attempts, result)
    VALUES (NEW.id, OLD.status, NEW.status, OLD.lease_token, NEW.lease_token, OLD.worker_id, NEW.worker_id,
            NEW.attempts, NEW.max_attempts, NEW.result);
    RETURN NULL;
END;
$$;
CREATE TRIGGER job_audit AFTER UPDATE ON aiservice.jobs FOR EACH ROW EXECUTE FUNCTION public.job_audit();
CREATE TABLE public.job_audit_moving (
    id bigint NOT NULL, xact bigint NOT NULL, status text NOT NULL, lease_token uuid, worker_id text
);
CREATE FUNCTION public.job_audit_leaving() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.job_audit_moving VALUES (OLD.id, txid_current(), OLD.status, OLD.lease_token, OLD.worker_id);
    RETURN NULL;
END;
$$;
CREATE FUNCTION public.job_audit_arriving() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    m public.job_audit_moving;
BEGIN
    DELETE FROM public.job_audit_moving WHERE id = NEW.id AND xact = txid_current() RETURNING * INTO m;
    IF FOUND THEN
        INSERT INTO public.job_audit
            (id, old_status, new_status, old_token, new_token, old_worker, new_worker, attempts, max_attempts, result)
        VALUES (NEW.id, m.status, NEW.status, m.lease_token, NEW.lease_token, m.worker_id, NEW.worker_id,
                NEW.attempts, NEW.max_attempts, NEW.result);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER job_audit_leaving AFTER DELETE ON aiservice.jobs
    FOR EACH ROW EXECUTE FUNCTION public.job_audit_leaving();
CREATE TRIGGER job_audit_arriving AFTER INSERT ON aiservice.job_history
    FOR EACH ROW EXECUTE FUNCTION public.job_audit_arriving();
CREATE TRIGGER job_audit_leaving AFTER DELETE ON aiservice.job_history
    FOR EACH ROW EXECUTE FUNCTION public.job_audit_leaving();
CREATE TRIGGER job_audit_arriving AFTER INSERT ON aiservice.jobs
    FOR EACH ROW EXECUTE FUNCTION public.job_audit_arriving();
"""


async def install_audit(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(AUDIT_SQL)
    finally:
        await conn.close()


async def audit_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT * FROM public.job_audit ORDER BY seq")
    finally:
        await conn.close()


class SigningStub:
    """An OpenAI-compatible chat server at /w/{worker}/v1: its answer names the worker that asked."""

    def __init__(self, *, seed: int = 7, delay: tuple[float, float] = (0.02, 0.15)) -> None:
        self.asked: Counter[tuple[str, str]] = Counter()  # (worker, prompt) -> requests
        self.answered: Counter[tuple[str, str]] = Counter()  # (worker, prompt) -> answers sent
        self._random = random.Random(seed)
        self._delay = delay
        self.app = web.Application()
        self.app.router.add_post("/w/{worker}/v1/chat/completions", self._chat)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def base_url(self, worker: str) -> str:
        return f"http://127.0.0.1:{self.port}/w/{worker}/v1"

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        worker = request.match_info["worker"]
        body = await request.json()
        prompt = str(body["messages"][-1]["content"])
        self.asked[worker, prompt] += 1
        await asyncio.sleep(self._random.uniform(*self._delay))
        self.answered[worker, prompt] += 1
        content = f"{worker}|{prompt}"
        return web.json_response(
            {
                "id": "chatcmpl-fault",
                "object": "chat.completion",
                "created": 0,
                "model": str(body.get("model")),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )


class WorkerProcess:
    def __init__(self, worker_id: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.worker_id = worker_id
        self.proc = proc
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


Spawn = Callable[..., WorkerProcess]


@pytest.fixture
async def signing_stub() -> AsyncIterator[SigningStub]:
    stub = SigningStub()
    await stub.start()
    yield stub
    await stub.close()


@pytest.fixture
def spawn_workers() -> Iterator[Callable[..., WorkerProcess]]:
    """Start `python -m aiservice.cli worker` processes; every one is killed and reaped afterwards."""
    started: list[WorkerProcess] = []
    with tempfile.TemporaryDirectory(prefix="aiservice-fault-") as logs:

        def spawn(worker_id: str, database_url: str, llm_base_url: str, **env: str) -> WorkerProcess:
            log = Path(logs) / f"{worker_id}.log"
            environment = {
                **os.environ,
                "DATABASE_URL": database_url,
                "MIGRATE_ON_START": "false",
                "LLM_BASE_URL": llm_base_url,
                "LLM_MODEL": "qwen2.5-14b",
                "LLM_TIMEOUT": "10s",
                "WORKER_ID": worker_id,
                "WORKER_HTTP_HOST": "127.0.0.1",
                "WORKER_HTTP_PORT": "0",
                "WORKER_POLL_INTERVAL": "200ms",
                "WORKER_LEASE_TIMEOUT": "1s",
                "WORKER_CLAIM_LIMIT": "4",
                "WORKER_SHUTDOWN_GRACE": "1s",
                "DB_POOL_MAX_SIZE": "4",
                "LOG_LEVEL": "INFO",
                **env,
            }
            proc = start_worker_process(environment, log)
            worker = WorkerProcess(worker_id, proc, log)
            started.append(worker)
            return worker

        try:
            yield spawn
        finally:
            for worker in started:
                if worker.proc.poll() is None:
                    worker.proc.send_signal(signal.SIGCONT)
                    worker.proc.kill()
                worker.proc.wait(timeout=10)


async def poll(check: Callable[[], Any], *, within: float, what: str, every: float = 0.05) -> Any:
    """Await ``check()`` until it returns something truthy; return that."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(every)


JOBS = 300


async def test_killed_and_frozen_workers_lose_no_job_and_write_no_stale_result(
    database_url: str, store: JobStore, signing_stub: SigningStub, spawn_workers: Spawn
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

    def spawn(worker_id: str) -> WorkerProcess:
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
