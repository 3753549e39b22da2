"""Webhook delivery against receivers that misbehave: slow ones, redirecting ones, ones answering
an endless error body, and URLs carrying secrets; and the checks on what may be registered.

Every receiver is a real HTTP server on loopback; deliveries are verified with the standardwebhooks
package (tests/test_delivery.py's Receiver)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from conftest import JSON_HEADERS, ClientFactory
from stubs import Receiver, register, wait_for
from yarl import URL

from aiservice.db.store import JobStore
from aiservice.jobs import JobCreate

API = "/api/v1"
LEASE = timedelta(minutes=5)


class HeldReceiver(Receiver):
    """Verifies like Receiver, but holds every request until ``release`` is set; counts requests in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.in_flight = 0
        self.most_in_flight = 0

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
            return await super()._hook(request)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def receivers() -> AsyncIterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for server in started:
        if isinstance(server, HeldReceiver):
            server.release.set()
        await server.close()


async def started(receivers: list[Receiver], server: Receiver) -> Any:
    await server.start()
    receivers.append(server)
    return server


async def finish_jobs(store: JobStore, owners: dict[str, int]) -> None:
    """Create ``n`` jobs per owner and complete them all in one statement (one outbox write)."""
    specs = [
        JobCreate(owner_service=owner, owner_ref=f"r{i}", task_type="hook", model_profile="m")
        for owner, n in owners.items()
        for i in range(n)
    ]
    await store.create_jobs(specs)
    jobs = await store.claim_jobs("w", len(specs), lease_timeout=LEASE, task_types=["hook"])
    await store.complete_jobs("w", [(j.id, j.lease_token, {"n": j.id}) for j in jobs])


async def statuses(conn: asyncpg.Connection[Any], owner: str) -> list[str]:
    rows = await conn.fetch("SELECT status FROM aiservice.webhook_deliveries WHERE owner_service = $1", owner)
    return sorted(r["status"] for r in rows)


# --- 1. a slow receiver does not hold back the others ----------------------------------------------


async def test_a_fast_receiver_is_served_while_a_slow_one_holds_its_requests(
    store: JobStore, api_factory: ClientFactory, receivers: list[Receiver], conn: asyncpg.Connection[Any]
) -> None:
    api = await api_factory(webhook_timeout=timedelta(seconds=60))
    slow: HeldReceiver = await started(receivers, HeldReceiver())
    fast = await started(receivers, Receiver())
    await register(api, slow, owner="slow", events=["job.finished"])
    await register(api, fast, owner="fast", events=["job.finished"])
    await finish_jobs(store, {"slow": 3, "fast": 3})

    async def fast_delivered() -> bool:
        return await statuses(conn, "fast") == ["delivered"] * 3

    await wait_for(fast_delivered, what="the fast receiver's deliveries, with the slow one still holding")
    assert slow.in_flight == 3 and not slow.release.is_set()
    assert await statuses(conn, "slow") == ["pending"] * 3

    # More events for the fast receiver go out too while the slow one holds (slots freed are reused).
    await finish_jobs(store, {"fast": 2})

    async def five() -> bool:
        return await statuses(conn, "fast") == ["delivered"] * 5

    await wait_for(five, what="the later deliveries to the fast receiver")
    slow.release.set()

    async def slow_delivered() -> bool:
        return await statuses(conn, "slow") == ["delivered"] * 3

    await wait_for(slow_delivered, what="the slow receiver's deliveries once released")
    assert len(fast.ids) == 5 and len(slow.ids) == 3


async def test_deliveries_in_flight_are_bounded_overall_and_per_endpoint(
    store: JobStore, api_factory: ClientFactory, receivers: list[Receiver], conn: asyncpg.Connection[Any]
) -> None:
    api = await api_factory(
        webhook_timeout=timedelta(seconds=60), webhook_concurrency=4, webhook_endpoint_concurrency=2
    )
    slow: HeldReceiver = await started(receivers, HeldReceiver())
    other: HeldReceiver = await started(receivers, HeldReceiver())
    fast = await started(receivers, Receiver())
    for owner, receiver in (("slow", slow), ("other", other), ("fast", fast)):
        await register(api, receiver, owner=owner, events=["job.finished"])
    await finish_jobs(store, {"slow": 5, "other": 5, "fast": 4})

    async def both_full() -> bool:
        return slow.in_flight == 2 and other.in_flight == 2

    await wait_for(both_full, what="two requests in flight at each held receiver")
    await asyncio.sleep(0.5)  # the sender's chance to (wrongly) send more
    assert (slow.most_in_flight, other.most_in_flight) == (2, 2)  # per endpoint
    assert fast.ids == []  # all four slots are taken: overall
    slow.release.set()

    async def fast_delivered() -> bool:
        return await statuses(conn, "fast") == ["delivered"] * 4

    await wait_for(fast_delivered, what="the fast receiver once slots freed")
    assert other.in_flight == 2 and other.most_in_flight == 2
    other.release.set()

    async def all_delivered() -> bool:
        rows = await conn.fetch("SELECT status FROM aiservice.webhook_deliveries")
        return len(rows) == 14 and {r["status"] for r in rows} == {"delivered"}

    await wait_for(all_delivered, what="every delivery")
    assert (slow.most_in_flight, other.most_in_flight) == (2, 2)
    (attempts,) = {r["attempts"] for r in await conn.fetch("SELECT attempts FROM aiservice.webhook_deliveries")}
    assert attempts == 1  # claimed only when a slot was free: never leased and left waiting


async def test_a_receiver_that_does_not_answer_in_time_is_recorded_with_the_timeout(
    store: JobStore, api_factory: ClientFactory, receivers: list[Receiver], conn: asyncpg.Connection[Any]
) -> None:
    api = await api_factory(webhook_timeout=timedelta(milliseconds=500))
    silent: HeldReceiver = await started(receivers, HeldReceiver())
    await register(api, silent, owner="silent", events=["job.finished"])
    await finish_jobs(store, {"silent": 1})

    async def recorded() -> bool:
        return bool(await conn.fetchval("SELECT last_error FROM aiservice.webhook_deliveries"))

    await wait_for(recorded, what="the timed-out attempt to be recorded")
    (row,) = await conn.fetch("SELECT * FROM aiservice.webhook_deliveries")
    assert (row["status"], row["last_status"]) == ("pending", None)
    assert row["last_error"] == "TimeoutError: no complete answer within 0.5 s"


# --- 2. redirects are not followed -----------------------------------------------------------------


class RedirectingReceiver(Receiver):
    """Answers 307 to another path of its own (with a query string), where it counts what arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.redirected: list[str] = []
        self.app.router.add_post("/elsewhere", self._elsewhere)

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        raise web.HTTPTemporaryRedirect(f"{self.url}/elsewhere?sig=redirect-secret-1")

    async def _elsewhere(self, request: web.Request) -> web.StreamResponse:
        self.redirected.append(request.headers.get("webhook-signature", ""))
        return web.Response(status=204)


async def test_a_redirect_is_a_failed_attempt_and_is_not_followed(
    store: JobStore, api_factory: ClientFactory, receivers: list[Receiver], conn: asyncpg.Connection[Any]
) -> None:
    api = await api_factory()
    receiver: RedirectingReceiver = await started(receivers, RedirectingReceiver())
    await register(api, receiver, owner="moved", events=["job.finished"])
    await finish_jobs(store, {"moved": 1})

    async def recorded() -> bool:
        return bool(await conn.fetchval("SELECT last_status FROM aiservice.webhook_deliveries"))

    await wait_for(recorded, what="the attempt to be recorded")
    (row,) = await conn.fetch("SELECT * FROM aiservice.webhook_deliveries")
    assert (row["status"], row["last_status"], row["attempts"]) == ("pending", 307, 1)
    assert receiver.redirected == []  # neither the body nor the signature went elsewhere
    assert f"{receiver.url}/elsewhere?sig=***" in row["last_error"], row["last_error"]
    assert "redirect-secret-1" not in row["last_error"]


# --- 3. an error body is read no further than what is kept -----------------------------------------


BODY = 50 * 1024 * 1024
CHUNK = 64 * 1024


class EndlessErrorReceiver(Receiver):
    """Answers 500 with a 50 MB body produced as it is sent; counts the bytes it managed to send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self.ended = asyncio.Event()

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=500, headers={"content-length": str(BODY)})
        try:
            await response.prepare(request)
            chunk = b"E" * CHUNK
            while self.sent < BODY:
                await response.write(chunk)
                self.sent += CHUNK
            await response.write_eof()
            return response
        finally:
            self.ended.set()


async def test_a_huge_error_body_is_not_read_past_what_is_kept(
    store: JobStore, api_factory: ClientFactory, receivers: list[Receiver], conn: asyncpg.Connection[Any]
) -> None:
    api = await api_factory()
    receiver: EndlessErrorReceiver = await started(receivers, EndlessErrorReceiver())
    await register(api, receiver, owner="verbose", events=["job.finished"])
    await finish_jobs(store, {"verbose": 1})

    async def recorded() -> bool:
        return bool(await conn.fetchval("SELECT last_status FROM aiservice.webhook_deliveries"))

    await wait_for(recorded, within=30, what="the attempt to be recorded")
    await asyncio.wait_for(receiver.ended.wait(), 30)
    (row,) = await conn.fetch("SELECT * FROM aiservice.webhook_deliveries")
    assert (row["status"], row["last_status"]) == ("pending", 500)
    assert row["last_error"] == "E" * 300
    # The sender closed the connection: what got out is what the sockets' buffers took, not the body.
    assert receiver.sent < BODY // 4, receiver.sent


# --- 4. what may be registered -------------------------------------------------------------------


async def test_events_may_not_repeat(api_factory: ClientFactory, conn: asyncpg.Connection[Any]) -> None:
    api = await api_factory()
    body = {"url": "http://127.0.0.1:9/hook", "events": ["job.finished", "job.finished"]}
    refused = await api.put(f"{API}/webhooks/telephony", json=body)
    assert refused.status == 422
    assert "events" in (await refused.json())["error"]["message"]
    with pytest.raises(asyncpg.PostgresError, match="events") as caught:
        await conn.fetch(
            "SELECT * FROM aiservice.set_webhook('t', 'http://127.0.0.1:9/', 'a-secret-of-length', "
            "'{job.finished,job.finished}')"
        )
    assert caught.value.sqlstate == "AS422"  # type: ignore[attr-defined]


BAD_URLS = {
    "http://[::1": "host",
    "http://[::1/hook": "host",
    "http://[zz::1]/hook": "host",
    "http://example.com:99999/hook": "port",
    "http://example.com:0/hook": "port",
    "http://example.com:8o/hook": "port",
    "http://:8080/hook": "host",
    "http://user:pw@/hook": "host",
    "http://a b/hook": "",
    "https://": "",
    "ftp://example.com/": "",
}
GOOD_URLS = [
    "http://[::1]:8080/hook",
    "https://user:p%40ss@hooks.example.com/in?token=abc&x=1",
    "http://127.0.0.1:65535",
    "https://пример.рф/hook",
]


async def test_nonsense_urls_are_refused_with_a_reason_by_both_doors(
    api_factory: ClientFactory, conn: asyncpg.Connection[Any]
) -> None:
    api = await api_factory()
    for url, reason in BAD_URLS.items():
        response = await api.put(f"{API}/webhooks/telephony", json={"url": url})
        assert response.status == 422, (url, await response.text())
        message = (await response.json())["error"]["message"]
        assert reason in message, (url, message)
        with pytest.raises(asyncpg.PostgresError) as caught:
            await conn.fetch("SELECT * FROM aiservice.set_webhook('t', $1, 'a-secret-of-length')", url)
        assert caught.value.sqlstate == "AS422", url  # type: ignore[attr-defined]
        assert reason in str(caught.value), (url, str(caught.value))
    for url in GOOD_URLS:
        response = await api.put(f"{API}/webhooks/telephony", json={"url": url})
        assert response.status == 200, (url, await response.text())
        await conn.fetch("SELECT * FROM aiservice.set_webhook('t', $1, 'a-secret-of-length')", url)


async def test_owner_names_travel_percent_encoded_and_dot_segments_are_refused(
    api_factory: ClientFactory, conn: asyncpg.Connection[Any]
) -> None:
    api = await api_factory()
    for owner in ("a/b", "why?", "x#y", "50%", "tab\there", "a b"):
        path = f"{API}/webhooks/{_encoded(owner)}"
        assert (await api.put(path, json={"url": "http://127.0.0.1:9/h"})).status == 200, owner
        listed = await (await api.get(f"{path}/deliveries")).json()
        assert listed == {"deliveries": [], "next_cursor": None}, owner
        missing = await api.post(f"{path}/deliveries/12345/retry", headers=JSON_HEADERS)
        assert missing.status == 404 and owner in (await missing.json())["error"]["message"], owner
    hooks = await (await api.get(f"{API}/webhooks")).json()
    assert len(hooks["webhooks"]) == 6
    async with aiohttp.ClientSession() as session:
        for owner in (".", ".."):
            # A dot segment is resolved away by URL clients even percent-encoded: no route can carry it.
            url = URL(f"{api.make_url('')}{API}/webhooks/{_encoded(owner)}", encoded=True)
            response = await session.put(url, json={"url": "http://127.0.0.1:9/h"})
            assert response.status == 422, owner
            assert "owner_service" in (await response.json())["error"]["message"]
            with pytest.raises(asyncpg.PostgresError, match="owner_service"):
                await conn.fetch("SELECT * FROM aiservice.set_webhook($1, 'http://x/', 'a-secret-of-length')", owner)


def _encoded(owner: str) -> str:
    from urllib.parse import quote

    return "".join(f"%{b:02X}" for b in owner.encode()) if owner in (".", "..") else quote(owner, safe="")


async def test_ids_out_of_range_are_named_for_what_they_are(api_factory: ClientFactory) -> None:
    api = await api_factory()
    for path, noun in (
        (f"{API}/batches/99999999999999999999", "batch id"),
        (f"{API}/batches/x", "batch id"),
        (f"{API}/jobs/99999999999999999999", "job id"),
    ):
        response = await api.get(path)
        assert response.status == 422 and noun in (await response.json())["error"]["message"], path
    for path, noun in (
        (f"{API}/batches/0/cancel", "batch id"),
        (f"{API}/webhooks/t/deliveries/99999999999999999999/retry", "delivery id"),
    ):
        response = await api.post(path, headers=JSON_HEADERS)
        assert response.status == 422 and noun in (await response.json())["error"]["message"], path


# --- 5. secrets in a webhook URL are never echoed -------------------------------------------------


class EchoingReceiver(Receiver):
    """Answers 404 quoting the path and query string it was asked for (as many servers do)."""

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        credentials = request.headers.get("authorization")
        return web.Response(status=404, text=f"no route for {request.path_qs} (credentials {credentials})")


async def test_a_url_s_secrets_are_masked_wherever_it_is_shown(
    store: JobStore,
    api_factory: ClientFactory,
    receivers: list[Receiver],
    conn: asyncpg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    api = await api_factory()
    receiver: EchoingReceiver = await started(receivers, EchoingReceiver())
    url = f"http://hookuser:hook-password-1@127.0.0.1:{receiver.port}/hook?token=query-secret-1&v=2"
    response = await api.put(f"{API}/webhooks/masked", json={"url": url, "events": ["job.finished"]})
    assert response.status == 200
    shown = (await response.json())["url"]
    assert shown == f"http://***@127.0.0.1:{receiver.port}/hook?token=***&v=***"
    listed = (await (await api.get(f"{API}/webhooks")).json())["webhooks"]
    assert [h["url"] for h in listed] == [shown]
    await finish_jobs(store, {"masked": 1})

    async def recorded() -> bool:
        return bool(await conn.fetchval("SELECT last_status FROM aiservice.webhook_deliveries"))

    await wait_for(recorded, what="the attempt to be recorded")
    stored = await conn.fetchval("SELECT last_error FROM aiservice.webhook_deliveries")
    (delivery,) = (await (await api.get(f"{API}/webhooks/masked/deliveries")).json())["deliveries"]
    for text in (stored, delivery["last_error"], caplog.text):
        for secret in ("query-secret-1", "hook-password-1", "aG9va3VzZXI6aG9vay1wYXNzd29yZC0x"):
            assert secret not in text, (secret, text)
    assert delivery["last_error"].startswith("no route for /hook?token=***&v=***"), delivery["last_error"]

    # An error recorded unmasked (by an earlier release, or an SQL caller) is masked when listed.
    await conn.execute("UPDATE aiservice.webhook_deliveries SET last_error = $1", f"could not reach {url}")
    (delivery,) = (await (await api.get(f"{API}/webhooks/masked/deliveries")).json())["deliveries"]
    assert delivery["last_error"] == f"could not reach {shown}"


def test_the_concurrency_settings_are_checked_at_start() -> None:
    from aiservice.settings import Settings, SettingsError

    got = Settings.from_env({"WEBHOOK_CONCURRENCY": "20", "WEBHOOK_ENDPOINT_CONCURRENCY": "4"})
    assert (got.webhook_concurrency, got.webhook_endpoint_concurrency) == (20, 4)
    assert (Settings().webhook_concurrency, Settings().webhook_endpoint_concurrency) == (50, 16)
    for name, bad in (
        ("WEBHOOK_CONCURRENCY", "0"),
        ("WEBHOOK_CONCURRENCY", "1001"),
        ("WEBHOOK_ENDPOINT_CONCURRENCY", "-1"),
        ("WEBHOOK_ENDPOINT_CONCURRENCY", "many"),
    ):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: bad})
