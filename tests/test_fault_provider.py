"""Provider faults not covered in test_worker_llm.py: a server that never answers, answers 200 with
garbage or with a body cut off, trickles its body past LLM_TIMEOUT, or accepts and resets at once;
all while good jobs are served by the same worker with the same slots."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import stubs
from aiohttp import web
from conftest import JobFactory
from stubs import OpenAIStub, WorkerFactory, hang, slow, wait_for_outcome, wait_for_status

from aiservice.db.store import JobStore

openai_stub = stubs.openai_stub
asr_stub = stubs.asr_stub
worker_factory = stubs.worker_factory


async def garbage_200(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    return web.Response(text="\x00\x01 not json {{{", status=200, content_type="application/json")


async def html_200(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    return web.Response(text="<html>proxy login</html>", status=200, content_type="application/json")


async def wrong_shape_200(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    return web.json_response({"object": "chat.completion", "choices": []})


async def cut_off(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """Headers promise 10 kB; a few bytes come, then the connection is reset."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json", "Content-Length": "10000"})
    await response.prepare(request)
    await response.write(b'{"id": "chatcmpl-cut", "choices": [')
    assert request.transport is not None
    request.transport.abort()
    return response


async def trickle(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """Answers at once, then sends one byte every 0.3 s: each read is quick, the whole is too slow."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    await response.prepare(request)
    for _ in range(100):
        await response.write(b" ")
        await asyncio.sleep(0.3)
    return response


# prompt -> (reply, category, retried by the service)
FAULTS: dict[str, tuple[Any, str, bool]] = {
    "garbage body": (garbage_200, "provider_error", True),
    "html body": (html_200, "provider_error", True),
    "no choices": (wrong_shape_200, "provider_error", True),
    "cut off": (cut_off, "provider_unavailable", True),
    "trickle": (trickle, "timeout", True),
    "slow past the timeout": (slow(3.0), "timeout", True),
}


async def test_provider_faults_fail_with_their_category_while_good_jobs_keep_flowing(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    openai_stub.on("hangs forever", hang(openai_stub, "hangs forever"))
    faults = {"hangs forever": await job_factory(input={"user": "hangs forever"})}
    for prompt, (reply, _, _) in FAULTS.items():
        openai_stub.on(prompt, reply)
        faults[prompt] = await job_factory(input={"user": prompt})
    good = [await job_factory(input={"user": f"good {n}"}) for n in range(20)]
    # Fewer slots than faulty jobs: good jobs get through only if faulty ones free their slots.
    await worker_factory(llm_timeout=timedelta(seconds=1), worker_claim_limit=3)

    for job in good:
        done = await wait_for_status(store, job.id, "completed", within=30)
        assert (done.result or {})["content"] == f"echo: {job.input['user']}"
    expected = {"hangs forever": ("timeout", True)} | {p: (c, r) for p, (_, c, r) in FAULTS.items()}
    for prompt, (category, retried) in expected.items():
        job = await wait_for_outcome(store, faults[prompt].id, within=15)
        assert (job.error_category, job.status == "pending", job.attempts) == (category, retried, 1), (
            prompt,
            job.error_category,
            job.error_message,
        )
        assert job.result is None
    # The hanging call was abandoned (the stub saw its client go), not left open.
    await stubs.wait_for(lambda: _has(openai_stub.disconnects, "hangs forever"), what="the hung call to be closed")


async def _has(items: list[str], item: str) -> bool:
    return item in items
