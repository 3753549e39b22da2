"""The LLM worker end to end: real worker loop, real openai client, stub server over real HTTP, real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import stubs
from aiohttp import web
from conftest import JobFactory
from stubs import (
    API_KEY,
    OpenAIStub,
    WorkerFactory,
    answer,
    drop_connection,
    error,
    slow,
    wait_for_outcome,
    wait_for_status,
)

from aiservice.db.store import JobStore

METADATA = {"call_id": "beeline/42", "operator": "Ann", "phone": "+70000000000"}

# Fixtures shared by the worker tests.
openai_stub = stubs.openai_stub
asr_stub = stubs.asr_stub
worker_factory = stubs.worker_factory


async def test_messages_input_completes_with_content_model_usage_and_duration(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    await worker_factory()
    messages = [{"role": "system", "content": "Answer as JSON."}, {"role": "user", "content": "Classify this text"}]
    job = await job_factory(input={"messages": messages, "max_tokens": 256, "temperature": 0.2, **METADATA})

    done = await wait_for_status(store, job.id, "completed", "failed")

    assert done.status == "completed", done.error_message
    result = done.result or {}
    assert result["content"] == "echo: Classify this text"
    assert result["model"] == "qwen2.5-14b-served"
    assert result["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    assert isinstance(result["duration_ms"], int) and result["duration_ms"] >= 0
    assert result["finish_reason"] == "stop"
    (sent,) = openai_stub.requests
    # Only chat fields reach the provider; the caller's metadata stays in the job.
    assert sent == {"model": "qwen2.5-14b", "messages": messages, "max_tokens": 256, "temperature": 0.2}
    assert openai_stub.authorizations == [f"Bearer {API_KEY}"]


@pytest.mark.parametrize("task_type", ["llm_chat", "chat_completion", "call_analysis"])
async def test_system_and_user_fields(
    task_type: str,
    store: JobStore,
    job_factory: JobFactory,
    worker_factory: WorkerFactory,
    openai_stub: OpenAIStub,
) -> None:
    await worker_factory()
    job = await job_factory(
        task_type=task_type, input={"system": "Be brief.", "user": "Summarize the call", "seed": 7, **METADATA}
    )

    done = await wait_for_status(store, job.id, "completed", "failed")

    assert done.status == "completed", done.error_message
    assert (done.result or {})["content"] == "echo: Summarize the call"
    assert openai_stub.requests == [
        {
            "model": "qwen2.5-14b",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarize the call"}],
            "seed": 7,
        }
    ]


async def test_json_response_format_is_parsed_or_fails_as_output_invalid(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    openai_stub.on("good", answer('{"label": "spam", "score": 0.9}'))
    openai_stub.on("fenced", answer('```json\n{"label": "ham"}\n```'))
    openai_stub.on("bad", answer("I think it is spam."))
    json_mode = {"response_format": {"type": "json_object"}}
    good = await job_factory(input={"user": "good", **json_mode})
    fenced = await job_factory(input={"user": "fenced", **json_mode})
    bad = await job_factory(input={"user": "bad", **json_mode})
    await worker_factory()

    good_done = await wait_for_status(store, good.id, "completed", "failed")
    fenced_done = await wait_for_status(store, fenced.id, "completed", "failed")
    bad_done = await wait_for_status(store, bad.id, "completed", "failed")

    assert (good_done.result or {})["parsed"] == {"label": "spam", "score": 0.9}
    assert (fenced_done.result or {})["parsed"] == {"label": "ham"}
    assert (bad_done.status, bad_done.error_category, bad_done.attempts) == ("failed", "output_invalid", 1)
    assert openai_stub.requests[0]["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(
    "job_input",
    [
        {"system": "no user"},
        {"messages": []},
        {"messages": "hello"},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"user": 42},
        {"user": "hi", "max_tokens": "100"},
        {"user": "hi", "temperature": "hot"},
    ],
)
async def test_unusable_input_fails_invalid_input_without_retry(
    job_input: dict[str, Any],
    store: JobStore,
    job_factory: JobFactory,
    worker_factory: WorkerFactory,
    openai_stub: OpenAIStub,
) -> None:
    job = await job_factory(input=job_input)
    await worker_factory()

    done = await wait_for_status(store, job.id, "failed", "completed")

    assert (done.status, done.error_category, done.attempts) == ("failed", "invalid_input", 1)
    assert openai_stub.requests == []


# prompt -> (reply, category, retried by the service)
ERROR_CASES: dict[str, tuple[Any, str, bool]] = {
    "too slow": (slow(5), "timeout", True),
    "rate limited": (error(429, "slow down", headers={"Retry-After": "7"}), "rate_limited", True),
    "dropped": (drop_connection(), "provider_unavailable", True),
    "bad gateway": (error(502, "upstream down"), "provider_unavailable", True),
    "unavailable": (error(503, "loading model"), "provider_unavailable", True),
    "gateway timeout": (error(504, "upstream slow"), "provider_unavailable", True),
    "server error": (error(500, "CUDA out of memory"), "provider_error", True),
    "too long": (
        error(400, "This model's maximum context length is 32768 tokens. However, you requested 40000 tokens."),
        "context_length_exceeded",
        False,
    ),
    "too long (openai)": (error(400, "Too long.", code="context_length_exceeded"), "context_length_exceeded", False),
    "bad request": (error(400, "temperature must be at most 2"), "invalid_request", False),
    "not found": (error(404, "The model `x` does not exist."), "invalid_request", False),
    "unprocessable": (error(422, "invalid messages"), "invalid_request", False),
    "unauthorized": (error(401, f"Incorrect API key provided: {API_KEY}."), "auth_error", False),
    "forbidden": (error(403, "not allowed"), "auth_error", False),
}


async def test_every_error_category(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    jobs = {}
    for prompt, (reply, _, _) in ERROR_CASES.items():
        openai_stub.on(prompt, reply)
        jobs[prompt] = await job_factory(input={"user": prompt})
    await worker_factory(llm_timeout=timedelta(seconds=1), worker_claim_limit=len(jobs))

    for prompt, (_, category, retried) in ERROR_CASES.items():
        job = await wait_for_outcome(store, jobs[prompt].id)
        assert (job.error_category, job.status == "pending", job.attempts) == (category, retried, 1), prompt
        assert API_KEY not in (job.error_message or ""), prompt
        if retried:
            # The service owns retries: back to pending, due later (never retried inside the SDK).
            assert job.run_at > job.updated_at, prompt
    assert sum(1 for r in openai_stub.requests if r["messages"][-1]["content"] in ERROR_CASES) == len(ERROR_CASES)


async def test_rate_limit_reschedules_by_retry_after(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    openai_stub.on("busy", error(429, "Rate limit reached", headers={"Retry-After": "120"}))
    job = await job_factory(input={"user": "busy"})
    await worker_factory()

    done = await wait_for_outcome(store, job.id)

    assert (done.status, done.error_category, done.attempts) == ("pending", "rate_limited", 1)
    delay = (done.run_at - done.updated_at).total_seconds()
    # Retry-After (120 s) rather than the 10 s base backoff, and no sleeping in the worker.
    assert 119 <= delay <= 121
    assert len(openai_stub.requests) == 1


async def test_jobs_of_another_profile_or_type_are_not_claimed(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory
) -> None:
    other_profile = await job_factory(model_profile="gpt-other")
    other_type = await job_factory(task_type="tg_analysis")
    wrong_pair = await job_factory(task_type="transcribe", model_profile="qwen2.5-14b")
    mine = await job_factory()
    await worker_factory()

    await wait_for_status(store, mine.id, "completed")

    for job in (other_profile, other_type, wrong_pair):
        again = await store.get_job(job.id)
        assert (again.status, again.attempts, again.worker_id) == ("pending", 0, None)


async def test_provider_reply_is_not_json(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    async def garbage(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(text="<html>oops</html>", status=502, content_type="text/html")

    openai_stub.on("garbage", garbage)
    job = await job_factory(input={"user": "garbage"})
    await worker_factory()

    done = await wait_for_outcome(store, job.id)
    assert (done.status, done.error_category) == ("pending", "provider_unavailable")


# A LiteLLM proxy without a database refuses a key it does not know with HTTP 400, not 401.
LITELLM_NO_DB = {"error": {"message": "No connected db.", "type": "no_db_connection", "param": "None", "code": "400"}}


@pytest.mark.parametrize(
    "body",
    [
        LITELLM_NO_DB,
        {"error": {"message": "Authentication Error, invalid key", "type": "auth_error", "param": None, "code": "400"}},
        {
            "error": {
                "message": "Invalid key.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        },
    ],
)
async def test_a_refused_key_answered_with_400_is_an_auth_error(
    body: dict[str, Any],
    store: JobStore,
    job_factory: JobFactory,
    worker_factory: WorkerFactory,
    openai_stub: OpenAIStub,
) -> None:
    async def refuse(request: web.Request, chat: dict[str, Any]) -> web.StreamResponse:
        return web.json_response(body, status=400)

    openai_stub.on("refused", refuse)
    job = await job_factory(input={"user": "refused"})
    await worker_factory()

    done = await wait_for_outcome(store, job.id)
    assert (done.status, done.error_category, done.attempts) == ("failed", "auth_error", 1)
    assert body["error"]["message"] in (done.error_message or "")
