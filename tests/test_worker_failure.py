"""Retry-After parsing, the mapping of provider HTTP statuses to failure categories, and who decides
whether a failure is retried (SQL's is_retryable)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest
from conftest import JobFactory
from stubs import wait_for

from aiservice.db.store import JobStore
from aiservice.jobs import Job
from aiservice.worker import failure
from aiservice.worker.runner import Runner

Conn: TypeAlias = "asyncpg.Connection[Any]"
NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, timedelta(seconds=7)),
        ({"retry-after": "1.5"}, timedelta(seconds=1.5)),
        ({"retry-after-ms": "250", "Retry-After": "9"}, timedelta(milliseconds=250)),
        ({"Retry-After": "Wed, 01 Jan 2025 12:00:30 GMT"}, timedelta(seconds=30)),
        ({"Retry-After": "Wed, 01 Jan 2025 11:00:00 GMT"}, timedelta(0)),
        ({"Retry-After": "-5"}, timedelta(0)),
        ({"Retry-After": "99999999"}, timedelta(days=7)),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "nan"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: timedelta | None) -> None:
    assert failure.retry_after(headers, now=NOW) == expected


@pytest.mark.parametrize(
    ("status", "detail", "category", "retryable"),
    [
        (429, "slow down", "rate_limited", True),
        (502, "", "provider_unavailable", True),
        (503, "", "provider_unavailable", True),
        (504, "", "provider_unavailable", True),
        (500, "", "provider_error", True),
        (507, "", "provider_error", True),
        (401, "", "auth_error", False),
        (403, "", "auth_error", False),
        (400, "maximum context length is 8192 tokens", "context_length_exceeded", False),
        (400, "bad temperature", "invalid_request", False),
        (404, "no such model", "invalid_request", False),
        (422, "", "invalid_request", False),
    ],
)
async def test_status_categories(status: int, detail: str, category: str, retryable: bool, conn: Conn) -> None:
    fail = failure.for_status(status, detail, {}, provider="http://llm:8000/v1")
    assert fail.category == category
    assert fail.message.startswith(f"http://llm:8000/v1 answered HTTP {status}")
    # The worker has no list of its own: SQL's is_retryable decides, as the README's table says.
    assert fail.retryable is None
    assert await conn.fetchval("SELECT aiservice.is_retryable($1)", category) is retryable


def test_redact_removes_secrets_and_cuts_long_messages() -> None:
    assert failure.redact("key sk-abcdef rejected", ["sk-abcdef", None]) == "key *** rejected"
    assert len(failure.redact("x" * 5000, [])) == failure.MESSAGE_LIMIT + 1


def test_redact_removes_credentials_a_provider_echoes() -> None:
    echoed = "401: bad Authorization: Basic d3VzZXI6cGFzc3dvcmQxMjM= (or Bearer sk-another-key-987654)"
    assert failure.redact(echoed, []) == "401: bad Authorization: Basic *** (or Bearer ***)"


@pytest.mark.parametrize(
    ("error_type", "code"),
    [
        ("no_db_connection", "400"),
        ("auth_error", "400"),
        ("authentication_error", None),
        ("invalid_request_error", "invalid_api_key"),
    ],
)
def test_a_400_that_means_a_refused_key_is_an_auth_error(error_type: str, code: str | None) -> None:
    fail = failure.for_status(400, "refused", {}, provider="llm", context_code=code, error_type=error_type)
    assert fail.category == "auth_error"


def test_only_the_code_and_type_passed_are_read() -> None:
    """worker/kinds/llm.py passes the openai error's type itself; an error being handled is not consulted,
    so the same call classifies the same way wherever it is made."""

    class ProviderError(Exception):
        status_code = 400
        type = "no_db_connection"
        code = "400"

    try:
        raise ProviderError("No connected db.")
    except ProviderError:
        unnamed = failure.for_status(400, "No connected db.", {}, provider="llm", context_code="400")
        named = failure.for_status(
            400, "No connected db.", {}, provider="llm", context_code="400", error_type="no_db_connection"
        )
    assert (unnamed.category, named.category) == ("invalid_request", "auth_error")


class TimesOut:
    """A job kind whose every attempt times out (a category SQL retries by default)."""

    name = "times_out"
    task_types: tuple[str, ...] = ("times_out",)
    model_profiles: tuple[str, ...] = ("m",)

    async def run(self, job: Job) -> dict[str, Any]:
        raise failure.timeout("no answer")

    async def close(self) -> None:
        return None


async def test_sql_is_retryable_decides_what_the_worker_retries(
    store: JobStore, job_factory: JobFactory, conn: Conn
) -> None:
    """An operator who replaces aiservice.is_retryable changes what the built-in workers retry too."""
    await conn.execute(
        "CREATE OR REPLACE FUNCTION aiservice.is_retryable(p_category text) RETURNS boolean"
        " LANGUAGE sql IMMUTABLE AS $$ SELECT false $$"
    )
    job = await job_factory(task_type="times_out", model_profile="m")
    runner = Runner(
        store,
        [TimesOut()],
        worker_id="w1",
        claim_limit=1,
        lease_timeout=timedelta(seconds=30),
        poll_interval=timedelta(milliseconds=50),
    )
    runner.start()

    async def attempted() -> bool:
        return (await store.get_job(job.id)).error_category is not None

    try:
        await wait_for(attempted, what="the first attempt to fail")
    finally:
        await runner.shutdown(grace=5)
    done = await store.get_job(job.id)
    assert (done.status, done.error_category, done.attempts) == ("failed", "timeout", 1)
