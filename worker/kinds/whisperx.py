"""The WhisperX job kind: transcribe jobs sent to a whisper-asr-webservice server (WhisperX engine).

Contract: POST {WHISPERX_URL}/asr?output=json&task=transcribe&... with the audio as multipart field
``audio_file``; the answer is JSON whatever its content type says."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import tempfile
import time
from datetime import timedelta
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from aiservice import metrics
from aiservice.jobs import Job
from aiservice.settings import mask_url, url_secrets
from worker import failure

TASK_TYPE = "transcribe"
MODEL_PROFILE = "whisperx"
MAX_AUDIO_BYTES = 512 * 1024 * 1024
DOWNLOAD_TIMEOUT = timedelta(minutes=5)
# Downloads beyond this size go to a temporary file instead of memory.
_SPOOL_BYTES = 8 * 1024 * 1024
_CHUNK = 64 * 1024


class TranscribeInput(BaseModel):
    """The fields of a transcribe job's input that the worker reads; the rest is the caller's metadata."""

    model_config = ConfigDict(extra="ignore", strict=True)

    audio_url: str | None = None
    audio_base64: str | None = None
    language: str | None = Field(default=None, min_length=1, max_length=32)
    diarize: bool = False
    min_speakers: int | None = Field(default=None, ge=1)
    max_speakers: int | None = Field(default=None, ge=1)
    word_timestamps: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> TranscribeInput:
        if (self.audio_url is None) == (self.audio_base64 is None):
            raise ValueError("give exactly one of audio_url and audio_base64")
        if self.audio_url is not None and urlsplit(self.audio_url).scheme not in ("http", "https"):
            raise ValueError("audio_url must be an http or https URL")
        return self

    def query(self) -> dict[str, str]:
        # diarize and word_timestamps are always sent so the server's defaults never decide.
        params = {
            "output": "json",
            "task": "transcribe",
            "word_timestamps": _flag(self.word_timestamps),
            "diarize": _flag(self.diarize),
        }
        if self.language:
            params["language"] = self.language
        if self.min_speakers is not None:
            params["min_speakers"] = str(self.min_speakers)
        if self.max_speakers is not None:
            params["max_speakers"] = str(self.max_speakers)
        return params


def _flag(value: bool) -> str:
    return "true" if value else "false"


def parse_input(job: Job) -> TranscribeInput:
    return failure.parse_input(TranscribeInput, job)


def transcript(body: Any, spec: TranscribeInput) -> dict[str, Any]:
    """The job result from the server's JSON answer."""
    if not isinstance(body, dict) or not isinstance(body.get("segments", []), list):
        raise failure.output_invalid("WhisperX answer is not an object with a segments list")
    segments = []
    for raw in body.get("segments", []):
        if not isinstance(raw, dict):
            raise failure.output_invalid("WhisperX answer has a segment that is not an object")
        segment: dict[str, Any] = {
            "start": raw.get("start"),
            "end": raw.get("end"),
            "text": str(raw.get("text", "")).strip(),
        }
        if raw.get("speaker") is not None:
            segment["speaker"] = raw["speaker"]
        if spec.word_timestamps and isinstance(raw.get("words"), list):
            segment["words"] = raw["words"]
        segments.append(segment)
    text = body.get("text")
    if not isinstance(text, str):
        text = " ".join(s["text"] for s in segments)
    return {
        "text": text.strip(),
        "language": body.get("language") or spec.language,
        "segments": segments,
        "diarization_applied": spec.diarize and any("speaker" in s for s in segments),
    }


class WhisperXKind:
    name = "whisperx"
    task_types: tuple[str, ...] = (TASK_TYPE,)
    model_profiles: tuple[str, ...] = (MODEL_PROFILE,)

    def __init__(
        self,
        *,
        url: str,
        timeout: timedelta,
        download_timeout: timedelta = DOWNLOAD_TIMEOUT,
        max_audio_bytes: int = MAX_AUDIO_BYTES,
    ) -> None:
        self._url = url.rstrip("/")
        self._where = mask_url(self._url) or "the WhisperX server"
        self._secrets = url_secrets(self._url)
        self._timeout = timeout.total_seconds()
        self._download_timeout = download_timeout.total_seconds()
        self._max_audio_bytes = max_audio_bytes
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside the running loop.
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def run(self, job: Job) -> dict[str, Any]:
        spec = parse_input(job)
        audio, filename = await self._audio(spec)
        started = time.monotonic()
        outcome = "error"
        try:
            body = await self._transcribe(spec, audio, filename)
            outcome = "ok"
        finally:
            metrics.PROVIDER_SECONDS.labels("whisperx", outcome).observe(time.monotonic() - started)
            if not isinstance(audio, bytes):
                audio.close()
        duration_ms = round((time.monotonic() - started) * 1000)
        return transcript(body, spec) | {"duration_ms": duration_ms}

    async def _audio(self, spec: TranscribeInput) -> tuple[bytes | IO[bytes], str]:
        if spec.audio_base64 is not None:
            if len(spec.audio_base64) * 3 // 4 > self._max_audio_bytes:
                raise failure.invalid_input(f"audio_base64 is larger than {self._max_audio_bytes} bytes")
            try:
                return base64.b64decode(spec.audio_base64, validate=True), "audio"
            except binascii.Error as exc:
                raise failure.invalid_input(f"audio_base64 is not valid base64: {exc}") from exc
        assert spec.audio_url is not None
        return await self._download(spec.audio_url), urlsplit(spec.audio_url).path.rsplit("/", 1)[-1] or "audio"

    async def _download(self, url: str) -> IO[bytes]:
        # The URL may carry a signed token in its query: only the masked form goes into messages.
        where = mask_url(url)
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115 (returned to the caller)
        try:
            async with (
                asyncio.timeout(self._download_timeout),
                self._client().get(url, allow_redirects=True) as resp,
            ):
                if resp.status >= 400:
                    message = f"downloading audio from {where} answered HTTP {resp.status}"
                    if resp.status >= 500 or resp.status == 429:
                        raise failure.unavailable(message)
                    raise failure.invalid_input(message)
                if (resp.content_length or 0) > self._max_audio_bytes:
                    raise failure.invalid_input(f"audio at {where} is larger than {self._max_audio_bytes} bytes")
                size = 0
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > self._max_audio_bytes:
                        raise failure.invalid_input(f"audio at {where} is larger than {self._max_audio_bytes} bytes")
                    spool.write(chunk)
        except TimeoutError as exc:
            spool.close()
            raise failure.timeout(
                f"downloading audio from {where} took longer than {self._download_timeout:g}s"
            ) from exc
        except aiohttp.ClientError as exc:
            spool.close()
            raise failure.unavailable(f"cannot download audio from {where}: {type(exc).__name__}") from exc
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool

    async def _transcribe(self, spec: TranscribeInput, audio: bytes | IO[bytes], filename: str) -> Any:
        form = aiohttp.FormData()
        form.add_field("audio_file", audio, filename=filename, content_type="application/octet-stream")
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._client().post(f"{self._url}/asr", params=spec.query(), data=form) as resp,
            ):
                text = await resp.text(errors="replace")
                if resp.status >= 400:
                    raise failure.for_status(
                        resp.status, failure.redact(text, self._secrets), resp.headers, provider=self._where
                    )
        except TimeoutError as exc:
            raise failure.timeout(f"no answer from {self._where} within {self._timeout:g}s") from exc
        except aiohttp.ClientError as exc:
            detail = failure.redact(f"{type(exc).__name__}: {exc}", self._secrets)
            raise failure.unavailable(f"cannot reach {self._where}: {detail}") from exc
        # whisper-asr-webservice labels its JSON text/plain; the body is parsed whatever the type.
        try:
            return json.loads(text)
        except ValueError as exc:
            raise failure.output_invalid(
                f"{self._where} answered with something that is not JSON: {text[:200]!r}"
            ) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
