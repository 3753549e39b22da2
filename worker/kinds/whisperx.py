"""The WhisperX job kind: transcribe jobs sent to a whisper-asr-webservice server (WhisperX engine).

Contract: POST {WHISPERX_URL}/asr?output=json&task=transcribe&... with the audio as multipart field
``audio_file``; the answer is JSON whatever its content type says, and its ``Asr-Engine`` header names
the server's engine (openai_whisper, faster_whisper or whisperx).

Checked against whisper-asr-webservice 1.8.0 to 1.9.1 (and its main branch at ea12224) with whisperX
3.3 to 3.4: the server validates none of its query parameters (``language`` and ``task`` list their
values in the OpenAPI document only), so the worker does; and it passes the speaker bounds to whisperX
positionally (see ``speaker_query``)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import IO, Any, Generic, Literal, TypeVar
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aiservice import metrics
from aiservice.jobs import Job
from aiservice.settings import mask_url, url_secrets
from aiservice.worker import failure, kinds

log = logging.getLogger(__name__)
T = TypeVar("T")

TASK_TYPE = "transcribe"
MODEL_PROFILE = "whisperx"
MAX_AUDIO_BYTES = 512 * 1024 * 1024
DOWNLOAD_TIMEOUT = timedelta(minutes=5)
# Downloads beyond this size go to a temporary file instead of memory.
_SPOOL_BYTES = 8 * 1024 * 1024
_CHUNK = 64 * 1024
# Whisper reads at most the last 223 tokens of a prompt; this is more than that and keeps the URL short.
MAX_PROMPT_CHARS = 1000
# The server's engine that diarizes, as its Asr-Engine header names it.
DIARIZING_ENGINE = "whisperx"
# How long what the worker learned about the server's engine holds before it asks again.
ENGINE_TTL = 60.0
PROBE_TIMEOUT = 5.0

# Whisper's language codes: the keys of openai-whisper's tokenizer.LANGUAGES (v20250625), the list
# whisper-asr-webservice shows in its OpenAPI document. An unknown code fails inside WhisperX with HTTP 500.
WHISPER_LANGUAGES = frozenset(
    """en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr
    bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo
    so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su
    yue""".split()  # noqa: SIM905 (a hundred codes read better as words than as a list of strings)
)


class TranscribeInput(BaseModel):
    """The fields of a transcribe job's input that the worker reads; the rest is the caller's metadata."""

    model_config = ConfigDict(extra="ignore", strict=True)

    audio_url: str | None = None
    audio_base64: str | None = None
    language: str | None = None
    task: Literal["transcribe", "translate"] = "transcribe"
    # Domain vocabulary and spelling ("Beeline, tariff, SIM card") that Whisper should expect.
    initial_prompt: str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS)
    diarize: bool = False
    min_speakers: int | None = Field(default=None, ge=1)
    max_speakers: int | None = Field(default=None, ge=1)
    word_timestamps: bool = False

    @field_validator("language")
    @classmethod
    def _whisper_language(cls, value: str | None) -> str | None:
        if value is None:
            return None
        code = value.strip().lower()
        if code not in WHISPER_LANGUAGES:
            shown = value if len(value) <= 32 else value[:32] + "…"
            raise ValueError(f"{shown!r} is not a Whisper language code (en, ru, de, ...); leave it out to detect")
        return code

    @model_validator(mode="after")
    def _one_source(self) -> TranscribeInput:
        if (self.audio_url is None) == (self.audio_base64 is None):
            raise ValueError("give exactly one of audio_url and audio_base64")
        if self.audio_url is not None and urlsplit(self.audio_url).scheme not in ("http", "https"):
            raise ValueError("audio_url must be an http or https URL")
        if self.min_speakers is not None and self.max_speakers is not None and self.min_speakers > self.max_speakers:
            raise ValueError("min_speakers is larger than max_speakers")
        return self

    def query(self) -> tuple[dict[str, str], list[str]]:
        """The /asr query parameters, and warnings about what the server cannot be told."""
        # diarize and word_timestamps are always sent so the server's defaults never decide.
        params = {
            "output": "json",
            "task": self.task,
            "word_timestamps": _flag(self.word_timestamps),
            "diarize": _flag(self.diarize),
        }
        if self.language:
            params["language"] = self.language
        if self.initial_prompt:
            params["initial_prompt"] = self.initial_prompt
        if not self.diarize:
            return params, []
        speakers, warnings = speaker_query(self.min_speakers, self.max_speakers)
        return params | speakers, warnings


def speaker_query(low: int | None, high: int | None) -> tuple[dict[str, str], list[str]]:
    """Query parameters that give WhisperX the caller's speaker bounds, and what cannot be sent.

    whisper-asr-webservice calls ``diarize_model(audio, min_speakers, max_speakers)``, while whisperX's
    ``DiarizationPipeline.__call__`` takes ``(audio, num_speakers, min_speakers, max_speakers)``: the
    query's min_speakers arrives as the exact speaker count, its max_speakers as the minimum, and no
    query parameter reaches the maximum. So an exact count goes as both parameters (right whichever
    way a server passes them), a minimum goes as max_speakers, and a maximum is not sent."""
    if low is not None and low == high:
        return {"min_speakers": str(low), "max_speakers": str(low)}, []
    params = {} if low is None else {"max_speakers": str(low)}
    warnings = []
    if high is not None:
        warnings.append(f"max_speakers={high} was not sent: whisper-asr-webservice cannot pass a maximum to WhisperX")
    return params, warnings


def _flag(value: bool) -> str:
    return "true" if value else "false"


def parse_input(job: Job) -> TranscribeInput:
    return kinds.parse_input(TranscribeInput, job)


def transcript(body: Any, spec: TranscribeInput, engine: str | None) -> dict[str, Any]:
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
    result = {
        "text": text.strip(),
        "language": body.get("language") or spec.language,
        "task": spec.task,
        "segments": segments,
        "diarization_applied": spec.diarize and any("speaker" in s for s in segments),
        "engine": engine,
    }
    _, warnings = spec.query()
    return result | ({"warnings": warnings} if warnings else {})


@dataclass(frozen=True)
class Learned(Generic[T]):
    """Something the worker learned about the server, and when (time.monotonic())."""

    value: T
    at: float = field(default_factory=time.monotonic)

    def fresh(self) -> bool:
        return time.monotonic() - self.at < ENGINE_TTL


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
        self._engine: Learned[str] | None = None
        self._offers_diarize: Learned[bool | None] | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside the running loop.
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def run(self, job: Job) -> dict[str, Any]:
        spec = parse_input(job)
        if spec.diarize:
            await self._check_diarization()
        audio, filename = await self._audio(spec)
        started = time.monotonic()
        outcome = "error"
        try:
            body, engine = await self._transcribe(spec, audio, filename)
            outcome = "ok"
        finally:
            metrics.PROVIDER_SECONDS.labels("whisperx", outcome).observe(time.monotonic() - started)
            if not isinstance(audio, bytes):
                audio.close()
        duration_ms = round((time.monotonic() - started) * 1000)
        if spec.diarize and engine not in (None, DIARIZING_ENGINE):
            # Only when the check above could not tell: the server ignored diarize.
            reason = f"it answered from the {engine} engine, which ignores diarize (its transcript was not kept)"
            raise failure.invalid_input(self._cannot_diarize(reason))
        return transcript(body, spec, engine) | {"duration_ms": duration_ms}

    async def _check_diarization(self) -> None:
        """Refuse a diarize job before its upload when the server would ignore diarize.

        The engine is the Asr-Engine header of the server's latest answer. Whether /asr diarizes comes
        from the server's OpenAPI document (no model runs): whisper-asr-webservice documents the diarize
        parameter only on the whisperx engine with HF_TOKEN set, and ignores it everywhere else. Both
        facts are kept ENGINE_TTL seconds. A probe without an answer (the server works one request at a
        time and may be busy transcribing) decides nothing: the job goes, and its answer's header decides."""
        engine = self._engine
        if engine is not None and engine.fresh() and engine.value != DIARIZING_ENGINE:
            raise failure.invalid_input(self._cannot_diarize(f"it runs the {engine.value} engine"))
        if self._offers_diarize is None or not self._offers_diarize.fresh():
            self._offers_diarize = Learned(await self._probe_diarize())
        if self._offers_diarize.value is False:
            reason = "its /asr takes no diarize parameter (it needs ASR_ENGINE=whisperx and HF_TOKEN)"
            raise failure.invalid_input(self._cannot_diarize(reason))

    def _cannot_diarize(self, reason: str) -> str:
        return f"diarize is not available from {self._where}: {reason}; send the job without diarize"

    async def _probe_diarize(self) -> bool | None:
        """Whether the server's /asr documents a diarize parameter; None when it cannot be told."""
        try:
            async with (
                asyncio.timeout(PROBE_TIMEOUT),
                self._client().get(f"{self._url}/openapi.json") as resp,
            ):
                document = await resp.json(content_type=None) if resp.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            log.info("no OpenAPI document from %s (%s): diarize is sent unchecked", self._where, type(exc).__name__)
            return None
        parameters = _dig(document, "paths", "/asr", "post", "parameters")
        if not isinstance(parameters, list):
            return None
        return any(isinstance(p, dict) and p.get("name") == "diarize" for p in parameters)

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

    async def _transcribe(
        self, spec: TranscribeInput, audio: bytes | IO[bytes], filename: str
    ) -> tuple[Any, str | None]:
        """The server's JSON answer and the engine its Asr-Engine header names."""
        form = aiohttp.FormData()
        form.add_field("audio_file", audio, filename=filename, content_type="application/octet-stream")
        params, _ = spec.query()
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._client().post(f"{self._url}/asr", params=params, data=form) as resp,
            ):
                text = await resp.text(errors="replace")
                engine = resp.headers.get("Asr-Engine")
                if engine:
                    self._engine = Learned(engine)
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
            return json.loads(text), engine
        except ValueError as exc:
            raise failure.output_invalid(
                f"{self._where} answered with something that is not JSON: {text[:200]!r}"
            ) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
