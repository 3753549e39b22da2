"""Placeholders in a chat job's strings, filled from the results of the jobs it depends on.

``{{dependencies.0.result.text}}`` is a dotted path into the job's dependencies as the claim
returned them (0-based, in the order given at creation): each has id, task_type, model_profile,
status and result. A string value is inserted as it is; anything else as JSON. ``\\{{`` writes a
literal ``{{``. A path that does not resolve fails the job with invalid_input naming the path."""

from __future__ import annotations

import json
import re
from typing import Any

from worker.failure import JobFailure

_TOKEN = re.compile(r"\\\{\{|\{\{\s*([^{}]*?)\s*\}\}")


def _lookup(context: Any, path: str) -> Any:
    value = context
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise JobFailure(
                "invalid_input", f"placeholder {{{{{path}}}}} does not resolve (at {part!r})", retryable=False
            )
    return value


def fill(text: str, context: dict[str, Any]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return "{{"
        value = _lookup(context, match.group(1))
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return _TOKEN.sub(replace, text)


def fill_messages(messages: list[dict[str, Any]], dependencies: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The chat messages with every placeholder in their text filled."""
    context = {"dependencies": dependencies or []}
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
