"""Webhook delivery from the outbox: signed per the Standard Webhooks specification, at least once.

Deliveries are rows written in the transaction that finished a job or batch. Any API replica takes
due ones (SKIP LOCKED, leased for the attempt, as many as it has free slots and at most its
per-endpoint limit per endpoint: aiservice.claim_deliveries_v2), POSTs each on its own with a
timeout, and records its outcome when it ends; SQL decides the backoff, the max age and what a 410
does (aiservice.record_delivery). What a webhook URL may hold of secrets (userinfo, query values) is
masked in everything recorded or logged."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import aiohttp
from standardwebhooks.webhooks import Webhook as Signer
from yarl import URL

from aiservice import errors
from aiservice.db.store import JobStore
from aiservice.events import wait_event
from aiservice.jobs import Job
from aiservice.settings import Settings, mask_url_values, redact_url

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between claims when nothing wakes the sender
ERROR_KEPT = 300  # characters of a receiver's error answer kept in last_error


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def message(delivery: Any, now: datetime) -> tuple[str, dict[str, str]]:
    """The body and headers of one delivery; the webhook-id stays the same across attempts."""
    if delivery["event"] == "job.finished":
        data: Any = json.loads(Job.model_validate(delivery["job"]).model_dump_json()) if delivery["job"] else None
    else:
        data = delivery["batch"]
    body = json.dumps({"type": delivery["event"], "timestamp": now.isoformat(), "data": data})
    msg_id = f"msg_{delivery['id']}"
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Signer(delivery["secret"]).sign(msg_id, now, body),
        "content-type": "application/json",
        "user-agent": "aiservice-webhooks",
    }
    return body, headers


class Sender:
    """Sends due deliveries, each on its own: at most ``webhook_concurrency`` in flight, and at most
    ``webhook_endpoint_concurrency`` to one endpoint, so a slow receiver holds only its own share of
    the slots. Each delivery is recorded as soon as it ends, and the slot it frees is filled by the
    next claim."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.wakeup = asyncio.Event()
        self.sent = 0
        self.in_flight: Counter[str] = Counter()  # by owner_service
        self.tasks: set[asyncio.Task[None]] = set()
        # Whether a freed slot may let more be claimed: the last claim filled every slot it asked
        # for, or left an endpoint at its limit (whose due deliveries it then had to leave).
        self._held_back = False

    def wake(self) -> None:
        self.wakeup.set()

    async def _send(self, session: aiohttp.ClientSession, delivery: Any) -> None:
        url: str = delivery["url"]
        status, error = await attempt(session, delivery)
        if error is not None:
            error = redact_url(error, url, [delivery["secret"]])
        outcome = await self.store.record_delivery(delivery["id"], status, error, self.settings.webhook_max_age)
        self.sent += outcome == "delivered"
        if outcome != "delivered":
            log.info(
                "webhook %s for %s: %s (%s)", delivery["event"], delivery["owner_service"], outcome, status or error
            )

    async def _run_one(self, session: aiohttp.ClientSession, delivery: Any) -> None:
        try:
            await self._send(session, delivery)
        except errors.DatabaseUnavailable:
            log.warning("webhooks: PostgreSQL unavailable; delivery %s is sent again later", delivery["id"])
        except Exception as exc:  # one delivery's failure must not end the sender
            reason = redact_url(f"{type(exc).__name__}: {exc}", delivery["url"], [delivery["secret"]])
            log.error("webhooks: delivery %s failed: %s", delivery["id"], reason)

    def _start(self, session: aiohttp.ClientSession, delivery: Any) -> None:
        owner: str = delivery["owner_service"]
        self.in_flight[owner] += 1
        task = asyncio.create_task(self._run_one(session, delivery), name=f"aiservice-webhook-{delivery['id']}")
        self.tasks.add(task)

        def done(_: asyncio.Task[None]) -> None:
            self.tasks.discard(task)
            self.in_flight[owner] -= 1
            if not self.in_flight[owner]:
                del self.in_flight[owner]
            if self._held_back:
                self.wakeup.set()

        task.add_done_callback(done)

    async def send_due(self, session: aiohttp.ClientSession) -> int:
        """Claim as many due deliveries as there are free slots and start sending them; returns how many."""
        free = self.settings.webhook_concurrency - len(self.tasks)
        if free <= 0:
            self._held_back = True
            return 0
        per_endpoint = self.settings.webhook_endpoint_concurrency
        busy = Counter(self.in_flight)  # as the claim saw it (deliveries may end while it runs)
        due = await self.store.claim_deliveries(free, self.settings.webhook_timeout * 2, per_endpoint, busy)
        for delivery in due:
            self._start(session, delivery)
            busy[delivery["owner_service"]] += 1
        self._held_back = len(due) == free or any(n >= per_endpoint for n in busy.values())
        return len(due)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout.total_seconds())
        connector = aiohttp.TCPConnector(limit=self.settings.webhook_concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            try:
                while True:
                    self.wakeup.clear()
                    await self.store.schema_ready()
                    try:
                        await self.send_due(session)
                    except errors.SchemaMismatch:
                        pass  # logged by the schema gate; the next round waits in schema_ready()
                    except errors.DatabaseUnavailable:
                        log.warning("webhooks: PostgreSQL unavailable")
                    except Exception:
                        log.exception("webhooks: claiming deliveries failed")
                    await wait_event(self.wakeup, POLL_INTERVAL)
            finally:
                for task in self.tasks:
                    task.cancel()  # their leases run out: sent again by whichever replica runs then
                await asyncio.gather(*self.tasks, return_exceptions=True)


async def attempt(session: aiohttp.ClientSession, delivery: Any) -> tuple[int | None, str | None]:
    """POST one delivery: the receiver's status (None: no answer) and, unless 2xx, why it failed.

    Redirects are not followed (the body and its signature go to the registered URL only); a 3xx
    is a failed attempt naming its Location. Of an error answer only the head is read, as much as
    last_error keeps, and the connection is closed: a receiver's endless body costs nothing."""
    try:
        body, headers = message(delivery, datetime.now(UTC))
        async with session.post(delivery["url"], data=body.encode(), headers=headers, allow_redirects=False) as resp:
            if 200 <= resp.status < 300:
                return resp.status, None
            if 300 <= resp.status < 400:
                resp.close()
                return resp.status, f"redirect to {_location(resp)} not followed"
            return resp.status, await _head(resp)
    except TimeoutError:
        return None, f"TimeoutError: no complete answer within {session.timeout.total:g} s"
    except Exception as exc:  # network errors, a URL aiohttp refuses: a failed attempt
        return None, f"{type(exc).__name__}: {exc}"


def _location(resp: aiohttp.ClientResponse) -> str:
    """Where a redirect points, absolute and masked like the endpoint's own URL."""
    location = resp.headers.get("location")
    if not location:
        return "no Location"
    try:
        return mask_url_values(str(resp.url.join(URL(location))))
    except ValueError:
        return "an unparseable Location"


async def _head(resp: aiohttp.ClientResponse) -> str:
    """The first ERROR_KEPT characters of an answer's body, reading no more bytes than they can take."""
    wanted = ERROR_KEPT * 4  # UTF-8 spends at most 4 bytes on a character
    data = bytearray()
    while len(data) < wanted:
        chunk = await resp.content.read(wanted - len(data))
        if not chunk:
            break
        data += chunk
    if not resp.content.at_eof():
        resp.close()  # the rest is never read: the connection goes
    try:
        text = data.decode(resp.charset or "utf-8", errors="replace")
    except LookupError:
        text = data.decode("utf-8", errors="replace")
    return text[:ERROR_KEPT]
