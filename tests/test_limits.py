"""The scheduler: limits (pause, caps, per-minute starts and tokens, cool-down), fair share, claim cost.

Real PostgreSQL; several connections where concurrency is the point; rows read are counted with
PostgreSQL's statistics, never timed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from conftest import JSON_HEADERS, ClientFactory

API = "/api/v1"


RATE_LIMITED = "SELECT FROM aiservice.fail_job($1, 'w1', 'rate_limited', 'slow down', p_retry_after => '30 seconds')"


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


FILL = """
INSERT INTO aiservice.jobs (owner_service, owner_ref, task_type, model_profile, run_at, scheduled)
SELECT 'bulk', 'r' || i, 'llm_chat', $2, now() + $3::interval, $3::interval > interval '0'
FROM generate_series(1, $1) i
"""


HOUR = timedelta(hours=1)
