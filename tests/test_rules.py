"""Python's copies of SQL's limits (aiservice/rules.py) equal what SQL enforces, and the HTTP and SQL
front doors answer the same input the same way: accepted at each limit, refused just over it."""

from __future__ import annotations

import itertools
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeAlias, get_args

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from aiservice import rules
from aiservice.api.openapi import openapi_document
from aiservice.db.store import CALLER_WORDS
from aiservice.jobs import WebhookEvent

Conn: TypeAlias = "asyncpg.Connection[Any]"
Client = TestClient[Any, Any]
API = "/api/v1"
SECOND = timedelta(seconds=1)
# What SQL answers a value out of bounds with: invalid argument, or a CHECK constraint.
REFUSALS = {"AS422", "23514"}

_unique = itertools.count(1)

# CHECK constraint -> the bounds Python copies (rules.py).
CHECKS: dict[str, tuple[int | None, int]] = {
    "jobs_owner_service_check": (1, rules.NAME_LENGTH),
    "jobs_task_type_check": (1, rules.NAME_LENGTH),
    "jobs_model_profile_check": (1, rules.NAME_LENGTH),
    "jobs_owner_ref_check": (1, rules.REF_LENGTH),
    "jobs_idempotency_key_check": (1, rules.REF_LENGTH),
    "jobs_priority_check": (rules.PRIORITY_MIN, rules.PRIORITY_MAX),
    "jobs_max_attempts_check": (rules.MAX_ATTEMPTS_MIN, rules.MAX_ATTEMPTS_MAX),
    "limits_name_check": (1, rules.NAME_LENGTH),
    "limits_max_running_check": (0, rules.MAX_RUNNING_MAX),
    "limits_max_per_minute_check": (0, rules.MAX_PER_MINUTE_MAX),
    "limits_max_tokens_per_minute_check": (0, rules.MAX_TOKENS_PER_MINUTE_MAX),
    "limits_weight_check": (rules.WEIGHT_MIN, rules.WEIGHT_MAX),
    "webhooks_url_check": (None, rules.WEBHOOK_URL_LENGTH),
    "webhooks_events_check": (1, len(get_args(WebhookEvent))),  # each event at most once
}
_BOUND = re.compile(r"([<>]=) '?(-?\d+)'?(?:::\w+)?\)")


async def test_check_constraints_equal_the_python_copies(conn: Conn) -> None:
    rows = await conn.fetch(
        """
        SELECT c.conname, pg_get_constraintdef(c.oid) AS def
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = 'aiservice' AND c.contype = 'c'
        """
    )
    found: dict[str, tuple[int | None, int]] = {}
    for row in rows:
        bounds = dict((op, int(n)) for op, n in _BOUND.findall(row["def"]))
        if "<=" in bounds:  # a range with a number at its top: Python must hold a copy
            found[row["conname"]] = (bounds.get(">="), bounds["<="])
    assert found == CHECKS


def _property(schema: dict[str, Any], field: str) -> dict[str, Any]:
    prop: dict[str, Any] = schema["properties"][field]
    for option in prop.get("anyOf", [prop]):  # optional fields: [the type, null]
        if option.get("type") != "null":
            return dict(option)
    raise AssertionError(field)


@pytest.mark.parametrize(
    ("model", "field", "check"),
    [
        ("JobCreate", "owner_service", "jobs_owner_service_check"),
        ("JobCreate", "task_type", "jobs_task_type_check"),
        ("JobCreate", "model_profile", "jobs_model_profile_check"),
        ("JobCreate", "owner_ref", "jobs_owner_ref_check"),
        ("JobCreate", "idempotency_key", "jobs_idempotency_key_check"),
        ("JobCreate", "priority", "jobs_priority_check"),
        ("JobCreate", "max_attempts", "jobs_max_attempts_check"),
        ("BatchJob", "owner_ref", "jobs_owner_ref_check"),
        ("BatchJob", "priority", "jobs_priority_check"),
        ("JobDefaults", "max_attempts", "jobs_max_attempts_check"),
        ("LimitChange", "max_running", "limits_max_running_check"),
        ("LimitChange", "max_per_minute", "limits_max_per_minute_check"),
        ("LimitChange", "max_tokens_per_minute", "limits_max_tokens_per_minute_check"),
        ("LimitChange", "weight", "limits_weight_check"),
    ],
)
def test_the_openapi_document_states_sql_bounds(model: str, field: str, check: str) -> None:
    prop = _property(openapi_document()["components"]["schemas"][model], field)
    low, high = CHECKS[check]
    if prop["type"] == "string":
        assert (prop["minLength"], prop["maxLength"]) == (low, high)
    else:
        assert (prop["minimum"], prop["maximum"]) == (low, high)


async def test_every_constraint_given_in_callers_words_exists(conn: Conn) -> None:
    """CALLER_WORDS rewrites errors by constraint name: a renamed constraint would silently stop it."""
    checks = {r[0] for r in await conn.fetch("SELECT conname FROM pg_constraint WHERE contype = 'c'")}
    raised = {f"{action}_jobs_filter_required" for action in ("retry", "cancel")}
    assert set(CALLER_WORDS) <= checks | raised


# --- each front door, at each limit and just over it ------------------------------------------


async def running_job(conn: Conn) -> int:
    """A job of a task type of its own, claimed by worker w1."""
    task_type = f"rules_{next(_unique)}"
    await conn.fetchval("SELECT (r.job).id FROM aiservice.create_job('s', 'r', $1, 'm') r", task_type)
    job_id: int = await conn.fetchval("SELECT id FROM aiservice.claim_jobs('w1', p_task_types => ARRAY[$1])", task_type)
    return job_id


async def by_sql(call: Awaitable[Any]) -> str:
    try:
        await call
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate in REFUSALS, f"{exc.sqlstate}: {exc}"
        return "refused"
    return "accepted"


async def by_http(call: Awaitable[ClientResponse]) -> str:
    response = await call
    if response.status in (200, 201):
        return "accepted"
    assert response.status == 422, await response.text()
    return "refused"


Http = Callable[[Client, Conn, Any], Awaitable[ClientResponse]]
Sql = Callable[[Conn, Any], Awaitable[Any]]


async def fail_http(field: str, api: Client, conn: Conn, value: Any) -> ClientResponse:
    body = {"worker_id": "w1", "error_category": "x", field: value}
    return await api.post(f"{API}/jobs/{await running_job(conn)}/fail", json=body)


async def fail_sql(argument: str, conn: Conn, value: Any) -> Any:
    job_id = await running_job(conn)
    category = value if argument == "p_error_category" else "x"
    extra = "" if argument == "p_error_category" else f", {argument} => $3"
    args = (job_id, category) if argument == "p_error_category" else (job_id, category, value)
    return await conn.execute(f"SELECT 1 FROM aiservice.fail_job($1, 'w1', $2{extra})", *args)


async def claim_http(field: str, api: Client, conn: Conn, value: Any) -> ClientResponse:
    return await api.post(f"{API}/jobs/claim", json={"worker_id": "w9", "task_types": ["none"], field: value})


async def claim_sql(argument: str, conn: Conn, value: Any) -> Any:
    if argument == "p_worker_id":
        return await conn.execute("SELECT 1 FROM aiservice.claim_jobs($1, p_task_types => ARRAY['none'])", value)
    return await conn.execute(
        f"SELECT 1 FROM aiservice.claim_jobs('w9', p_task_types => ARRAY['none'], {argument} => $1)", value
    )


async def heartbeat_http(api: Client, conn: Conn, value: Any) -> ClientResponse:
    body = {"worker_id": "w1", "lease_timeout": value}
    return await api.post(f"{API}/jobs/{await running_job(conn)}/heartbeat", json=body)


async def heartbeat_sql(conn: Conn, value: Any) -> Any:
    return await conn.execute("SELECT 1 FROM aiservice.heartbeat_job($1, 'w1', $2)", await running_job(conn), value)


JOB = {"owner_service": "s", "owner_ref": "r", "task_type": "t", "model_profile": "m"}


async def create_http(field: str, api: Client, conn: Conn, value: Any) -> ClientResponse:
    return await api.post(f"{API}/jobs", json=JOB | {field: value})


async def create_sql(field: str, conn: Conn, value: Any) -> Any:
    args = JOB | {field: value}
    params = ", ".join(f"p_{name} => ${i}" for i, name in enumerate(args, 1))
    return await conn.execute(f"SELECT 1 FROM aiservice.create_job({params})", *args.values())


def limit_scope(field: str) -> str:
    """A scope that uses the field (weight is owner_service's alone)."""
    return "owner_service" if field == "weight" else "model_profile"


async def limit_http(field: str, api: Client, conn: Conn, value: Any) -> ClientResponse:
    return await api.put(f"{API}/limits/{limit_scope(field)}/m", json={field: value})


async def limit_sql(field: str, conn: Conn, value: Any) -> Any:
    return await conn.execute("SELECT 1 FROM aiservice.set_limit($1, 'm', $2)", limit_scope(field), {field: value})


def seconds(delta: timedelta) -> float:
    return delta.total_seconds()


def at_and_over(
    name: str, http: Http, sql: Sql, limit: Any, over: Any, to_http: Callable[[Any], Any] = lambda v: v
) -> list[tuple[str, Http, Sql, Any, Any, str]]:
    return [
        (f"{name} at the limit", http, sql, to_http(limit), limit, "accepted"),
        (f"{name} just over", http, sql, to_http(over), over, "refused"),
    ]


def _cases() -> list[tuple[str, Http, Sql, Any, Any, str]]:
    def bound(fn: Callable[..., Awaitable[Any]], first: str) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any) -> Any:
            return await fn(first, *args)

        return call

    name_at, name_over = "n" * rules.NAME_LENGTH, "n" * (rules.NAME_LENGTH + 1)
    ref_at, ref_over = "r" * rules.REF_LENGTH, "r" * (rules.REF_LENGTH + 1)
    category_at = "c" * rules.CATEGORY_LENGTH
    cases = [
        *at_and_over(
            "fail retry_after",
            bound(fail_http, "retry_after"),
            bound(fail_sql, "p_retry_after"),
            rules.MAX_RETRY_AFTER,
            rules.MAX_RETRY_AFTER + SECOND,
            seconds,
        ),
        *at_and_over(
            "fail error_category",
            bound(fail_http, "error_category"),
            bound(fail_sql, "p_error_category"),
            category_at,
            category_at + "c",
        ),
        *at_and_over(
            "claim lease_timeout",
            bound(claim_http, "lease_timeout"),
            bound(claim_sql, "p_lease_timeout"),
            rules.MAX_LEASE_TIMEOUT,
            rules.MAX_LEASE_TIMEOUT + SECOND,
            seconds,
        ),
        *at_and_over(
            "claim limit",
            bound(claim_http, "limit"),
            bound(claim_sql, "p_limit"),
            rules.CLAIM_LIMIT_MAX,
            rules.CLAIM_LIMIT_MAX + 1,
        ),
        *at_and_over(
            "claim worker_id", bound(claim_http, "worker_id"), bound(claim_sql, "p_worker_id"), name_at, name_over
        ),
        *at_and_over(
            "heartbeat lease_timeout",
            heartbeat_http,
            heartbeat_sql,
            rules.MAX_LEASE_TIMEOUT,
            rules.MAX_LEASE_TIMEOUT + SECOND,
            seconds,
        ),
        *at_and_over(
            "create priority",
            bound(create_http, "priority"),
            bound(create_sql, "priority"),
            rules.PRIORITY_MAX,
            rules.PRIORITY_MAX + 1,
        ),
        *at_and_over(
            "create priority (low)",
            bound(create_http, "priority"),
            bound(create_sql, "priority"),
            rules.PRIORITY_MIN,
            rules.PRIORITY_MIN - 1,
        ),
        *at_and_over(
            "create max_attempts",
            bound(create_http, "max_attempts"),
            bound(create_sql, "max_attempts"),
            rules.MAX_ATTEMPTS_MAX,
            rules.MAX_ATTEMPTS_MAX + 1,
        ),
        *at_and_over(
            "create owner_service",
            bound(create_http, "owner_service"),
            bound(create_sql, "owner_service"),
            name_at,
            name_over,
        ),
        *at_and_over(
            "create owner_ref", bound(create_http, "owner_ref"), bound(create_sql, "owner_ref"), ref_at, ref_over
        ),
        *at_and_over(
            "create idempotency_key",
            bound(create_http, "idempotency_key"),
            bound(create_sql, "idempotency_key"),
            ref_at,
            ref_over,
        ),
        *at_and_over(
            "limit max_running",
            bound(limit_http, "max_running"),
            bound(limit_sql, "max_running"),
            rules.MAX_RUNNING_MAX,
            rules.MAX_RUNNING_MAX + 1,
        ),
        *at_and_over(
            "limit weight",
            bound(limit_http, "weight"),
            bound(limit_sql, "weight"),
            rules.WEIGHT_MAX,
            rules.WEIGHT_MAX + 1,
        ),
    ]
    return cases


async def test_both_doors_accept_at_each_limit_and_refuse_just_over(api: Client, conn: Conn) -> None:
    answers = []
    for name, http, sql, http_value, sql_value, expected in _cases():
        answers.append((name, await by_http(http(api, conn, http_value)), await by_sql(sql(conn, sql_value)), expected))
    assert [a for a in answers if not a[1] == a[2] == a[3]] == []


async def test_both_doors_keep_the_head_of_a_long_error_message(api: Client, conn: Conn) -> None:
    """fail_job keeps the first ERROR_MESSAGE_LENGTH characters of a longer message; HTTP no longer
    refuses what SQL accepts."""
    message = "é" * rules.ERROR_MESSAGE_LENGTH + "tail"
    response = await fail_http("error_message", api, conn, message)
    assert response.status == 200, await response.text()
    assert (await response.json())["error_message"] == message[: rules.ERROR_MESSAGE_LENGTH]
    job_id = await running_job(conn)
    stored = await conn.fetchval("SELECT (aiservice.fail_job($1, 'w1', 'x', $2)).error_message", job_id, message)
    assert stored == message[: rules.ERROR_MESSAGE_LENGTH]


async def test_complete_jobs_takes_at_most_the_batch_the_worker_sends(conn: Conn) -> None:
    def call(n: int) -> Awaitable[Any]:
        return conn.fetch("SELECT * FROM aiservice.complete_jobs('w1', $1, $2)", list(range(1, n + 1)), [{"r": 1}] * n)

    assert len(await call(rules.COMPLETE_BATCH_MAX)) == rules.COMPLETE_BATCH_MAX
    assert await by_sql(call(rules.COMPLETE_BATCH_MAX + 1)) == "refused"
