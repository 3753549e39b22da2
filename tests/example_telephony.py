"""The README's Python client example (tests/test_client.py runs it against the API and the built-in
workers, tests/test_readme.py as the README shows it; both keep the README copy equal)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiservice.client import AsyncClient

ANALYSIS = {
    "system": 'Answer as JSON: {"topic": str, "sentiment": str}',
    "user": "Classify this call. Transcript: {{dependencies.0.result.text}}",
    "response_format": {"type": "json_object"},
}


async def enqueue_call(client: AsyncClient, call_id: str, audio_url: str) -> int:
    """Transcribe the call, then analyse the transcript; answers the analysis job's id.

    The idempotency keys make a repeat (a retry after a timeout, a redelivered event) return the
    same jobs instead of creating new ones."""
    batch = await client.create_jobs(
        [
            {
                "task_type": "transcribe",
                "model_profile": "whisperx",
                "input": {"audio_url": audio_url, "language": "ru", "diarize": True},
                "idempotency_key": f"beeline/{call_id}/transcribe",
            },
            {
                "task_type": "call_analysis",
                "model_profile": "qwen2.5-14b",
                "depends_on": ["$0"],  # the transcription above, whose text fills the prompt
                "input": ANALYSIS,
                "idempotency_key": f"beeline/{call_id}/analysis",
            },
        ],
        defaults={"owner_service": "telephony", "owner_ref": f"beeline/{call_id}"},
    )
    return batch.jobs[1].id


async def analysis_of(client: AsyncClient, job_id: int, seconds: float = 900) -> dict[str, Any] | None:
    """The analysis as JSON, or None when the pipeline failed, was cancelled or is still running."""
    job = await client.wait(job_id, timeout=seconds)
    if job.status != "completed" or job.result is None:
        print(job.status, job.error_category, job.error_message)  # e.g. failed dependency_failed ...
        return None
    parsed: dict[str, Any] = job.result["parsed"]  # the LLM worker parses JSON answers
    return parsed


async def main() -> None:
    url = f"http://127.0.0.1:{os.environ.get('HTTP_PORT', '8080')}"
    async with AsyncClient(url) as client:  # token: AI_SERVICE_TOKEN
        job_id = await enqueue_call(client, "42", "https://records.example/beeline/42.wav")
        print(await analysis_of(client, job_id))


if __name__ == "__main__":
    asyncio.run(main())
