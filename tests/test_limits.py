"""Limits and cool-downs over HTTP and in the settings: the routes, their 422 answers, the fields each
scope shows, and the cool-down bound as the API and the worker's store apply it.

The SQL functions themselves: tests/sql/test_limits.py (limits.sql) and tests/sql/test_claim.py
(limits as a claim meets them)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeAlias
from urllib.parse import quote

import asyncpg
import pytest
from conftest import JSON_HEADERS, ClientFactory
from sqlapi import call, claim, jobs, set_limit

from aiservice import rules
from aiservice.db.store import JobStore
from aiservice.settings import Settings, SettingsError

API = "/api/v1"


async def test_limits_over_http(api_factory: ClientFactory) -> None:
    api = await api_factory()
    put = await api.put(f"{API}/limits/task_type/transcribe", json={"max_running": 2, "paused": True})
    assert put.status == 200, await put.text()
    body = await put.json()
    assert body == {  # weight and cooldown apply to other scopes: not shown
        "scope": "task_type", "name": "transcribe", "paused": True, "max_running": 2, "max_per_minute": None,
        "max_tokens_per_minute": None, "running": 0, "started_last_minute": 0, "tokens_last_minute": 0,
    }  # fmt: skip
    again = await (await api.put(f"{API}/limits/task_type/transcribe", json={"paused": None})).json()
    assert (again["paused"], again["max_running"]) == (False, 2)
    listed = await (await api.get(f"{API}/limits")).json()
    assert [(x["scope"], x["name"]) for x in listed["limits"]] == [("task_type", "transcribe")]
    stats = await (await api.get(f"{API}/stats")).json()
    assert [x["name"] for x in stats["limits"]] == ["transcribe"]
    assert (await api.delete(f"{API}/limits/task_type/transcribe", headers=JSON_HEADERS)).status == 204
    missing = await api.delete(f"{API}/limits/task_type/transcribe", headers=JSON_HEADERS)
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("queue/x", {"paused": True}),
        ("task_type/x", {"max_running": -1}),
        ("owner_service/x", {"weight": 0}),
        ("task_type/x", {"max_per_minute": 10**15}),
        ("task_type/x", {"max_running": "5"}),
        ("task_type/x", {"max_running": True}),
        ("task_type/x", {"paused": 1}),
        ("task_type/x", {"cooldown_until": "2030-01-01T00:00:00Z"}),
        ("task_type/x", {"nope": 1}),
    ],
)
async def test_bad_limits_are_answered_422_over_http(api_factory: ClientFactory, path: str, body: Any) -> None:
    api = await api_factory()
    response = await api.put(f"{API}/limits/{path}", json=body)
    assert response.status == 422, await response.text()
    assert (await response.json())["error"]["code"] == "invalid_argument"


# --- from test_claim_fixes.py: Claims under limits, where they used to go wrong: owners a claim cannot serve,
# starts counted per minute, a pause racing claims in flight, a provider's long retry_after, fields per scope.
#
# Real PostgreSQL; two connections where the ordering between a claim and a limit change is the point.


Conn: TypeAlias = "asyncpg.Connection[Any]"


WEEK = timedelta(days=7)


async def cooldown_left(conn: Conn, profile: str) -> timedelta:
    (row,) = await conn.fetch(
        "SELECT cooldown_until - now() AS left FROM aiservice.limits WHERE scope = 'model_profile' AND name = $1",
        profile,
    )
    left: timedelta = row["left"]
    return left


async def test_the_api_and_the_worker_store_bound_cool_downs_by_the_setting(
    api_factory: ClientFactory, conn: Conn, pool: asyncpg.Pool
) -> None:
    api = await api_factory(cooldown_max=timedelta(seconds=30))
    (first, second) = await jobs(conn, 2, model_profile="gpt")
    assert len(await claim(conn, worker="w1", limit=2)) == 2
    reply = await api.post(
        f"{API}/jobs/{first}/fail",
        json={"worker_id": "w1", "error_category": "rate_limited", "retry_after": WEEK.total_seconds()},
    )
    assert reply.status == 200, await reply.text()
    assert timedelta(seconds=29) < await cooldown_left(conn, "gpt") <= timedelta(seconds=30)
    (limit,) = (await (await api.get(f"{API}/limits")).json())["limits"]
    assert limit["cooldown_until"] is not None

    await conn.execute("UPDATE aiservice.limits SET cooldown_until = NULL")
    worker_store = JobStore(pool, cooldown_max=timedelta(minutes=2))
    await worker_store.fail_job(second, "w1", "rate_limited", "slow down", retry_after=WEEK)
    assert timedelta(seconds=119) < await cooldown_left(conn, "gpt") <= timedelta(minutes=2)


def test_cooldown_max_setting() -> None:
    assert Settings().cooldown_max == timedelta(minutes=5)
    assert Settings.from_env({"COOLDOWN_MAX": "90s"}).cooldown_max == timedelta(seconds=90)
    assert Settings.from_env({"COOLDOWN_MAX": "168h"}).cooldown_max == rules.MAX_RETRY_AFTER
    for bad in ("0", "169h", "soon"):
        with pytest.raises(SettingsError, match=r"^COOLDOWN_MAX: "):
            Settings.from_env({"COOLDOWN_MAX": bad})


SCOPE_FIELDS = {
    "task_type": {"paused", "max_running", "max_per_minute", "max_tokens_per_minute"},
    "model_profile": {"paused", "max_running", "max_per_minute", "max_tokens_per_minute", "cooldown", "cooldown_until"},
    "owner_service": {"paused", "max_running", "max_per_minute", "max_tokens_per_minute", "weight"},
}


USAGE = {"scope", "name", "running", "started_last_minute", "tokens_last_minute"}


@pytest.mark.parametrize(
    ("scope", "fields", "field"),
    [
        ("task_type", {"weight": 2}, "weight"),
        ("task_type", {"cooldown": False}, "cooldown"),
        ("task_type", {"cooldown_until": None}, "cooldown_until"),
        ("owner_service", {"cooldown": None}, "cooldown"),
        ("model_profile", {"weight": None}, "weight"),
        ("model_profile", {"max_running": 2, "weight": 3}, "weight"),
    ],
)
async def test_a_field_another_scope_uses_is_refused(
    conn: Conn, api_factory: ClientFactory, scope: str, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(asyncpg.PostgresError) as refused:
        await set_limit(conn, scope, "x", **fields)
    assert refused.value.sqlstate == "AS422"
    assert f"{field} " in str(refused.value) and scope in str(refused.value)
    api = await api_factory()
    reply = await api.put(f"{API}/limits/{scope}/x", json=fields)
    assert reply.status == 422, await reply.text()
    error = (await reply.json())["error"]
    assert error["code"] == "invalid_argument" and field in error["message"] and scope in error["message"]
    assert await call(conn, "list_limits") == []


async def test_limits_show_only_the_fields_of_their_scope(conn: Conn, api_factory: ClientFactory) -> None:
    await set_limit(conn, "task_type", "transcribe", max_running=2)
    await set_limit(conn, "model_profile", "gpt", cooldown=False)
    await set_limit(conn, "owner_service", "tel", weight=3)
    rows = {r["scope"]: r for r in await call(conn, "list_limits")}
    assert (rows["task_type"]["weight"], rows["task_type"]["cooldown"]) == (None, None)
    assert (rows["owner_service"]["weight"], rows["owner_service"]["cooldown"]) == (3, None)
    assert (rows["model_profile"]["weight"], rows["model_profile"]["cooldown"]) == (None, False)
    api = await api_factory()
    for listed in [
        (await (await api.get(f"{API}/limits")).json())["limits"],
        (await (await api.get(f"{API}/stats")).json())["limits"],
    ]:
        assert {x["scope"]: set(x) for x in listed} == {s: f | USAGE for s, f in SCOPE_FIELDS.items()}
    put = await (await api.put(f"{API}/limits/task_type/transcribe", json={"paused": True})).json()
    assert set(put) == SCOPE_FIELDS["task_type"] | USAGE


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "nul\x7f", "bell\x07", "c1\x85", " padded", "padded ", "   "])
async def test_a_nonsense_limit_name_is_refused(conn: Conn, api_factory: ClientFactory, name: str) -> None:
    with pytest.raises(asyncpg.PostgresError) as refused:
        await set_limit(conn, "task_type", name, paused=True)
    assert refused.value.sqlstate == "AS422"
    api = await api_factory()
    reply = await api.put(f"{API}/limits/task_type/{quote(name, safe='')}", json={"paused": True})
    assert reply.status == 422, await reply.text()
    assert (await reply.json())["error"]["code"] == "invalid_argument"
    assert await call(conn, "list_limits") == []
