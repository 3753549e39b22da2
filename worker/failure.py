"""Failures of a job attempt: the category stored with the job. Whether it is retried is SQL's
decision (aiservice.is_retryable, called by fail_job) unless a job kind says otherwise."""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from aiservice import rules, settings
from aiservice.provider_errors import AUTH_ERROR_CODES

# Enough of a provider's message to diagnose; fail_job would keep up to rules.ERROR_MESSAGE_LENGTH.
MESSAGE_LIMIT = 1000

_CONTEXT_LENGTH = re.compile(
    r"context[ _-]?length|context window|maximum context|too many tokens|prompt is too long", re.IGNORECASE
)


class JobFailure(Exception):
    """Raised by a job kind to fail the attempt with a category; the runner records it with fail_job.

    ``retryable`` None (the default) leaves the decision to SQL: fail_job asks
    aiservice.is_retryable(category), the one list of retryable categories, which an operator may
    replace. True or False overrides it for this failure."""

    def __init__(
        self, category: str, message: str, *, retryable: bool | None = None, retry_after: timedelta | None = None
    ) -> None:
        super().__init__(f"{category}: {message}")
        self.category = category
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


def invalid_input(message: str) -> JobFailure:
    return JobFailure("invalid_input", message)


def timeout(message: str) -> JobFailure:
    return JobFailure("timeout", message)


def unavailable(message: str) -> JobFailure:
    return JobFailure("provider_unavailable", message)


def output_invalid(message: str) -> JobFailure:
    return JobFailure("output_invalid", message)


def for_status(
    status: int,
    detail: str,
    headers: Mapping[str, str],
    *,
    provider: str,
    context_code: str | None = None,
    error_type: str | None = None,
) -> JobFailure:
    """Map an HTTP error status from a provider to a category.

    ``detail`` is the provider's own message (already free of secrets); ``context_code`` is an error
    code from the body, checked together with the text for context-length errors; ``error_type`` is
    the body's error type (LiteLLM puts its reason there). Either may say that the key was refused
    (AUTH_ERROR_CODES), whatever the status: only what the caller passes is read."""
    message = f"{provider} answered HTTP {status}: {detail}".strip().rstrip(":")
    if status == 429:
        return JobFailure("rate_limited", message, retry_after=retry_after(headers))
    if status in (502, 503, 504):
        return JobFailure("provider_unavailable", message, retry_after=retry_after(headers))
    if status >= 500:
        return JobFailure("provider_error", message)
    if status in (401, 403) or AUTH_ERROR_CODES & _error_codes(context_code, error_type):
        return JobFailure("auth_error", message)
    if context_code == "context_length_exceeded" or _CONTEXT_LENGTH.search(detail):
        return JobFailure("context_length_exceeded", message)
    return JobFailure("invalid_request", message)


def _error_codes(code: str | None, error_type: str | None) -> set[str]:
    return {value.lower() for value in (code, error_type) if value is not None}


def retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> timedelta | None:
    """The delay a provider asks for: OpenAI's retry-after-ms, or Retry-After in seconds or as an HTTP date."""
    lowered = {k.lower(): v for k, v in headers.items()}
    delay = _seconds(lowered.get("retry-after-ms"), 0.001)
    if delay is None:
        delay = _seconds(lowered.get("retry-after"), 1.0)
    if delay is None and lowered.get("retry-after"):
        try:
            when = email.utils.parsedate_to_datetime(lowered["retry-after"])
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        delay = when - (now or datetime.now(UTC))
    if delay is None:
        return None
    return min(max(delay, timedelta(0)), rules.MAX_RETRY_AFTER)


def _seconds(raw: str | None, unit: float) -> timedelta | None:
    if raw is None:
        return None
    try:
        return timedelta(seconds=float(raw) * unit)
    except (ValueError, OverflowError):  # garbage, NaN or infinity
        return None


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Cut a message to size and blank out every secret it repeats (keys echoed back in errors)."""
    text = settings.redact(text, secrets)
    if len(text) > MESSAGE_LIMIT:
        text = text[:MESSAGE_LIMIT] + "…"
    return text
