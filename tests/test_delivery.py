"""Result delivery: the aiservice_finished channel, batches, waiting over HTTP, signed webhooks.

Real PostgreSQL and a real HTTP receiver that verifies signatures with the standardwebhooks
package (not with aiservice's code)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest
from conftest import JSON_HEADERS, ClientFactory, JobFactory, job_spec
from stubs import Receiver, finish, receiver, register, wait_for

from aiservice.db.store import JobStore
from aiservice.jobs import JobCreate

__all__ = ["receiver"]

Conn: TypeAlias = "asyncpg.Connection[Any]"
API = "/api/v1"
LEASE = timedelta(minutes=5)


class Listener:
    """A LISTEN connection collecting aiservice_finished payloads."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.sizes: list[int] = []

    def heard(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.sizes.append(len(payload.encode()))
        self.payloads.append(json.loads(payload))

    def job_ids(self) -> list[int]:
        return [j["id"] for p in self.payloads for j in p.get("jobs", ())]


@pytest.fixture
async def finished(database_url: str) -> AsyncIterator[Listener]:
    listener = Listener()
    conn = await asyncpg.connect(database_url)
    await conn.add_listener("aiservice_finished", listener.heard)
    yield listener
    await conn.close()


async def test_a_finished_job_is_announced_on_its_own_channel(
    store: JobStore, job_factory: JobFactory, finished: Listener
) -> None:
    job = await job_factory()
    await finish(store, job.id)
    await wait_for(lambda: _true(finished.payloads), what="the notification")
    assert finished.payloads == [
        {"jobs": [{"id": job.id, "owner_service": job.owner_service, "owner_ref": job.owner_ref,
                   "status": "completed", "batch_id": None}]}
    ]  # fmt: skip


async def _true(value: object) -> bool:
    return bool(value)


async def test_many_jobs_finished_at_once_share_few_notifications_under_the_limit(
    store: JobStore, finished: Listener
) -> None:
    specs = [JobCreate.model_validate(job_spec(owner_ref="r" * 400 + str(i))) for i in range(300)]
    created = await store.create_jobs(specs)
    ids = [job.id for job, _ in created]
    batch_id = created[0][0].batch_id
    await store.cancel_batch(batch_id or 0)

    async def all_heard() -> bool:
        return sorted(finished.job_ids()) == ids and any(p.get("batch_finished") for p in finished.payloads)

    await wait_for(all_heard, what="every cancelled job and the batch")
    job_notes = [p for p in finished.payloads if "jobs" in p]
    assert 10 <= len(job_notes) <= 30, len(job_notes)  # ~450 bytes a job: about 15 per notification
    assert max(finished.sizes) < 8000
    assert [p for p in finished.payloads if "batch_finished" in p] == [
        {"batch_finished": True, "batch_id": batch_id, "owner_service": "telephony"}
    ]


async def test_batch_counts_follow_every_outcome(store: JobStore, api_factory: ClientFactory) -> None:
    api = await api_factory()
    body = {"defaults": {"owner_service": "tel", "task_type": "llm_chat", "model_profile": "m"},
            "jobs": [{"owner_ref": f"c/{i}"} for i in range(6)]}  # fmt: skip
    created = await (await api.post(f"{API}/jobs/batch", json=body)).json()
    batch_id = created["batch_id"]
    ids = [j["id"] for j in created["jobs"]]
    claimed = await store.claim_jobs("w", 3, lease_timeout=LEASE)
    await store.complete_job(claimed[0].id, "w", {"ok": 1})
    await store.fail_job(claimed[1].id, "w", "invalid_input", "bad", retryable=False)
    batch = await (await api.get(f"{API}/batches/{batch_id}")).json()
    assert batch["status"] == "in_progress" and batch["finished_at"] is None
    assert batch["counts"] == {"total": 6, "pending": 3, "running": 1, "completed": 1, "failed": 1, "cancelled": 0}

    cancelled = await (await api.post(f"{API}/batches/{batch_id}/cancel", headers=JSON_HEADERS)).json()
    assert cancelled["status"] == "finished" and cancelled["finished_at"] is not None
    assert cancelled["counts"] == {"total": 6, "pending": 0, "running": 0, "completed": 1, "failed": 1, "cancelled": 4}
    listed = await (await api.get(f"{API}/jobs", params={"batch_id": str(batch_id), "limit": "10"})).json()
    assert sorted(j["id"] for j in listed["jobs"]) == ids

    await store.retry_job(claimed[1].id)  # a retried job puts the batch back in progress
    again = await store.get_batch(batch_id)
    assert (again.status, again.counts.pending, again.counts.failed) == ("in_progress", 1, 0)
    assert (await api.get(f"{API}/batches/999999")).status == 404


async def test_a_batch_of_repeats_only_makes_no_batch(store: JobStore, conn: Conn) -> None:
    spec = JobCreate.model_validate(job_spec(idempotency_key="k-1"))
    ((first, _),) = await store.create_jobs([spec])
    ((again, new),) = await store.create_jobs([spec])
    assert not new and again.batch_id == first.batch_id
    assert await conn.fetchval("SELECT count(*) FROM aiservice.batches") == 1


async def test_get_with_wait_answers_at_once_for_a_finished_job(
    store: JobStore, job_factory: JobFactory, api_factory: ClientFactory
) -> None:
    api = await api_factory()
    job = await job_factory()
    await finish(store, job.id)
    started = time.monotonic()
    got = await (await api.get(f"{API}/jobs/{job.id}", params={"wait": "30"})).json()
    assert got["status"] == "completed" and time.monotonic() - started < 2


async def test_get_with_wait_answers_when_the_job_finishes(
    store: JobStore, job_factory: JobFactory, api_factory: ClientFactory
) -> None:
    api = await api_factory()
    job = await job_factory()

    async def later() -> None:
        await asyncio.sleep(0.5)
        await finish(store, job.id, {"text": "done"})

    finishing = asyncio.create_task(later())
    started = time.monotonic()
    got = await (await api.get(f"{API}/jobs/{job.id}", params={"wait": "20"})).json()
    waited = time.monotonic() - started
    await finishing
    assert got["status"] == "completed" and got["result"] == {"text": "done"}
    assert 0.4 < waited < 3, waited


async def test_get_with_wait_answers_the_current_state_at_the_timeout(
    job_factory: JobFactory, api_factory: ClientFactory
) -> None:
    api = await api_factory()
    job = await job_factory()
    started = time.monotonic()
    got = await (await api.get(f"{API}/jobs/{job.id}", params={"wait": "0.5"})).json()
    assert got["status"] == "pending" and 0.4 < time.monotonic() - started < 3
    for bad in ("61", "-1", "soon"):
        assert (await api.get(f"{API}/jobs/{job.id}", params={"wait": bad})).status == 422


async def test_wait_for_any_and_for_all(store: JobStore, job_factory: JobFactory, api_factory: ClientFactory) -> None:
    api = await api_factory()
    a, b = await job_factory(), await job_factory()

    async def finish_a_then_b() -> None:
        await asyncio.sleep(0.3)
        await finish(store, a.id)
        await asyncio.sleep(0.7)
        await finish(store, b.id)

    finishing = asyncio.create_task(finish_a_then_b())
    anyone = await (await api.post(f"{API}/jobs/wait", json={"ids": [b.id, a.id], "mode": "any", "timeout": 20})).json()
    assert [(j["id"], j["status"]) for j in anyone["jobs"]] == [(b.id, "pending"), (a.id, "completed")]
    everyone = await (await api.post(f"{API}/jobs/wait", json={"ids": [a.id, b.id], "timeout": 20})).json()
    assert [j["status"] for j in everyone["jobs"]] == ["completed", "completed"]
    await finishing

    unknown = await api.post(f"{API}/jobs/wait", json={"ids": [a.id, 987654], "timeout": 5})
    assert unknown.status == 404 and "987654" in (await unknown.json())["error"]["message"]
    for bad in ({"ids": [a.id], "timeout": 61}, {"ids": []}, {"ids": [a.id], "mode": "some"}):
        assert (await api.post(f"{API}/jobs/wait", json=bad)).status == 422


async def test_a_lost_notification_costs_at_most_the_recheck(
    store: JobStore, job_factory: JobFactory, api_factory: ClientFactory, conn: Conn
) -> None:
    """Jobs finished behind the listener's back (here: with the notification trigger off) are found by the re-check."""
    api = await api_factory()
    job = await job_factory()
    waiting = asyncio.create_task(api.get(f"{API}/jobs/{job.id}", params={"wait": "20"}))
    await asyncio.sleep(0.3)
    async with conn.transaction():
        await conn.execute("ALTER TABLE aiservice.jobs DISABLE TRIGGER jobs_update_effects")
        await conn.execute("SELECT FROM aiservice.cancel_job($1)", job.id)
        await conn.execute("ALTER TABLE aiservice.jobs ENABLE TRIGGER jobs_update_effects")
    started = time.monotonic()
    got = await (await waiting).json()
    assert got["status"] == "cancelled" and time.monotonic() - started < 2.5


async def test_job_and_batch_events_are_delivered_signed(
    store: JobStore, api_factory: ClientFactory, receiver: Receiver
) -> None:
    api = await api_factory()
    hook = await register(api, receiver)
    assert hook["secret"].startswith("whsec_") and hook["events"] == ["job.finished", "batch.finished"]
    listed = await (await api.get(f"{API}/webhooks")).json()
    assert [h["secret"] for h in listed["webhooks"]] == [None]  # never shown again

    created = await (await api.post(f"{API}/jobs/batch", json={"jobs": [job_spec()]})).json()
    (job,) = created["jobs"]
    await finish(store, job["id"], {"text": "hello"})

    async def both() -> bool:
        return len(receiver.verified) == 2

    await wait_for(both, what="two signed deliveries")
    events = {e["type"]: e for e in receiver.verified}
    current = await (await api.get(f"{API}/jobs/{job['id']}")).json()
    assert events["job.finished"]["data"] == current
    assert events["batch.finished"]["data"]["id"] == created["batch_id"]
    assert events["batch.finished"]["data"]["counts"]["completed"] == 1
    deliveries = await (await api.get(f"{API}/webhooks/telephony/deliveries")).json()
    assert {d["status"] for d in deliveries["deliveries"]} == {"delivered"}


async def test_a_failed_attempt_is_retried_with_the_same_id(
    store: JobStore, job_factory: JobFactory, api_factory: ClientFactory, receiver: Receiver, conn: Conn
) -> None:
    api = await api_factory()
    await register(api, receiver, events=["job.finished"])
    receiver.answers = [500]
    job = await job_factory()
    await finish(store, job.id)
    await wait_for(lambda: _true(receiver.ids), what="the first attempt")
    await asyncio.sleep(0.3)
    (pending,) = (await (await api.get(f"{API}/webhooks/telephony/deliveries")).json())["deliveries"]
    assert (pending["status"], pending["last_status"], pending["attempts"]) == ("pending", 500, 1)
    await conn.execute("UPDATE aiservice.webhook_deliveries SET next_attempt_at = now()")  # skip the backoff

    async def twice() -> bool:
        return len(receiver.ids) == 2

    await wait_for(twice, what="the second attempt")
    assert receiver.ids[0] == receiver.ids[1]


async def test_410_disables_the_endpoint(
    store: JobStore, job_factory: JobFactory, api_factory: ClientFactory, receiver: Receiver
) -> None:
    api = await api_factory()
    await register(api, receiver, events=["job.finished"])
    receiver.answers = [410]
    job = await job_factory()
    await finish(store, job.id)

    async def disabled() -> bool:
        (hook,) = (await (await api.get(f"{API}/webhooks")).json())["webhooks"]
        return hook["disabled_at"] is not None

    await wait_for(disabled, what="the endpoint to be disabled")
    failed = await (await api.get(f"{API}/webhooks/telephony/deliveries", params={"status": "failed"})).json()
    (delivery,) = failed["deliveries"]
    assert delivery["last_status"] == 410

    await register(api, receiver, events=["job.finished"])  # registering again re-enables it
    retried = await api.post(f"{API}/webhooks/telephony/deliveries/{delivery['id']}/retry", headers=JSON_HEADERS)
    assert retried.status == 200

    async def delivered() -> bool:
        return len(receiver.ids) == 2

    await wait_for(delivered, what="the re-delivery")


async def test_a_delivery_fails_after_the_max_age(
    store: JobStore, job_factory: JobFactory, api_factory: ClientFactory, receiver: Receiver
) -> None:
    api = await api_factory(webhook_max_age=timedelta(milliseconds=1))
    await register(api, receiver, events=["job.finished"])
    receiver.answers = [503]
    job = await job_factory()
    await finish(store, job.id)

    async def failed() -> bool:
        found = await (await api.get(f"{API}/webhooks/telephony/deliveries", params={"status": "failed"})).json()
        return len(found["deliveries"]) == 1

    await wait_for(failed, what="the delivery to fail")


async def test_webhook_bad_input_and_rotation(api_factory: ClientFactory, receiver: Receiver) -> None:
    api = await api_factory()
    hook = f"{receiver.url}/hook"
    bad = [{"url": "ftp://x/hook"}, {"url": "file:///etc/passwd"}, {"url": "http://"}]
    for body in [*bad, {"url": hook, "events": ["job.started"]}, {"url": hook, "events": []}]:
        assert (await api.put(f"{API}/webhooks/telephony", json=body)).status == 422, body
    first = await register(api, receiver)
    same = await (await api.put(f"{API}/webhooks/telephony", json={"url": f"{receiver.url}/hook"})).json()
    assert same["secret"] is None  # not shown unless created or rotated
    rotated = await register(api, receiver, rotate_secret=True)
    assert rotated["secret"] not in (None, first["secret"])
    assert (await api.delete(f"{API}/webhooks/telephony", headers=JSON_HEADERS)).status == 204
    assert (await api.delete(f"{API}/webhooks/telephony", headers=JSON_HEADERS)).status == 404


async def test_a_receiver_that_cannot_be_reached_is_recorded_and_retried_later(
    store: JobStore, job_factory: JobFactory, api_factory: ClientFactory, receiver: Receiver
) -> None:
    api = await api_factory()
    port = receiver.port
    await register(api, receiver, events=["job.finished"])
    await receiver.close()  # nothing listens there any more
    job = await job_factory()
    await finish(store, job.id)

    async def recorded() -> bool:
        found = await (await api.get(f"{API}/webhooks/telephony/deliveries")).json()
        return bool(found["deliveries"]) and found["deliveries"][0]["last_error"] is not None

    await wait_for(recorded, what="the failed attempt to be recorded")
    (delivery,) = (await (await api.get(f"{API}/webhooks/telephony/deliveries")).json())["deliveries"]
    assert (delivery["status"], delivery["last_status"], delivery["attempts"]) == ("pending", None, 1)
    assert str(port) in delivery["last_error"] or "Connect" in delivery["last_error"]
