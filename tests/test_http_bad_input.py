"""Bad input is answered 4xx with the one error shape, never 500, and changes nothing."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from conftest import JSON_HEADERS
from stubs import wait_for

from aiservice.api.app import create_app
from aiservice.db.store import JobStore
from aiservice.jobs import MAX_JSON_DEPTH, Job, JobFilter
from aiservice.settings import Settings

Client = TestClient[Any, Any]
ClientFactory = Callable[..., Awaitable[Client]]
JobFactory = Callable[..., Awaitable[Job]]
API = "/api/v1"

_unique = itertools.count(1)

JOB = {"owner_service": "telephony", "owner_ref": "beeline/1", "task_type": "llm_chat", "model_profile": "qwen"}

# POST routes with a JSON body, "{id}" filled with a running job of worker "w1".
BODY_ROUTES = [
    "/jobs",
    "/jobs/batch",
    "/jobs/retry",
    "/jobs/cancel",
    "/jobs/claim",
    "/jobs/{id}/complete",
    "/jobs/{id}/fail",
    "/jobs/{id}/heartbeat",
]
# Routes with a job id in the path.
ID_ROUTES = [
    ("GET", "/jobs/{id}"),
    ("POST", "/jobs/{id}/complete"),
    ("POST", "/jobs/{id}/fail"),
    ("POST", "/jobs/{id}/heartbeat"),
    ("POST", "/jobs/{id}/retry"),
    ("POST", "/jobs/{id}/cancel"),
]


def valid_body(route: str) -> dict[str, Any]:
    """A body each route accepts (so a refusal is down to the one thing a test breaks)."""
    return {
        "/jobs": JOB | {"owner_ref": f"beeline/{next(_unique)}"},
        "/jobs/batch": {"defaults": {"task_type": "t", "model_profile": "m"}, "jobs": [JOB]},
        "/jobs/retry": {"owner_service": "nobody"},
        "/jobs/cancel": {"owner_service": "nobody"},
        "/jobs/claim": {"worker_id": "w9", "task_types": ["nothing"]},
        "/jobs/{id}/complete": {"worker_id": "w1", "result": {"content": "ok"}},
        "/jobs/{id}/fail": {"worker_id": "w1", "error_category": "bad_output"},
        "/jobs/{id}/heartbeat": {"worker_id": "w1"},
    }[route]


async def refused(response: ClientResponse, status: int, code: str | None = None, case: Any = None) -> dict[str, Any]:
    """Assert the status and the one error shape; ``case`` labels a failure inside a loop."""
    text = await response.text()
    assert response.status == status, (case, text)
    assert response.content_type == "application/json", (case, text)
    body = json.loads(text)
    assert set(body) == {"error"}, (case, body)
    error = body["error"]
    assert isinstance(error["code"], str), case
    assert error["code"], case
    assert isinstance(error["message"], str), case
    assert error["message"], case
    if code is not None:
        assert error["code"] == code, (case, error)
    return dict(error)


async def invalid(response: ClientResponse, *mentions: str, case: Any = None) -> dict[str, Any]:
    """422 invalid_argument whose message names what was wrong."""
    error = await refused(response, 422, "invalid_argument", case)
    for word in mentions:
        assert word in error["message"], (case, error)
    return error


class Target:
    """The API plus one running job of worker w1, and a way to check nothing changed."""

    def __init__(self, api: Client, store: JobStore, job: Job) -> None:
        self.api = api
        self.store = store
        self.job = job

    def url(self, route: str) -> str:
        return API + route.replace("{id}", str(self.job.id))

    async def post_raw(self, route: str, data: bytes, content_type: str = "application/json") -> ClientResponse:
        return await self.api.post(self.url(route), data=data, headers={"Content-Type": content_type})

    async def post(self, route: str, body: Any) -> ClientResponse:
        return await self.post_raw(route, json.dumps(body).encode())

    async def unchanged(self) -> None:
        jobs = await self.store.list_jobs(JobFilter(), before_id=None, limit=100)
        assert [j.id for j in jobs] == [self.job.id], "bad input created a job"
        assert await self.store.get_job(self.job.id) == self.job, "bad input changed a job"


async def make_target(api: Client, store: JobStore, job_factory: JobFactory) -> Target:
    created = await job_factory(task_type="bad_input")
    (job,) = await store.claim_jobs("w1", 1, lease_timeout=timedelta(minutes=10), task_types=["bad_input"])
    assert job.id == created.id
    return Target(api, store, await store.get_job(job.id))  # as GET shows it (a claim adds dependencies)


@pytest.fixture
async def target(api: Client, store: JobStore, job_factory: JobFactory) -> Target:
    return await make_target(api, store, job_factory)


# --- the body as a whole -----------------------------------------------------------

MALFORMED_JSON = [
    b"",
    b"{",
    b"{'owner_service': 'x'}",
    b'{"a": 1,}',
    b'{"a": 1} {"b": 2}',
    b"nul",
    b'{"a": tru}',
    b'{"a": "unterminated}',
    b"\x00",
]


async def test_malformed_json_is_400(target: Target) -> None:
    for route, raw in itertools.product(BODY_ROUTES, MALFORMED_JSON):
        error = await refused(await target.post_raw(route, raw), 400, "bad_request", (route, raw))
        assert "JSON" in error["message"], (route, raw)
    await target.unchanged()


INVALID_UTF8 = [
    b'{"owner_service": "\xff"}',
    b'{"owner_service": "\xc0\xaf"}',  # overlong encoding
    b'{"owner_service": "\xed\xa0\x80"}',  # an encoded surrogate
    b'{"input": {"text": "caf\xe9"}}',  # latin-1
    b"\xff\xfe\xfd",
]


async def test_invalid_utf8_is_400(target: Target) -> None:
    for route, raw in itertools.product(BODY_ROUTES, INVALID_UTF8):
        error = await refused(await target.post_raw(route, raw), 400, "bad_request", (route, raw))
        assert "UTF-8" in error["message"], (route, raw, error)
    await target.unchanged()


async def test_wrong_content_type_is_415(target: Target) -> None:
    for route in BODY_ROUTES:
        raw = json.dumps(valid_body(route)).encode()
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml", "application/jsonx"):
            response = await target.post_raw(route, raw, content_type)
            await refused(response, 415, "unsupported_media_type", (route, content_type))
        # No content type at all, and a form.
        response = await target.api.post(target.url(route), data=raw)
        await refused(response, 415, "unsupported_media_type", route)
        response = await target.api.post(target.url(route), data={"owner_service": "x"})
        await refused(response, 415, "unsupported_media_type", route)
    await target.unchanged()

    # A charset parameter is fine.
    raw = json.dumps(valid_body("/jobs")).encode()
    response = await target.post_raw("/jobs", raw, "application/json; charset=utf-8")
    assert response.status == 201, await response.text()


async def test_a_body_that_is_not_an_object_is_422(target: Target) -> None:
    for route, body in itertools.product(BODY_ROUTES, [[], [{}], "text", 7, None, True]):
        await invalid(await target.post(route, body), case=(route, body))
    await target.unchanged()


async def test_unknown_fields_are_422(target: Target) -> None:
    for route in BODY_ROUTES:
        error = await invalid(await target.post(route, valid_body(route) | {"colour": "red"}), "colour", case=route)
        assert error["details"][0]["type"] == "extra_forbidden", route
    for route, body, field in UNKNOWN_NESTED:
        await invalid(await target.post(route, body), field, case=(route, body))
    await target.unchanged()


UNKNOWN_NESTED: list[tuple[str, dict[str, Any], str]] = [
    ("/jobs/batch", {"defaults": {"task_type": "t", "idempotency_key": "k"}, "jobs": [JOB]}, "idempotency_key"),
    ("/jobs/batch", {"defaults": {"colour": 1}, "jobs": [JOB]}, "colour"),
    ("/jobs/batch", {"jobs": [JOB | {"colour": 1}]}, "colour"),
    ("/jobs/retry", {"statuses": ["failed"]}, "statuses"),
    ("/jobs/cancel", {"owner": "telephony"}, "owner"),
    ("/jobs/claim", {"worker_id": "w", "task_type": "llm_chat"}, "task_type"),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": "x", "category": "x"}, "category"),
]


# --- field values ---------------------------------------------------------------

WRONG_VALUES: list[tuple[str, dict[str, Any], str]] = [
    # create
    ("/jobs", JOB | {"owner_service": 5}, "owner_service"),
    ("/jobs", JOB | {"owner_ref": None}, "owner_ref"),
    ("/jobs", JOB | {"task_type": ["llm_chat"]}, "task_type"),
    ("/jobs", JOB | {"model_profile": {"name": "qwen"}}, "model_profile"),
    ("/jobs", JOB | {"owner_service": ""}, "owner_service"),
    ("/jobs", JOB | {"owner_ref": "r" * 501}, "owner_ref"),
    ("/jobs", JOB | {"task_type": "t" * 201}, "task_type"),
    ("/jobs", JOB | {"input": [1, 2]}, "input"),
    ("/jobs", JOB | {"input": "text"}, "input"),
    ("/jobs", JOB | {"input": None}, "input"),
    ("/jobs", JOB | {"priority": "high"}, "priority"),
    ("/jobs", JOB | {"priority": 1.5}, "priority"),
    ("/jobs", JOB | {"priority": -1001}, "priority"),
    ("/jobs", JOB | {"priority": 1001}, "priority"),
    ("/jobs", JOB | {"priority": 2**31}, "priority"),
    ("/jobs", JOB | {"priority": -(2**31) - 1}, "priority"),
    ("/jobs", JOB | {"priority": 10**30}, "priority"),
    ("/jobs", JOB | {"max_attempts": 0}, "max_attempts"),
    ("/jobs", JOB | {"max_attempts": 101}, "max_attempts"),
    ("/jobs", JOB | {"max_attempts": "three"}, "max_attempts"),
    ("/jobs", JOB | {"run_at": "tomorrow"}, "run_at"),
    ("/jobs", JOB | {"run_at": "2031-02-30T00:00:00Z"}, "run_at"),
    ("/jobs", JOB | {"run_at": "0001-01-01T00:00:00+01:00"}, "run_at"),
    ("/jobs", JOB | {"run_at": "9999-12-31T23:59:59-01:00"}, "run_at"),
    ("/jobs", JOB | {"idempotency_key": 42}, "idempotency_key"),
    ("/jobs", JOB | {"idempotency_key": ""}, "idempotency_key"),
    ("/jobs", {"owner_service": "telephony"}, "owner_ref"),
    # batch
    ("/jobs/batch", {"jobs": "many"}, "jobs"),
    ("/jobs/batch", {"jobs": [1]}, "jobs"),
    ("/jobs/batch", {"defaults": [], "jobs": [JOB]}, "defaults"),
    ("/jobs/batch", {"defaults": {"priority": 5000}, "jobs": [JOB]}, "priority"),
    ("/jobs/batch", {"jobs": [JOB | {"priority": -5000}]}, "priority"),
    ("/jobs/batch", {"jobs": [JOB | {"input": [1]}]}, "input"),
    ("/jobs/batch", {"defaults": {"input": "x"}, "jobs": [JOB]}, "input"),
    ("/jobs/batch", {"defaults": JOB}, "jobs"),
    # retry / cancel by filter
    ("/jobs/retry", {"ids": ["one"]}, "ids"),
    ("/jobs/retry", {"ids": [0]}, "ids"),
    ("/jobs/retry", {"ids": [2**63]}, "ids"),
    ("/jobs/retry", {"ids": 5}, "ids"),
    ("/jobs/retry", {"status": "failed"}, "status"),
    ("/jobs/retry", {"status": ["bogus"]}, "status"),
    ("/jobs/cancel", {"status": ["PENDING"]}, "status"),
    ("/jobs/cancel", {"created_after": "yesterday"}, "created_after"),
    ("/jobs/cancel", {"created_before": "9999-12-31T23:59:59-01:00"}, "created_before"),
    ("/jobs/cancel", {"all": [True]}, "all"),
    ("/jobs/cancel", {"owner_service": ""}, "owner_service"),
    # claim
    ("/jobs/claim", {}, "worker_id"),
    ("/jobs/claim", {"worker_id": 1}, "worker_id"),
    ("/jobs/claim", {"worker_id": "w", "limit": "ten"}, "limit"),
    ("/jobs/claim", {"worker_id": "w", "limit": 0}, "limit"),
    ("/jobs/claim", {"worker_id": "w", "limit": 1001}, "limit"),
    ("/jobs/claim", {"worker_id": "w", "limit": 10**30}, "limit"),
    ("/jobs/claim", {"worker_id": "w", "task_types": "llm_chat"}, "task_types"),
    ("/jobs/claim", {"worker_id": "w", "model_profiles": [1]}, "model_profiles"),
    ("/jobs/claim", {"worker_id": "w", "lease_timeout": 0}, "lease_timeout"),
    ("/jobs/claim", {"worker_id": "w", "lease_timeout": -5}, "lease_timeout"),
    ("/jobs/claim", {"worker_id": "w", "lease_timeout": "5m"}, "lease_timeout"),
    ("/jobs/claim", {"worker_id": "w", "lease_timeout": 10**12}, "lease_timeout"),
    # complete / fail / heartbeat
    ("/jobs/{id}/complete", {"worker_id": "w1"}, "result"),
    ("/jobs/{id}/complete", {"worker_id": "w1", "result": "done"}, "result"),
    ("/jobs/{id}/complete", {"worker_id": "w1", "result": ["done"]}, "result"),
    ("/jobs/{id}/complete", {"worker_id": "w1", "result": None}, "result"),
    ("/jobs/{id}/complete", {"result": {}}, "worker_id"),
    ("/jobs/{id}/complete", {"worker_id": "w1", "result": {}, "lease_token": "not-a-uuid"}, "lease_token"),
    ("/jobs/{id}/fail", {"worker_id": "w1"}, "error_category"),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": "Bad Category"}, "error_category"),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": ""}, "error_category"),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": "a" * 65}, "error_category"),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": 3}, "error_category"),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": "x", "error_message": 12}, "error_message"),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": "x", "retry_after": -1}, "retry_after"),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": "x", "retry_after": 10**9}, "retry_after"),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": "x", "retryable": "perhaps"}, "retryable"),
    ("/jobs/{id}/heartbeat", {}, "worker_id"),
    ("/jobs/{id}/heartbeat", {"worker_id": "w1", "lease_timeout": -1}, "lease_timeout"),
    ("/jobs/{id}/heartbeat", {"worker_id": "w1", "lease_timeout": [60]}, "lease_timeout"),
]


async def test_wrong_types_and_values_are_422(target: Target) -> None:
    for route, body, field in WRONG_VALUES:
        error = await invalid(await target.post(route, body), field, case=(route, body))
        assert error["details"], (route, body, error)
        assert all(isinstance(d["loc"], list) and d["msg"] for d in error["details"]), error
    await target.unchanged()


# JSON has types: a request body is taken as sent, never coerced ("5" is not 5, 1 is not true).
NOT_COERCED: list[tuple[str, dict[str, Any], str]] = [
    ("/jobs/cancel", {"all": "yes"}, "all"),
    ("/jobs/cancel", {"all": 1}, "all"),
    ("/jobs/retry", {"all": "true"}, "all"),
    ("/jobs/retry", {"ids": [True]}, "ids"),
    ("/jobs/cancel", {"ids": ["7"]}, "ids"),
    ("/jobs/cancel", {"ids": [7.0]}, "ids"),
    ("/jobs", JOB | {"priority": True}, "priority"),
    ("/jobs", JOB | {"priority": "5"}, "priority"),
    ("/jobs", JOB | {"max_attempts": 3.0}, "max_attempts"),
    ("/jobs", JOB | {"run_at": 1700000000}, "run_at"),
    ("/jobs/batch", {"jobs": [JOB | {"priority": "5"}]}, "priority"),
    ("/jobs/batch", {"defaults": {"max_attempts": True}, "jobs": [JOB]}, "max_attempts"),
    ("/jobs/claim", {"worker_id": "w", "limit": "2"}, "limit"),
    ("/jobs/claim", {"worker_id": "w", "lease_timeout": True}, "lease_timeout"),
    ("/jobs/claim", {"worker_id": "w", "lease_timeout": "60"}, "lease_timeout"),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": "x", "retryable": 1}, "retryable"),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": "x", "retryable": "false"}, "retryable"),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": "x", "retry_after": "30"}, "retry_after"),
]


async def test_values_of_the_wrong_json_type_are_not_coerced(target: Target) -> None:
    for route, body, field in NOT_COERCED:
        await invalid(await target.post(route, body), field, case=(route, body))
    await target.unchanged()


async def test_values_json_has_no_type_for_are_strings(target: Target) -> None:
    """Timestamps, lease tokens and statuses come as strings, and are still read as such."""
    response = await target.post("/jobs", JOB | {"owner_ref": "when", "run_at": "2031-01-02T03:04:05+02:00"})
    assert response.status == 201, await response.text()
    response = await target.post("/jobs/cancel", {"status": ["pending"], "created_after": "2000-01-01T00:00:00Z"})
    assert response.status == 200, await response.text()
    body = {"worker_id": "w1", "lease_timeout": 60, "lease_token": str(target.job.lease_token)}
    response = await target.post("/jobs/{id}/heartbeat", body)
    assert response.status == 200, await response.text()


async def test_a_run_at_postgresql_cannot_store_is_out_of_range(target: Target) -> None:
    """The earliest and latest instants Python has are PostgreSQL's -infinity and infinity, which
    jobs.run_at refuses: the caller hears about run_at, not about the constraint's name."""
    for run_at in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"):
        for route, body in (
            ("/jobs", JOB | {"run_at": run_at}),
            ("/jobs/batch", {"defaults": {"run_at": run_at}, "jobs": [JOB]}),
        ):
            error = await invalid(await target.post(route, body), case=(route, run_at))
            assert error["message"] == "run_at is out of range", error
    await target.unchanged()


# --- characters PostgreSQL cannot store, and odd JSON ------------------------------------------

NUL_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("/jobs", JOB | {"owner_service": "tele\x00phony"}),
    ("/jobs", JOB | {"owner_ref": "\x00"}),
    ("/jobs", JOB | {"task_type": "llm\x00"}),
    ("/jobs", JOB | {"model_profile": "q\x00"}),
    ("/jobs", JOB | {"idempotency_key": "k\x00"}),
    ("/jobs", JOB | {"input": {"text": "a\x00b"}}),
    ("/jobs", JOB | {"input": {"a\x00": 1}}),
    ("/jobs", JOB | {"input": {"deep": [{"x": ["\x00"]}]}}),
    ("/jobs/batch", {"defaults": {"input": {"t": "\x00"}}, "jobs": [JOB]}),
    ("/jobs/batch", {"jobs": [JOB, JOB | {"owner_ref": "x", "input": {"t": "\x00"}}]}),
    ("/jobs/batch", {"jobs": [JOB | {"owner_ref": "\x00"}]}),
    ("/jobs/retry", {"owner_service": "\x00"}),
    ("/jobs/cancel", {"task_type": "a\x00"}),
    ("/jobs/claim", {"worker_id": "w\x00"}),
    ("/jobs/claim", {"worker_id": "w", "task_types": ["\x00"]}),
    ("/jobs/{id}/complete", {"worker_id": "w1", "result": {"content": "ok\x00"}}),
    ("/jobs/{id}/complete", {"worker_id": "w1\x00", "result": {}}),
    ("/jobs/{id}/fail", {"worker_id": "w1", "error_category": "x", "error_message": "boom\x00"}),
    ("/jobs/{id}/heartbeat", {"worker_id": "\x00"}),
]


async def test_nul_characters_are_422(target: Target) -> None:
    for route, body in NUL_BODIES:
        await invalid(await target.post(route, body), case=(route, body))
    await target.unchanged()


LONE_SURROGATES: list[tuple[str, bytes]] = [
    ("/jobs", b'{"owner_service": "\\ud800", "owner_ref": "r", "task_type": "t", "model_profile": "m"}'),
    (
        "/jobs",
        b'{"owner_service": "s", "owner_ref": "r", "task_type": "t", "model_profile": "m", "input": {"x": "\\udfff"}}',
    ),
    ("/jobs/claim", b'{"worker_id": "\\ud83d"}'),
    ("/jobs/{id}/complete", b'{"worker_id": "w1", "result": {"\\ud800": 1}}'),
    ("/jobs/{id}/fail", b'{"worker_id": "w1", "error_category": "x", "error_message": "\\ud800"}'),
]


async def test_lone_surrogate_escapes_are_422(target: Target) -> None:
    for route, raw in LONE_SURROGATES:
        await invalid(await target.post_raw(route, raw), case=(route, raw))
    await target.unchanged()


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


def raw_nested(depth: int) -> str:
    """The same shape as text, for depths json.dumps itself would refuse."""
    return '{"k": [' * (depth // 2) + "1" + "]}" * (depth // 2)


async def test_nesting_up_to_the_limit_is_stored_and_read_back(target: Target) -> None:
    deep = {"x": nested(MAX_JSON_DEPTH - 1)}
    response = await target.post("/jobs", JOB | {"input": deep})
    assert response.status == 201, await response.text()
    job = await response.json()
    assert job["input"] == deep
    assert (await (await target.api.get(target.url(f"/jobs/{job['id']}"))).json())["input"] == deep
    listed = await target.api.get(target.url("/jobs"))
    assert listed.status == 200
    done = await target.post("/jobs/{id}/complete", {"worker_id": "w1", "result": deep})
    assert done.status == 200, await done.text()


async def test_too_deep_json_input_is_422_and_stores_nothing(target: Target) -> None:
    for depth in (MAX_JSON_DEPTH, 255, 600):
        payload = {"x": nested(depth)}
        bodies = [
            ("/jobs", JOB | {"input": payload}),
            ("/jobs/batch", {"defaults": {"input": payload}, "jobs": [JOB]}),
            ("/jobs/batch", {"jobs": [JOB | {"input": payload}]}),
            ("/jobs/{id}/complete", {"worker_id": "w1", "result": payload}),
        ]
        for route, body in bodies:
            await invalid(await target.post_raw(route, json.dumps(body).encode()), "deep", case=(route, depth))
    await target.unchanged()


async def test_json_too_deep_to_parse_is_400(target: Target) -> None:
    for depth, route in itertools.product((2_000, 200_000), BODY_ROUTES):
        raw = '{"input": ' + raw_nested(depth) + "}"
        await refused(await target.post_raw(route, raw.encode()), 400, "bad_request", (route, depth))
    await target.unchanged()


async def test_non_finite_numbers_are_422(target: Target) -> None:
    job = b'"owner_service": "s", "owner_ref": "r", "task_type": "t", "model_profile": "m"'
    for extra in (
        b'"input": {"x": NaN}',
        b'"input": {"x": Infinity}',
        b'"input": {"x": [-1e999]}',
        b'"priority": NaN',
        b'"max_attempts": 1e999',
    ):
        await invalid(await target.post_raw("/jobs", b"{" + job + b", " + extra + b"}"), case=extra)
    durations = [
        ("/jobs/claim", b'{"worker_id": "w1", "lease_timeout": %s}', "lease_timeout"),
        ("/jobs/{id}/heartbeat", b'{"worker_id": "w1", "lease_timeout": %s}', "lease_timeout"),
        ("/jobs/{id}/fail", b'{"worker_id": "w1", "error_category": "x", "retry_after": %s}', "retry_after"),
    ]
    for (route, template, field), number in itertools.product(durations, (b"NaN", b"Infinity", b"-Infinity", b"1e999")):
        await invalid(await target.post_raw(route, template % number), field, case=(route, number))
    await target.unchanged()


async def test_non_finite_numbers_are_422_in_a_batch_too(target: Target) -> None:
    """A single create and a batch answer NaN the same way: refused, never stored as null."""
    job = b'{"owner_service": "s", "owner_ref": "r", "task_type": "t", "model_profile": "m", "input": {"x": %s}}'
    for number in (b"NaN", b"Infinity", b"-Infinity"):
        for raw in (
            job % number,
            b'{"jobs": [' + job % number + b"]}",
            b'{"defaults": {"input": {"x": [%s]}}, "jobs": [{"owner_service": "s", "owner_ref": "r", '
            b'"task_type": "t", "model_profile": "m"}]}' % number,
        ):
            route = "/jobs/batch" if raw.startswith(b'{"jobs"') or raw.startswith(b'{"defaults"') else "/jobs"
            await invalid(await target.post_raw(route, raw), "input", case=raw)
    await target.unchanged()


async def test_an_integer_too_long_to_parse_is_400(target: Target) -> None:
    raw = b'{"owner_service": "s", "owner_ref": "r", "task_type": "t", "model_profile": "m", "input": {"n": '
    await refused(await target.post_raw("/jobs", raw + b"9" * 5000 + b"}}"), 400, "bad_request")
    await refused(await target.post_raw("/jobs/claim", b'{"worker_id": "w", "limit": ' + b"1" * 5000 + b"}"), 400)
    await target.unchanged()


async def test_odd_but_valid_values_are_stored(target: Target) -> None:
    big = int("9" * 200)
    response = await target.post("/jobs", JOB | {"input": {"n": big, "f": 0.1, "neg": -big, "s": "é😀"}})
    assert response.status == 201, await response.text()
    assert (await response.json())["input"] == {"n": big, "f": 0.1, "neg": -big, "s": "é😀"}

    # Naive timestamps are UTC; far ones that exist in UTC work.
    response = await target.post("/jobs", JOB | {"run_at": "2031-01-02T03:04:05"})
    assert response.status == 201, await response.text()
    run_at = datetime.fromisoformat((await response.json())["run_at"])
    assert run_at == datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    response = await target.post("/jobs", JOB | {"owner_ref": "far", "run_at": "9999-12-31T23:59:59Z"})
    assert response.status == 201, await response.text()


# --- size ----------------------------------------------------------------------------


async def test_oversize_body_is_413(api_factory: ClientFactory, store: JobStore, job_factory: JobFactory) -> None:
    api = await api_factory(http_max_body_bytes=1000)
    target = await make_target(api, store, job_factory)
    bulky = JOB | {"input": {"text": "x" * 2000}}
    error = await refused(await target.post("/jobs", bulky), 413, "payload_too_large")
    assert "1000" in error["message"]
    for route in BODY_ROUTES:
        padded = valid_body(route) | {"padding": "x" * 5000}
        await refused(await target.post(route, padded), 413, "payload_too_large")
    # Far larger than the limit, and not even JSON.
    await refused(await target.post_raw("/jobs", b"x" * 200_000), 413, "payload_too_large")
    await refused(await target.post_raw("/jobs/batch", b"[" * 200_000), 413, "payload_too_large")
    await target.unchanged()
    # Under the limit is fine.
    small = await target.post("/jobs", JOB | {"input": {"text": "x" * 100}})
    assert small.status == 201, await small.text()


async def test_a_client_that_drops_a_chunked_upload_is_a_disconnect_not_an_error(
    settings: Settings, store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Half a chunked body, then the socket closes: logged as the client's disconnect, without a
    traceback; the service goes on serving. Served as `aiservice serve` serves it (the test client's
    server would cancel the handler instead)."""
    caplog.set_level(logging.INFO, logger="aiservice")
    runner = web.AppRunner(create_app(settings, store=store))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        _reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + b'{"owner_service"'
        )
        await writer.drain()
        await asyncio.sleep(0.1)  # the handler is reading the body
        writer.close()
        await writer.wait_closed()

        async def logged() -> bool:
            return any(r.name == "aiservice.api.app" for r in caplog.records)

        await wait_for(logged, what="the disconnect to be logged")
        records = [r for r in caplog.records if r.name.startswith("aiservice")]
        assert [r.levelno for r in records] == [logging.INFO], [r.getMessage() for r in records]
        assert records[0].exc_info is None
        assert "closed the connection" in records[0].getMessage()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        await runner.cleanup()
    assert await store.list_jobs(JobFilter(), before_id=None, limit=10) == []


# --- query strings ----------------------------------------------------------------------

BAD_QUERIES = [
    ("status=bogus", "status"),
    ("status=PENDING", "status"),
    ("status=pending&status=bogus", "status"),
    ("status=", "status"),
    ("limit=0", "limit"),
    ("limit=-1", "limit"),
    ("limit=501", "limit"),
    ("limit=1000000", "limit"),
    ("limit=99999999999999999999", "limit"),
    ("limit=" + "9" * 5000, "limit"),
    ("limit=1e3", "limit"),
    ("limit=ten", "limit"),
    ("limit=", "limit"),
    ("cursor=abc", "cursor"),
    ("cursor=0", "cursor"),
    ("cursor=-5", "cursor"),
    ("cursor=99999999999999999999", "cursor"),
    ("created_after=yesterday", "created_after"),
    ("created_before=2024-13-01T00:00:00Z", "created_before"),
    ("created_after=0001-01-01T00:00:00%2B01:00", "created_after"),
    ("created_before=9999-12-31T23:59:59-01:00", "created_before"),
    ("owner_service=", "owner_service"),
    ("owner_service=a%00b", "owner_service"),
    ("task_type=" + "t" * 201, "task_type"),
    ("colour=red", "colour"),
    ("ids=1", "ids"),
    ("all=true", "all"),
]


async def test_bad_list_queries_are_422(target: Target) -> None:
    for query, field in BAD_QUERIES:
        await invalid(await target.api.get(f"{API}/jobs?{query}"), field, case=query)

    # Query text that is not UTF-8 is never a server error.
    for query in ("owner_service=%FF", "owner_service=%ED%A0%80", "status=%C0%AF", "limit=%FF"):
        response = await target.api.get(f"{API}/jobs?{query}")
        assert 400 <= response.status < 500 or response.status == 200, await response.text()
        if response.status == 200:
            assert (await response.json())["jobs"] == []


# --- ids in the path ---------------------------------------------------------------------

BAD_IDS = [
    "abc",
    "99999999999999999999",
    "9223372036854775808",  # 2**63: past bigint
    "0",
    "-1",
    "1.5",
    "1e3",
    "0x10",
    "%2B1",  # +1
    "1_0",
    "%201",  # " 1"
    "%D9%A1",  # ARABIC-INDIC DIGIT ONE
    "%00",
    "%FF",
    "9" * 5000,
]


async def test_malformed_job_ids_are_422(target: Target) -> None:
    for (method, route), bad in itertools.product(ID_ROUTES, BAD_IDS):
        body = valid_body(route) if route in BODY_ROUTES else None
        url = f"{API}{route.replace('{id}', bad)}"
        response = await target.api.request(method, url, json=body, headers=JSON_HEADERS)
        await invalid(response, "job id", case=(method, url[:60]))
    await target.unchanged()

    # The largest bigint is a valid id (of no job).
    for method, route in ID_ROUTES:
        body = valid_body(route) if route in BODY_ROUTES else None
        url = f"{API}{route.replace('{id}', str(2**63 - 1))}"
        await refused(await target.api.request(method, url, json=body, headers=JSON_HEADERS), 404, "not_found", url)


# --- routing -----------------------------------------------------------------------------


async def test_unknown_routes_and_methods_use_the_error_shape(api: Client) -> None:
    await refused(await api.get(f"{API}/nope"), 404, "not_found")
    await refused(await api.get(f"{API}/jobs/1/nope"), 404, "not_found")
    await refused(await api.post(f"{API}/jobs/"), 404, "not_found")
    response = await api.delete(f"{API}/jobs")
    await refused(response, 405, "method_not_allowed")
    assert set(response.headers["Allow"].split(",")) >= {"GET", "POST"}
    await refused(await api.put(f"{API}/jobs/1", json={}), 405, "method_not_allowed")
    await refused(await api.get(f"{API}/jobs/1/complete"), 405, "method_not_allowed")


# --- a sweep: every field of every body set to every kind of junk ----------------------------

JUNK: list[Any] = [
    None,
    "",
    "x" * 10_000,
    "\x00",
    -1,
    0,
    2**63,
    10**40,
    -(10**40),
    1e308,
    -0.0,
    True,
    [],
    [None],
    {},
    {"\x00": "\x00"},
    [[[[[[]]]]]],
    "2024-01-01T00:00:00Z",
    "00000000-0000-0000-0000-000000000000",
]


async def test_junk_in_any_field_is_never_a_server_error(target: Target) -> None:
    fields = {route: list(valid_body(route)) for route in BODY_ROUTES}
    fields["/jobs"] += ["input", "priority", "run_at", "max_attempts", "idempotency_key"]
    fields["/jobs/claim"] += ["limit", "model_profiles", "lease_timeout"]
    fields["/jobs/{id}/complete"] += ["lease_token"]
    fields["/jobs/{id}/fail"] += ["error_message", "retryable", "retry_after", "lease_token"]
    fields["/jobs/{id}/heartbeat"] += ["lease_timeout", "lease_token"]
    fields["/jobs/cancel"] += ["ids", "status", "created_after", "all"]
    for route, names in fields.items():
        for field, junk in itertools.product(names, JUNK):
            response = await target.post(route, valid_body(route) | {field: junk})
            assert response.status < 500, (route, field, junk, await response.text())
            if response.status >= 400:
                await refused(response, response.status, case=(route, field, junk))
    for field, junk in itertools.product(JOB, JUNK):
        for batch in ({"defaults": {field: junk}, "jobs": [JOB]}, {"jobs": [JOB | {field: junk}]}):
            response = await target.post("/jobs/batch", batch)
            assert response.status < 500, (batch, await response.text())
