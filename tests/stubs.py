"""Stub providers that speak real HTTP on 127.0.0.1: an OpenAI-compatible chat server and a
whisper-asr-webservice /asr server (with a file server for audio_url downloads).

Each stub answers by a default rule; a test can script the answer for one prompt (chat) or one
audio payload (asr) with ``stub.on(key, reply)``. Replies are plain aiohttp handlers."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import BodyPartReader, web
from standardwebhooks.webhooks import Webhook as Verifier

from aiservice.db.store import JobStore
from aiservice.jobs import Job
from aiservice.settings import Settings
from aiservice.worker.app import Worker
from aiservice.worker.kinds import Kind

Reply = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


class StubServer:
    def __init__(self) -> None:
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.port = 0
        # Requests whose client went away before the answer (the worker aborted the call).
        self.disconnects: list[str] = []
        self.disconnected = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        # handler_cancellation: a handler is cancelled when its client disconnects, which is
        # how the stub sees an aborted provider call.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def saw_disconnect(self, what: str) -> None:
        self.disconnects.append(what)
        self.disconnected.set()


def last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


def completion(body: dict[str, Any], content: str, *, finish_reason: str = "stop") -> dict[str, Any]:
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion_tokens = len(content.split())
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": f"{body.get('model')}-served",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


async def echo(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    return web.json_response(completion(body, f"echo: {last_user_text(body)}"))


def answer(content: str, *, finish_reason: str = "stop") -> Reply:
    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response(completion(body, content, finish_reason=finish_reason))

    return reply


def error(status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> Reply:
    """An error in the shape OpenAI and vLLM use."""

    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        payload = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        return web.json_response(payload, status=status, headers=headers)

    return reply


def slow(seconds: float, then: Reply = echo) -> Reply:
    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await then(request, body)

    return reply


def hang(stub: StubServer, label: str) -> Reply:
    """Never answer; record the disconnect when the client gives up."""

    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stub.saw_disconnect(label)
            raise
        raise AssertionError("unreachable")

    return reply


def first_then(first: Reply, then: Reply = echo) -> Reply:
    """Answer the first request with ``first`` and every later one with ``then``."""
    calls = 0

    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        return await (first if calls == 1 else then)(request, body)

    return reply


def drop_connection() -> Reply:
    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    return reply


class OpenAIStub(StubServer):
    """POST /v1/chat/completions and GET /v1/models, keyed by the last user message."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.replies: dict[str, Reply] = {}
        self.active = 0  # requests being answered now
        self.peak = 0  # the most at once
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_get("/v1/models", self._models)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def on(self, prompt: str, reply: Reply) -> None:
        self.replies[prompt] = reply

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.authorizations.append(request.headers.get("Authorization"))
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await self.replies.get(last_user_text(body), echo)(request, body)
        finally:
            self.active -= 1

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [{"id": "stub-model", "object": "model"}]})


AsrReply = Callable[[web.Request, dict[str, str], bytes], Awaitable[web.StreamResponse]]


async def transcribe(request: web.Request, query: dict[str, str], audio: bytes) -> web.StreamResponse:
    """What whisper-asr-webservice's WhisperX engine answers, labelled text/plain as it does."""
    diarize = query.get("diarize") == "true"
    segments: list[dict[str, Any]] = [
        {"start": 0.0, "end": 1.5, "text": " Hello there.", "words": [{"word": "Hello", "start": 0.0, "end": 0.5}]},
        {"start": 1.5, "end": 3.0, "text": " General Kenobi.", "words": []},
    ]
    if diarize:
        segments[0]["speaker"] = "SPEAKER_00"
        segments[1]["speaker"] = "SPEAKER_01"
    body = {"text": " Hello there. General Kenobi.", "segments": segments, "language": query.get("language", "en")}
    return web.Response(text=json.dumps(body), content_type="text/plain")


class AsrStub(StubServer):
    """POST /asr (multipart field audio_file), keyed by the audio bytes; GET /files/{name} for downloads;
    GET /openapi.json documenting the /asr parameters the way whisper-asr-webservice does for its engine.

    ``engine`` is what the server's ASR_ENGINE would be (sent as the Asr-Engine header of every /asr
    answer) and ``hf_token`` whether HF_TOKEN is set; ``openapi`` can replace the document's handler."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.replies: dict[bytes, AsrReply] = {}
        self.files: dict[str, bytes] = {}
        self.engine = "whisperx"
        self.hf_token = True
        self.openapi: Callable[[web.Request], Awaitable[web.StreamResponse]] = self._openapi
        self.probes = 0
        self.active = 0  # transcriptions being answered now
        self.app.router.add_post("/asr", self._asr)
        self.app.router.add_get("/files/{name}", self._file)
        self.app.router.add_get("/openapi.json", self._probe)

    def on(self, audio: bytes, reply: AsrReply) -> None:
        self.replies[audio] = reply

    async def _asr(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        fields: dict[str, Any] = {}
        async for part in await request.multipart():
            if isinstance(part, BodyPartReader) and part.name is not None:
                fields[part.name] = {"filename": part.filename, "data": bytes(await part.read())}
        audio = fields.get("audio_file", {}).get("data", b"")
        self.requests.append(
            {
                "query": query,
                "query_string": request.query_string,
                "fields": sorted(fields),
                "audio": audio,
                "filename": fields.get("audio_file", {}).get("filename"),
            }
        )
        self.active += 1
        try:
            response = await self.replies.get(audio, transcribe)(request, query, audio)
        finally:
            self.active -= 1
        if response.status < 400:  # FastAPI's own errors carry no Asr-Engine header
            response.headers.setdefault("Asr-Engine", self.engine)
        return response

    async def _probe(self, request: web.Request) -> web.StreamResponse:
        self.probes += 1
        return await self.openapi(request)

    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        # Which parameters whisper-asr-webservice 1.9.1 documents (include_in_schema) on each engine.
        names = ["encode", "task", "language", "initial_prompt"]
        if self.engine == "faster_whisper":
            names += ["vad_filter", "word_timestamps"]
        if self.engine == "whisperx" and self.hf_token:
            names.append("diarize")
        if self.engine == "whisperx":
            names += ["min_speakers", "max_speakers"]
        parameters = [{"name": name, "in": "query", "required": False} for name in [*names, "output"]]
        return web.json_response({"openapi": "3.1.0", "paths": {"/asr": {"post": {"parameters": parameters}}}})

    async def _file(self, request: web.Request) -> web.StreamResponse:
        data = self.files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="audio/wav")


# Fixtures shared by the worker tests (imported by name in each test module).

WorkerFactory = Callable[..., Awaitable[Worker]]

API_KEY = "sk-test-secret-key-0123456789"


@pytest.fixture
async def openai_stub() -> AsyncIterator[OpenAIStub]:
    stub = OpenAIStub()
    await stub.start()
    yield stub
    await stub.close()


@pytest.fixture
async def asr_stub() -> AsyncIterator[AsrStub]:
    stub = AsrStub()
    await stub.start()
    yield stub
    await stub.close()


def worker_settings(settings: Settings, openai_stub: OpenAIStub, asr_stub: AsrStub, **overrides: Any) -> Settings:
    base = replace(
        settings,
        llm_base_url=openai_stub.base_url,
        llm_api_key=API_KEY,
        llm_model="qwen2.5-14b",
        whisperx_url=asr_stub.url,
        worker_http_host="127.0.0.1",
        worker_http_port=0,
        worker_poll_interval=timedelta(milliseconds=200),
        worker_lease_timeout=timedelta(seconds=30),
        worker_shutdown_grace=timedelta(seconds=2),
    )
    return replace(base, **overrides)


@pytest.fixture
async def worker_factory(
    settings: Settings, openai_stub: OpenAIStub, asr_stub: AsrStub
) -> AsyncIterator[WorkerFactory]:
    """Start a real worker against the stubs; keyword arguments override its settings."""
    workers: list[Worker] = []

    async def make(*, kinds: list[Kind] | None = None, listener_backoff: float = 0.1, **overrides: Any) -> Worker:
        worker = Worker(
            worker_settings(settings, openai_stub, asr_stub, **overrides),
            kinds,
            listener_backoff=listener_backoff,
        )
        await worker.start()
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        await worker.stop(grace=0)


async def wait_for(check: Callable[[], Awaitable[bool]], *, within: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_for_status(store: JobStore, job_id: int, *statuses: str, within: float = 10.0) -> Job:
    """Wait until the job is in one of ``statuses``; return it."""
    job = await store.get_job(job_id)

    async def reached() -> bool:
        nonlocal job
        job = await store.get_job(job_id)
        return job.status in statuses

    await wait_for(reached, within=within, what=f"job {job_id} to be {'/'.join(statuses)} (is {job.status})")
    return job


async def wait_until_listening(worker: Worker) -> None:
    async def ready() -> bool:
        return worker.listener.connected and worker.runner.claimer.last_poll_at is not None

    await wait_for(ready, what="the listener to connect")


async def wait_for_outcome(store: JobStore, job_id: int, *, within: float = 10.0) -> Job:
    """Wait until an attempt has ended: the job finished, or went back to pending with an error."""
    job = await store.get_job(job_id)

    async def ended() -> bool:
        nonlocal job
        job = await store.get_job(job_id)
        return job.status in ("completed", "failed", "cancelled") or (
            job.status == "pending" and job.error_category is not None
        )

    await wait_for(ended, within=within, what=f"job {job_id} to end an attempt (is {job.status})")
    return job


# A provider that signs its answers with the worker that asked (the fault tests).


class SigningStub(StubServer):
    """An OpenAI-compatible chat server at /w/{worker}/v1: its answer names the worker that asked."""

    def __init__(self, *, seed: int = 7, delay: tuple[float, float] = (0.02, 0.15)) -> None:
        super().__init__()
        self.asked: Counter[tuple[str, str]] = Counter()  # (worker, prompt) -> requests
        self.answered: Counter[tuple[str, str]] = Counter()  # (worker, prompt) -> answers sent
        self._random = random.Random(seed)
        self._delay = delay
        self.app.router.add_post("/w/{worker}/v1/chat/completions", self._chat)

    def base_url(self, worker: str) -> str:
        return f"{self.url}/w/{worker}/v1"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        worker = request.match_info["worker"]
        body = await request.json()
        prompt = str(body["messages"][-1]["content"])
        self.asked[worker, prompt] += 1
        await asyncio.sleep(self._random.uniform(*self._delay))
        self.answered[worker, prompt] += 1
        content = f"{worker}|{prompt}"
        return web.json_response(
            {
                "id": "chatcmpl-fault",
                "object": "chat.completion",
                "created": 0,
                "model": str(body.get("model")),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )


@pytest.fixture
async def signing_stub() -> AsyncIterator[SigningStub]:
    stub = SigningStub()
    await stub.start()
    yield stub
    await stub.close()


async def poll(check: Callable[[], Any], *, within: float, what: str, every: float = 0.05) -> Any:
    """Await ``check()`` until it returns something truthy; return that."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(every)


# A webhook receiver (the delivery and webhook tests).


async def finish(store: JobStore, job_id: int, result: dict[str, Any] | None = None) -> None:
    kind = await store.get_job(job_id)
    (job,) = await store.claim_jobs("w", 1, lease_timeout=timedelta(minutes=5), task_types=[kind.task_type])
    assert job.id == job_id
    await store.complete_job(job_id, "w", result or {"ok": True})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Receiver(StubServer):
    """A webhook receiver verifying every request with the standardwebhooks package."""

    def __init__(self) -> None:
        super().__init__()
        self.secret = ""
        self.verified: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.answers: list[int] = []  # statuses to answer first, then 204
        self.app.router.add_post("/hook", self._hook)

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        body = await request.text()
        headers = {k: v for k, v in request.headers.items()}
        self.verified.append(Verifier(self.secret).verify(body, headers))
        self.ids.append(request.headers["webhook-id"])
        return web.Response(status=self.answers.pop(0) if self.answers else 204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.close()


async def register(api: Any, receiver: Receiver, owner: str = "telephony", **extra: Any) -> dict[str, Any]:
    response = await api.put(f"/api/v1/webhooks/{owner}", json={"url": f"{receiver.url}/hook"} | extra)
    assert response.status == 200, await response.text()
    hook: dict[str, Any] = await response.json()
    receiver.secret = hook["secret"] or receiver.secret  # shown only when created or rotated
    return hook
