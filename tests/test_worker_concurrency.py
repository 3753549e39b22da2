"""Concurrency per job kind: WHISPERX_CONCURRENCY and LLM_CONCURRENCY, each within WORKER_CLAIM_LIMIT."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import stubs
from aiohttp import web
from conftest import JobFactory
from stubs import AsrStub, OpenAIStub, WorkerFactory, slow, transcribe

from aiservice.db.store import JobStore
from aiservice.jobs import Job, JobFilter, JobStatus
from aiservice.settings import Settings, SettingsError

# Fixtures shared by the worker tests.
openai_stub = stubs.openai_stub
asr_stub = stubs.asr_stub
worker_factory = stubs.worker_factory


def test_the_settings_and_their_defaults() -> None:
    assert (Settings().whisperx_concurrency, Settings().llm_concurrency) == (1, None)
    s = Settings.from_env({"WHISPERX_CONCURRENCY": "2", "LLM_CONCURRENCY": "8"})
    assert (s.whisperx_concurrency, s.llm_concurrency) == (2, 8)
    for name in ("WHISPERX_CONCURRENCY", "LLM_CONCURRENCY"):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: "0"})


async def slow_transcription(request: web.Request, query: dict[str, str], audio: bytes) -> web.StreamResponse:
    await asyncio.sleep(0.4)
    return await transcribe(request, query, audio)


async def slow_transcriptions(count: int, job_factory: JobFactory, asr_stub: AsrStub) -> list[Job]:
    """``count`` transcribe jobs, each answered after 0.4 s."""
    jobs = []
    for n in range(count):
        audio = f"call {n}".encode()
        asr_stub.on(audio, slow_transcription)
        job_input = {"audio_base64": base64.b64encode(audio).decode()}
        jobs.append(await job_factory(task_type="transcribe", model_profile="whisperx", input=job_input))
    return jobs


async def test_one_transcription_at_a_time_while_llm_jobs_still_run(
    store: JobStore,
    job_factory: JobFactory,
    worker_factory: WorkerFactory,
    openai_stub: OpenAIStub,
    asr_stub: AsrStub,
) -> None:
    openai_stub.on("think", slow(0.4))
    transcriptions = await slow_transcriptions(4, job_factory, asr_stub)
    chats = [await job_factory(input={"user": "think"}) for _ in range(6)]
    jobs = transcriptions + chats
    worker = await worker_factory(worker_claim_limit=4, whisperx_concurrency=1)

    peaks: Counter[str] = Counter()
    beside_a_transcription = 0  # LLM jobs seen running while a transcription ran
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        # One statement, so the count is a consistent snapshot.
        running = await store.list_jobs(JobFilter(status=[JobStatus.RUNNING]), before_id=None, limit=100)
        now = Counter(job.task_type for job in running)
        peaks |= now
        if now["transcribe"]:
            beside_a_transcription = max(beside_a_transcription, now["llm_chat"])
        if [(await store.get_job(j.id)).status for j in jobs] == ["completed"] * len(jobs):
            break
        await asyncio.sleep(0.02)

    assert [(await store.get_job(j.id)).status for j in jobs] == ["completed"] * len(jobs)
    assert peaks["transcribe"] == 1
    # LLM jobs run beside the transcription, in the three slots it leaves.
    assert 1 <= beside_a_transcription <= 3
    assert peaks["llm_chat"] <= 4
    assert len(asr_stub.requests) == 4
    assert worker.status()["concurrency"] == {"llm": 4, "whisperx": 1}


async def test_llm_concurrency_bounds_llm_jobs(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, openai_stub: OpenAIStub
) -> None:
    openai_stub.on("think", slow(0.3))
    jobs = [await job_factory(input={"user": "think"}) for _ in range(5)]
    worker = await worker_factory(worker_claim_limit=4, llm_concurrency=2)
    peak = 0

    async def sample() -> Any:
        nonlocal peak
        while True:
            peak = max(peak, worker.runner.in_flight)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        for job in jobs:
            await stubs.wait_for_status(store, job.id, "completed", within=15)
    finally:
        sampler.cancel()
    assert peak == 2


async def test_a_transcription_waiting_for_its_slot_starts_when_the_slot_frees_not_at_the_next_poll(
    store: JobStore, job_factory: JobFactory, worker_factory: WorkerFactory, asr_stub: AsrStub
) -> None:
    jobs = await slow_transcriptions(3, job_factory, asr_stub)
    await worker_factory(worker_poll_interval=timedelta(seconds=30), whisperx_concurrency=1)

    # Three transcriptions of 0.4 s one after another, well within one 30 s poll interval.
    for job in jobs:
        await stubs.wait_for_status(store, job.id, "completed", within=10)
