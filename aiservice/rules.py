"""Python's copies of the limits the SQL API enforces, in one place.

SQL is the rule: the CHECK constraints of migrations and the argument checks of schema/functions/.
The HTTP request bodies (aiservice/api/schemas.py, aiservice/jobs.py) and the worker
(worker/failure.py, worker/completer.py) read these copies so that they refuse, clamp or split
exactly where SQL would, and the OpenAPI document can state the bounds. tests/test_rules.py probes
SQL at each boundary (accepted at the limit, refused just over it) and reads the CHECK constraints
from pg_constraint, so a copy that drifts from SQL fails the suite.

Limits that only the HTTP API has (page size, batch size, JSON depth) live with its schemas."""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta

# CHECK constraints of aiservice.jobs (owner_service, task_type, model_profile; owner_ref,
# idempotency_key) and of aiservice.limits (name); claim_jobs checks worker_id like a name.
NAME_LENGTH = 200
# Webhook endpoint URLs (aiservice.webhooks): see webhook_url_problem.
WEBHOOK_URL_LENGTH = 2000
REF_LENGTH = 500
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000
MAX_ATTEMPTS_MIN, MAX_ATTEMPTS_MAX = 1, 100

# fail_job: the category pattern, and the delay it accepts (0 to 7 days).
CATEGORY_LENGTH = 64
CATEGORY_PATTERN = rf"^[a-z][a-z0-9_]{{0,{CATEGORY_LENGTH - 1}}}$"
MAX_RETRY_AFTER = timedelta(days=7)
# fail_job keeps the first ERROR_MESSAGE_LENGTH characters of a longer message (it does not refuse it).
ERROR_MESSAGE_LENGTH = 4000
# fail_job and cool_down: the bound on a profile's cool-down (p_cooldown_max), 0 to 7 days.
MAX_COOLDOWN = timedelta(days=7)

# claim_jobs and heartbeat_job: a lease is positive and at most 7 days.
MAX_LEASE_TIMEOUT = timedelta(days=7)
# claim_jobs: jobs per call; complete_jobs: jobs per call.
CLAIM_LIMIT_MAX = 1000
COMPLETE_BATCH_MAX = 1000

# CHECK constraints of aiservice.limits.
MAX_RUNNING_MAX = 1_000_000
MAX_PER_MINUTE_MAX = 100_000_000
MAX_TOKENS_PER_MINUTE_MAX = 1_000_000_000_000
WEIGHT_MIN, WEIGHT_MAX = 1, 10_000
# aiservice.limit_fields: the settable fields each scope uses (set_limit refuses the others).
_CAPS = ("paused", "max_running", "max_per_minute", "max_tokens_per_minute")
LIMIT_FIELDS: dict[str, tuple[str, ...]] = {
    "task_type": _CAPS,
    "model_profile": (*_CAPS, "cooldown", "cooldown_until"),
    "owner_service": (*_CAPS, "weight"),
}


_URL_AUTHORITY = re.compile(r"^https?://([^/?#]*)(.*)$", re.DOTALL)
_BRACKETED = re.compile(r"^\[([0-9A-Fa-f:.]+)\](:(.*))?$", re.DOTALL)
_HOST_PORT = re.compile(r"^([^:]*)(:(.*))?$", re.DOTALL)
_NOT_IN_HOST = re.compile(r'[\[\]\\<>"{}|^`]')


def webhook_url_problem(url: str) -> str | None:
    """Why a webhook URL cannot be sent to, or None: aiservice.webhook_url_problem's copy, in its
    words (tests/test_webhooks.py asks both about the same URLs)."""
    if len(url) > WEBHOOK_URL_LENGTH:
        return f"url must be an http:// or https:// URL of at most {WEBHOOK_URL_LENGTH} characters"
    parts = _URL_AUTHORITY.match(url)
    if parts is None:
        return "url must be an http:// or https:// URL"
    if re.search(r"\s", url):
        return "url must not contain whitespace"
    host = re.sub(r"^.*@", "", parts[1], flags=re.DOTALL)
    if host.startswith("["):
        bracketed = _BRACKETED.match(host)
        if bracketed is None or ":" not in bracketed[1]:
            return f"url: the host {host} is not an IPv6 address in brackets"
        try:
            ipaddress.IPv6Address(bracketed[1])
        except ValueError:
            return f"url: the host [{bracketed[1]}] is not an IPv6 address"
        port = bracketed[3]
    else:
        host_port = _HOST_PORT.match(host)
        assert host_port is not None  # matches any text
        if host_port[1] == "":
            return "url: the host is empty"
        if _NOT_IN_HOST.search(host_port[1]):
            return f"url: the host {host_port[1]} holds characters a host name cannot"
        port = host_port[3]
    if port and (not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535):
        return f"url: the port {port} is not a number from 1 to 65535"
    return None
