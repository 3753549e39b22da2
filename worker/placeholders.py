"""Placeholders in a chat job's strings, filled from the results of the jobs it depends on.

``{{dependencies.0.result.text}}`` is a dotted path into the job's dependencies as the claim
returned them: element N is the dependency at position N (0-based, in the order given at
creation), whatever became of the others; each has id, task_type, model_profile, status and
result. A string value is inserted as it is; anything else as JSON. ``\\{{`` writes a literal
``{{``. A path that does not resolve fails the job with invalid_input naming the path, and so does
a path into a dependency that no longer exists ("deleted"), naming it.

A claim leaves out results past its size bound ("result_omitted"); those a placeholder needs are
read in full with ``read`` (JobStore.get_job) before the strings are filled."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiservice import errors
from aiservice.jobs import Job
from aiservice.worker.failure import JobFailure

_TOKEN = re.compile(r"\\\{\{|\{\{\s*([^{}]*?)\s*\}\}")
# Paths that read a dependency's result: into it, the whole dependency, or the whole list.
_RESULT_PATH = re.compile(r"^dependencies(?:\.(\d+)(?:\.result(?:\.|$)|$)|$)")

# Reads a job (its full result) by id.
ReadJob = Callable[[int], Awaitable[Job]]


def _unresolved(path: str, why: str) -> JobFailure:
    return JobFailure("invalid_input", f"placeholder {{{{{path}}}}} {why}", retryable=False)


def _lookup(context: Any, path: str) -> Any:
    value = context
    parts = path.split(".")
    for depth, part in enumerate(parts):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise _unresolved(path, f"does not resolve (at {part!r})")
        if depth == 1 and parts[0] == "dependencies" and isinstance(value, dict):
            if value.get("deleted"):
                raise _unresolved(path, f"names dependency {part} (job {value.get('id')}), which no longer exists")
            if value.get("result_omitted") and (len(parts) == 2 or parts[2] == "result"):
                raise _unresolved(path, f"names the result of dependency {part}, which was not read")
    return value


def fill(text: str, context: dict[str, Any]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return "{{"
        value = _lookup(context, match.group(1))
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return _TOKEN.sub(replace, text)


def _texts(messages: Iterable[dict[str, Any]]) -> Iterable[str]:
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            yield from (p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))


async def read_omitted(
    messages: list[dict[str, Any]], dependencies: list[dict[str, Any]], read: ReadJob | None
) -> list[dict[str, Any]]:
    """The dependencies with the results the placeholders need and the claim left out read in full."""
    found = [
        path.group(1)
        for text in _texts(messages)
        for match in _TOKEN.finditer(text)
        if match.group(1) is not None and (path := _RESULT_PATH.match(match.group(1)))
    ]
    wanted = set(range(len(dependencies))) if None in found else {int(i) for i in found if i is not None}
    complete = list(dependencies)
    for index in sorted(i for i in wanted if i < len(complete) and complete[i].get("result_omitted")):
        if read is None:
            continue  # _lookup names the placeholder
        dependency = complete[index]
        try:
            job = await read(int(dependency["id"]))
        except errors.NotFound:
            complete[index] = dependency | {"deleted": True}
            continue
        complete[index] = dependency | {"result": job.result, "result_omitted": False}
    return complete


async def fill_messages(
    messages: list[dict[str, Any]], dependencies: list[dict[str, Any]] | None, read: ReadJob | None = None
) -> list[dict[str, Any]]:
    """The chat messages with every placeholder in their text filled."""
    context = {"dependencies": await read_omitted(messages, dependencies or [], read)}
    filled = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            message = message | {"content": fill(content, context)}
        elif isinstance(content, list):
            parts = [
                p | {"text": fill(p["text"], context)} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                for p in content
            ]
            message = message | {"content": parts}
        filled.append(message)
    return filled
