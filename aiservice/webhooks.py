"""Webhook delivery from the outbox: signed per the Standard Webhooks specification, at least once.

Deliveries are rows written in the transaction that finished a job or batch. Any API replica takes
due ones (SKIP LOCKED, leased for the attempt), POSTs them with a timeout, and records the outcome;
SQL decides the backoff, the max age and what a 410 does (aiservice.record_delivery)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
from datetime import UTC, datetime
from typing import Any

import aiohttp
from standardwebhooks.webhooks import Webhook as Signer

from aiservice import errors
from aiservice.db.jobs import JobStore
from aiservice.jobs import Job
from aiservice.settings import Settings, redact

log = logging.getLogger(__name__)

BATCH = 50


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
    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.wakeup = asyncio.Event()
        self.sent = 0

    def wake(self) -> None:
        self.wakeup.set()

    async def _send(self, session: aiohttp.ClientSession, delivery: Any) -> None:
        status: int | None = None
        error: str | None = None
        try:
            body, headers = message(delivery, datetime.now(UTC))
            async with session.post(delivery["url"], data=body.encode(), headers=headers) as resp:
                status = resp.status
                if not 200 <= status < 300:
                    error = (await resp.text(errors="replace"))[:300]
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        error = None if error is None else redact(error, [delivery["secret"]])
        outcome = await self.store.record_delivery(delivery["id"], status, error, self.settings.webhook_max_age)
        self.sent += outcome == "delivered"
        if outcome != "delivered":
            log.info(
                "webhook %s for %s: %s (%s)", delivery["event"], delivery["owner_service"], outcome, status or error
            )

    async def send_due(self, session: aiohttp.ClientSession) -> int:
        timeout = self.settings.webhook_timeout
        due = await self.store.claim_deliveries(BATCH, timeout * 2)
        await asyncio.gather(*(self._send(session, d) for d in due))
        return len(due)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout.total_seconds())
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await self.store.schema_ready()
                try:
                    if await self.send_due(session) == BATCH:
                        continue  # more may be due
                except errors.SchemaMismatch:
                    pass  # logged by the schema gate; the next round waits in schema_ready()
                except errors.DatabaseUnavailable:
                    log.warning("webhooks: PostgreSQL unavailable")
                except Exception:
                    log.exception("webhooks: delivery round failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), 1.0)
                self.wakeup.clear()
