"""Retry-After parsing and the mapping of provider HTTP statuses to failure categories."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker import failure

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
def test_status_categories(status: int, detail: str, category: str, retryable: bool) -> None:
    fail = failure.for_status(status, detail, {}, provider="http://llm:8000/v1")
    assert (fail.category, fail.retryable) == (category, retryable)
    assert fail.message.startswith(f"http://llm:8000/v1 answered HTTP {status}")


def test_redact_removes_secrets_and_cuts_long_messages() -> None:
    assert failure.redact("key sk-abcdef rejected", ["sk-abcdef", None]) == "key *** rejected"
    assert len(failure.redact("x" * 5000, [])) == failure.MESSAGE_LIMIT + 1
