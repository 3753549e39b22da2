"""The LLM job kind: chat jobs sent to an OpenAI-compatible server (vLLM, OpenAI, ...) with the openai client."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import timedelta
from typing import Any, Literal, cast

import openai
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, ConfigDict, Field, model_validator

from aiservice import metrics
from aiservice.jobs import Job
from aiservice.settings import mask_url, url_secrets
from aiservice.worker import failure, kinds
from aiservice.worker.failure import JobFailure
from aiservice.worker.placeholders import ReadJob, fill_messages

TASK_TYPES = ("llm_chat", "chat_completion", "call_analysis")
# Models often fence JSON in Markdown even when asked for JSON; one surrounding fence is tolerated.
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)


class Message(BaseModel):
    # Extra keys (name, tool_calls, tool_call_id) pass through to the provider unchanged.
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatInput(BaseModel):
    """The chat fields of a job's input. Everything else in it is the caller's metadata and is ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    messages: list[Message] | None = Field(default=None, min_length=1)
    system: str | None = None
    user: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @model_validator(mode="after")
    def _has_prompt(self) -> ChatInput:
        if self.messages is None and self.user is None:
            raise ValueError("input needs messages, or user (with an optional system)")
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        # Explicit messages win; system/user are the compact form of the same thing.
        if self.messages is not None:
            return [m.model_dump(exclude_none=True) for m in self.messages]
        compact = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*compact, {"role": "user", "content": self.user}]

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"messages", "system", "user"})

    def wants_json(self) -> bool:
        return (self.response_format or {}).get("type") in ("json_object", "json_schema")


def parse_input(job: Job) -> ChatInput:
    return kinds.parse_input(ChatInput, job)


def parse_json(content: str) -> Any:
    text = content.strip()
    fenced = _FENCE.match(text)
    return json.loads(fenced.group(1) if fenced else text)


class LLMKind:
    name = "llm"
    task_types: tuple[str, ...] = TASK_TYPES

    def __init__(
        self, *, base_url: str, api_key: str | None, model: str, timeout: timedelta, read_job: ReadJob | None = None
    ) -> None:
        self.model = model
        # Reads a dependency whose result the claim left out (JobStore.get_job; the worker sets it
        # once its store exists). Without it such a placeholder fails the job with invalid_input.
        self.read_job = read_job
        self.model_profiles: tuple[str, ...] = (model,)
        self._where = mask_url(base_url) or "the LLM server"
        self._secrets = (api_key, *url_secrets(base_url))
        self._timeout = timeout.total_seconds()
        # The service owns retries (backoff in SQL, Retry-After as a rescheduled run_at): none in the SDK.
        # Servers such as vLLM need no key, but the client insists on one.
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "unused", timeout=self._timeout, max_retries=0
        )

    async def run(self, job: Job) -> dict[str, Any]:
        chat = parse_input(job)
        dependencies = getattr(job, "dependencies", None)  # a claimed job of a pipeline
        messages = await fill_messages(
            chat.chat_messages(), [d.model_dump(mode="json") for d in dependencies or ()], self.read_job
        )
        started = time.monotonic()
        outcome = "error"
        try:
            # The client's timeout bounds each read; this bounds the whole request.
            async with asyncio.timeout(self._timeout):
                completion = await self._client.chat.completions.create(
                    model=self.model,
                    messages=cast(list[ChatCompletionMessageParam], messages),
                    **chat.options(),
                )
        except (openai.APITimeoutError, TimeoutError) as exc:
            raise failure.timeout(f"no answer from {self._where} within {self._timeout:g}s") from exc
        except openai.APIConnectionError as exc:
            raise failure.unavailable(f"cannot reach {self._where}: {self._text(exc)}") from exc
        except openai.APIStatusError as exc:
            raise self._status_failure(exc) from exc
        except openai.OpenAIError as exc:
            raise JobFailure("provider_error", self._text(exc), retryable=True) from exc
        except ValueError as exc:
            # A success status with a body that is not JSON (a proxy page, bytes): the SDK lets the
            # decoder's JSONDecodeError or UnicodeDecodeError through. The provider is at fault, not us.
            raise JobFailure(
                "provider_error", f"{self._where} answered with a body that is not JSON", retryable=True
            ) from exc
        else:
            outcome = "ok"
        finally:
            metrics.PROVIDER_SECONDS.labels("llm", outcome).observe(time.monotonic() - started)
        duration_ms = round((time.monotonic() - started) * 1000)

        if not completion.choices:
            raise JobFailure("provider_error", f"{self._where} returned no choices", retryable=True)
        choice = completion.choices[0]
        content = choice.message.content
        usage = completion.usage
        if usage is not None:
            # The configured model, not the provider's echo: label values stay bounded.
            metrics.LLM_TOKENS.labels(self.model, "prompt").inc(usage.prompt_tokens)
            metrics.LLM_TOKENS.labels(self.model, "completion").inc(usage.completion_tokens)
        result: dict[str, Any] = {
            "content": content,
            "model": completion.model,
            "usage": None
            if usage is None
            else {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            },
            "duration_ms": duration_ms,
            "finish_reason": choice.finish_reason,
        }
        if chat.wants_json():
            try:
                result["parsed"] = parse_json(content or "")
            except ValueError as exc:
                snippet = (content or "")[:200]
                raise failure.output_invalid(
                    f"response_format asks for JSON but the content does not parse ({exc}): {snippet!r}"
                ) from exc
        return result

    def _status_failure(self, exc: openai.APIStatusError) -> JobFailure:
        body = exc.body
        detail = body.get("message") if isinstance(body, dict) else None
        if not isinstance(detail, str):
            detail = body if isinstance(body, str) else exc.message
        # The body's type says more than its status about a refused key: a LiteLLM proxy without a
        # database answers an unknown key with HTTP 400 and type no_db_connection.
        error_type = exc.type if isinstance(exc.type, str) else None
        return failure.for_status(
            exc.status_code,
            self._text(detail),
            exc.response.headers,
            provider=self._where,
            context_code=exc.code,
            error_type=error_type,
        )

    def _text(self, value: object) -> str:
        return failure.redact(str(value), self._secrets)

    async def close(self) -> None:
        await self._client.close()
