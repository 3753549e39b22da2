"""The WhisperX worker against a stub whisper-asr-webservice over real HTTP, on real PostgreSQL."""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import pytest
import stubs
from aiohttp import web
from conftest import JobFactory
from prometheus_client import REGISTRY
from stubs import (
    AsrStub,
    WorkerFactory,
    wait_for_outcome,
    wait_for_status,
)

from aiservice.db.store import JobStore
from aiservice.worker.kinds.whisperx import WhisperXKind

AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt fake audio"

# Fixtures shared by the worker tests.
openai_stub = stubs.openai_stub
asr_stub = stubs.asr_stub
worker_factory = stubs.worker_factory


def transcribe_job(**job_input: Any) -> dict[str, Any]:
    return {"task_type": "transcribe", "model_profile": "whisperx", "input": job_input}


async def test_base64_audio_with_diarization(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, asr_stub: AsrStub
) -> None:
    await worker_factory()
    job = await job_factory(
        **transcribe_job(
            audio_base64=base64.b64encode(AUDIO).decode(),
            language="en",
            diarize=True,
            min_speakers=2,
            max_speakers=2,
            call_id="beeline/7",
        )
    )

    done = await wait_for_status(store, job.id, "completed", "failed")

    assert done.status == "completed", done.error_message
    result = done.result or {}
    assert result["text"] == "Hello there. General Kenobi."
    assert result["language"] == "en"
    assert result["segments"] == [
        {"start": 0.0, "end": 1.5, "text": "Hello there.", "speaker": "SPEAKER_00"},
        {"start": 1.5, "end": 3.0, "text": "General Kenobi.", "speaker": "SPEAKER_01"},
    ]
    assert result["diarization_applied"] is True
    assert (result["engine"], result["task"]) == ("whisperx", "transcribe")
    assert "warnings" not in result
    assert isinstance(result["duration_ms"], int)
    (sent,) = asr_stub.requests
    assert sent["query_string"] == (
        "output=json&task=transcribe&word_timestamps=false&diarize=true&language=en&min_speakers=2&max_speakers=2"
    )
    assert (sent["fields"], sent["audio"]) == (["audio_file"], AUDIO)
    # Whether the server diarizes was read from its OpenAPI document once.
    assert asr_stub.probes == 1


# whisper-asr-webservice (1.8.0 to 1.9.1) calls whisperX's DiarizationPipeline(audio, min_speakers, max_speakers)
# while its signature is (audio, num_speakers, min_speakers, max_speakers): the query's min_speakers is the
# exact count there, its max_speakers the minimum, and nothing reaches the maximum.
# (min_speakers, max_speakers) -> the speaker parameters of the query, and the bound that could not be sent
SPEAKER_BOUNDS: list[tuple[int | None, int | None, str, str | None]] = [
    (2, 2, "&min_speakers=2&max_speakers=2", None),
    (2, None, "&max_speakers=2", None),
    (2, 5, "&max_speakers=2", "max_speakers=5"),
    (None, 5, "", "max_speakers=5"),
    (None, None, "", None),
]


@pytest.mark.parametrize(("low", "high", "speakers", "unsent"), SPEAKER_BOUNDS)
async def test_speaker_bounds_are_sent_so_that_whisperx_reads_them_as_meant(
    low: int | None,
    high: int | None,
    speakers: str,
    unsent: str | None,
    store: JobStore,
    job_factory: JobFactory,
    worker_factory: WorkerFactory,
    asr_stub: AsrStub,
) -> None:
    bounds = {k: v for k, v in (("min_speakers", low), ("max_speakers", high)) if v is not None}
    job = await job_factory(**transcribe_job(audio_base64=base64.b64encode(AUDIO).decode(), diarize=True, **bounds))
    await worker_factory()

    done = await wait_for_status(store, job.id, "completed", "failed")

    assert done.status == "completed", done.error_message
    (sent,) = asr_stub.requests
    assert sent["query_string"] == "output=json&task=transcribe&word_timestamps=false&diarize=true" + speakers
    warnings = (done.result or {}).get("warnings", [])
    if unsent is None:
        assert warnings == []
    else:
        (warning,) = warnings
        assert warning.startswith(f"{unsent} was not sent")


async def test_speaker_bounds_go_only_with_diarize_and_must_be_in_order(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, asr_stub: AsrStub
) -> None:
    audio = base64.b64encode(AUDIO).decode()
    plain = await job_factory(**transcribe_job(audio_base64=audio, min_speakers=2, max_speakers=2))
    reversed_bounds = await job_factory(
        **transcribe_job(audio_base64=audio, diarize=True, min_speakers=3, max_speakers=2)
    )
    await worker_factory()

    assert (await wait_for_status(store, plain.id, "completed")).result is not None
    refused = await wait_for_status(store, reversed_bounds.id, "failed")
    assert (refused.error_category, refused.attempts) == ("invalid_input", 1)
    assert "min_speakers is larger than max_speakers" in (refused.error_message or "")
    (sent,) = asr_stub.requests
    assert sent["query_string"] == "output=json&task=transcribe&word_timestamps=false&diarize=false"


@pytest.mark.parametrize("language", ["xx", "english", "", "en-US", "z" * 100_000])
async def test_a_language_whisper_does_not_know_fails_before_anything_is_sent(
    language: str, store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, asr_stub: AsrStub
) -> None:
    job = await job_factory(**transcribe_job(audio_base64=base64.b64encode(AUDIO).decode(), language=language))
    await worker_factory()

    done = await wait_for_status(store, job.id, "failed", "completed")

    assert (done.status, done.error_category, done.attempts) == ("failed", "invalid_input", 1)
    assert "not a Whisper language code" in (done.error_message or "")
    assert len(done.error_message or "") < 200
    assert asr_stub.requests == []


async def test_translate_with_an_initial_prompt_and_a_language_in_capitals(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, asr_stub: AsrStub
) -> None:
    prompt = "Билайн, тариф «Всё», SIM-карта & eSIM"
    job = await job_factory(
        **transcribe_job(
            audio_base64=base64.b64encode(AUDIO).decode(), language="RU", task="translate", initial_prompt=prompt
        )
    )
    await worker_factory()

    done = await wait_for_status(store, job.id, "completed", "failed")

    assert done.status == "completed", done.error_message
    assert ((done.result or {})["task"], (done.result or {})["language"]) == ("translate", "ru")
    (sent,) = asr_stub.requests
    assert sent["query"] == {
        "output": "json",
        "task": "translate",
        "word_timestamps": "false",
        "diarize": "false",
        "language": "ru",
        "initial_prompt": prompt,
    }


@pytest.mark.parametrize(
    ("job_input", "where"),
    [
        ({"task": "summarize"}, "task"),
        ({"task": None}, "task"),
        ({"initial_prompt": ""}, "initial_prompt"),
        ({"initial_prompt": "x" * 1001}, "initial_prompt"),
        ({"initial_prompt": ["Beeline"]}, "initial_prompt"),
    ],
)
async def test_task_and_initial_prompt_are_checked(
    job_input: dict[str, Any],
    where: str,
    store: JobStore,
    job_factory: JobFactory,
    worker_factory: WorkerFactory,
    asr_stub: AsrStub,
) -> None:
    job = await job_factory(**transcribe_job(audio_base64=base64.b64encode(AUDIO).decode(), **job_input))
    await worker_factory()

    done = await wait_for_status(store, job.id, "failed", "completed")

    assert (done.status, done.error_category) == ("failed", "invalid_input")
    assert (done.error_message or "").startswith(f"{where}:")
    assert asr_stub.requests == []


@pytest.mark.parametrize(
    ("engine", "hf_token"), [("faster_whisper", True), ("openai_whisper", True), ("whisperx", False)]
)
async def test_diarize_is_refused_before_the_upload_when_the_server_would_ignore_it(
    engine: str,
    hf_token: bool,
    store: JobStore,
    job_factory: JobFactory,
    worker_factory: WorkerFactory,
    asr_stub: AsrStub,
) -> None:
    asr_stub.engine, asr_stub.hf_token = engine, hf_token
    audio = base64.b64encode(AUDIO).decode()
    diarize = await job_factory(**transcribe_job(audio_base64=audio, diarize=True, min_speakers=2))
    await worker_factory()

    refused = await wait_for_status(store, diarize.id, "failed", "completed")

    assert (refused.status, refused.error_category, refused.attempts) == ("failed", "invalid_input", 1)
    assert "diarize is not available from" in (refused.error_message or "")
    assert "ASR_ENGINE=whisperx and HF_TOKEN" in (refused.error_message or "")
    assert (asr_stub.requests, asr_stub.probes) == ([], 1)

    # Plain transcription still works, and its answer names the engine.
    plain = await wait_for_status(store, (await job_factory(**transcribe_job(audio_base64=audio))).id, "completed")
    assert (plain.result or {})["engine"] == engine

    # What was learned holds: the next diarize job is refused without asking again.
    again = await job_factory(**transcribe_job(audio_base64=audio, diarize=True))
    assert (await wait_for_status(store, again.id, "failed")).error_category == "invalid_input"
    assert (len(asr_stub.requests), asr_stub.probes) == (1, 1)


async def test_without_an_openapi_document_the_answers_engine_decides(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, asr_stub: AsrStub
) -> None:
    async def missing(request: web.Request) -> web.StreamResponse:
        raise web.HTTPNotFound()

    asr_stub.openapi = missing
    asr_stub.engine = "faster_whisper"
    audio = base64.b64encode(AUDIO).decode()
    first = await job_factory(**transcribe_job(audio_base64=audio, diarize=True))
    await worker_factory()

    done = await wait_for_status(store, first.id, "failed", "completed")

    # Sent, since nothing said otherwise; the answer came from an engine that ignores diarize.
    assert (done.status, done.error_category) == ("failed", "invalid_input")
    message = done.error_message or ""
    assert "faster_whisper engine, which ignores diarize (its transcript was not kept)" in message
    assert len(asr_stub.requests) == 1

    # The engine from that answer refuses the next diarize job before its upload.
    second = await job_factory(**transcribe_job(audio_base64=audio, diarize=True))
    refused = await wait_for_status(store, second.id, "failed")
    assert (refused.error_category, refused.error_message) == (
        "invalid_input",
        f"diarize is not available from {asr_stub.url}: it runs the faster_whisper engine;"
        " send the job without diarize",
    )
    assert len(asr_stub.requests) == 1


async def test_audio_url_is_downloaded_and_diarize_is_sent_explicitly(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, asr_stub: AsrStub
) -> None:
    asr_stub.files["call.wav"] = AUDIO
    await worker_factory()
    job = await job_factory(**transcribe_job(audio_url=f"{asr_stub.url}/files/call.wav?sig=abc", word_timestamps=True))

    done = await wait_for_status(store, job.id, "completed", "failed")

    assert done.status == "completed", done.error_message
    result = done.result or {}
    assert result["diarization_applied"] is False
    assert all("speaker" not in s for s in result["segments"])
    assert result["segments"][0]["words"] == [{"word": "Hello", "start": 0.0, "end": 0.5}]
    (sent,) = asr_stub.requests
    assert sent["query"]["diarize"] == "false" and sent["query"]["word_timestamps"] == "true"
    assert "language" not in sent["query"]
    assert (sent["audio"], sent["filename"]) == (AUDIO, "call.wav")


def status(code: int, text: str, headers: dict[str, str] | None = None) -> Any:
    async def reply(request: web.Request, query: dict[str, str], audio: bytes) -> web.StreamResponse:
        return web.Response(status=code, text=text, headers=headers)

    return reply


async def test_errors_and_bad_input_become_categories(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, asr_stub: AsrStub
) -> None:
    asr_stub.on(b"busy", status(503, "model loading", {"Retry-After": "30"}))
    asr_stub.on(b"crash", status(500, "Traceback ..."))
    asr_stub.on(b"garbage", status(200, "<html>not json</html>"))
    asr_stub.on(b"huge", status(413, "file too large"))
    asr_stub.files["big.wav"] = b"x" * 2048
    kind = WhisperXKind(url=asr_stub.url, timeout=timedelta(seconds=5), max_audio_bytes=1024)
    cases = {
        "busy": ({"audio_base64": base64.b64encode(b"busy").decode()}, "provider_unavailable", True),
        "crash": ({"audio_base64": base64.b64encode(b"crash").decode()}, "provider_error", True),
        "garbage": ({"audio_base64": base64.b64encode(b"garbage").decode()}, "output_invalid", False),
        "rejected": ({"audio_base64": base64.b64encode(b"huge").decode()}, "invalid_request", False),
        "missing": ({"audio_url": f"{asr_stub.url}/files/none.wav"}, "invalid_input", False),
        "too big": ({"audio_url": f"{asr_stub.url}/files/big.wav"}, "invalid_input", False),
        "no audio": ({"language": "en"}, "invalid_input", False),
        "two sources": ({"audio_url": f"{asr_stub.url}/files/x", "audio_base64": "eA=="}, "invalid_input", False),
        "bad base64": ({"audio_base64": "not base64!"}, "invalid_input", False),
        "bad scheme": ({"audio_url": "file:///etc/passwd"}, "invalid_input", False),
        "wrong type": ({"audio_base64": "eA==", "diarize": "yes"}, "invalid_input", False),
    }
    jobs = {name: await job_factory(**transcribe_job(**job_input)) for name, (job_input, _, _) in cases.items()}
    await worker_factory(kinds=[kind], worker_claim_limit=len(jobs))

    for name, (_, category, retried) in cases.items():
        job = await wait_for_outcome(store, jobs[name].id)
        assert (job.error_category, job.status == "pending", job.attempts) == (category, retried, 1), name
    busy = await store.get_job(jobs["busy"].id)
    assert 29 <= (busy.run_at - busy.updated_at).total_seconds() <= 31


async def test_transcribe_jobs_wait_when_whisperx_is_not_configured(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory
) -> None:
    job = await job_factory(**transcribe_job(audio_base64="eA=="))
    llm = await job_factory()
    await worker_factory(whisperx_url=None)

    await wait_for_status(store, llm.id, "completed")
    assert (await store.get_job(job.id)).status == "pending"


async def test_an_unreachable_server_is_retried_without_its_credentials_and_timed(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory
) -> None:
    # Port 9 on loopback: nothing listens there.
    kind = WhisperXKind(url="http://asr:wx-secret-pass@127.0.0.1:9", timeout=timedelta(seconds=5))
    before = REGISTRY.get_sample_value(
        "aiservice_provider_request_seconds_count", {"provider": "whisperx", "outcome": "error"}
    )
    job = await job_factory(**transcribe_job(audio_base64=base64.b64encode(AUDIO).decode()))
    await worker_factory(kinds=[kind])
    done = await wait_for_outcome(store, job.id)
    assert (done.status, done.error_category) == ("pending", "provider_unavailable")
    assert done.error_message and "wx-secret-pass" not in done.error_message
    after = REGISTRY.get_sample_value(
        "aiservice_provider_request_seconds_count", {"provider": "whisperx", "outcome": "error"}
    )
    assert (after or 0) - (before or 0) == 1


async def test_credentials_echoed_by_the_server_never_reach_the_job(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, asr_stub: AsrStub
) -> None:
    async def echo_authorization(request: web.Request, query: dict[str, str], audio: bytes) -> web.StreamResponse:
        # Some servers repeat the rejected header in their error body.
        return web.json_response({"detail": f"refused Authorization: {request.headers['Authorization']}"}, status=401)

    asr_stub.on(b"echo", echo_authorization)
    url = asr_stub.url.replace("http://", "http://wuser:wx-pa55word@")
    kind = WhisperXKind(url=url, timeout=timedelta(seconds=5))
    job = await job_factory(**transcribe_job(audio_base64=base64.b64encode(b"echo").decode()))
    await worker_factory(kinds=[kind])

    done = await wait_for_outcome(store, job.id)
    assert (done.status, done.error_category) == ("failed", "auth_error")
    message = done.error_message or ""
    assert "refused Authorization: Basic ***" in message
    for secret in ("wx-pa55word", base64.b64encode(b"wuser:wx-pa55word").decode()):
        assert secret not in message
