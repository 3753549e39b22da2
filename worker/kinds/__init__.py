"""Job kinds: the plug-ins that run one kind of job against one provider (kinds/llm.py, kinds/whisperx.py).

The worker claims, supervises and records outcomes; a kind only turns a job's input into a result."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from aiservice.jobs import Job
from aiservice.worker.failure import invalid_input

M = TypeVar("M", bound=BaseModel)


class Kind(Protocol):
    """Runs the jobs of some task types and model profiles against one provider.

    ``run`` returns the job's result or raises aiservice.worker.failure.JobFailure; it must stop promptly
    when cancelled (the worker cancels it on abort, lost lease or shutdown)."""

    name: str
    task_types: tuple[str, ...]
    model_profiles: tuple[str, ...]

    async def run(self, job: Job) -> dict[str, Any]: ...

    async def close(self) -> None: ...


def matches(kind: Kind, task_type: str | None, model_profile: str | None) -> bool:
    """Whether a notification about (task_type, model_profile) concerns ``kind``. None stands for
    any: a changed limit wakes every worker of a profile or task type. (What a worker serves, as
    /worker/status shows it, is status.serves.)"""
    return (task_type is None or task_type in kind.task_types) and (
        model_profile is None or model_profile in kind.model_profiles
    )


def parse_input(model: type[M], job: Job) -> M:
    """The job's input as ``model``; input the worker cannot use fails with invalid_input (not retried)."""
    try:
        return model.model_validate(job.input)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "input"
        raise invalid_input(f"{where}: {first['msg']}") from exc


def describe(kinds: Iterable[Kind]) -> str:
    """What the kinds serve, for a log line: "llm_chat/call_analysis @ qwen2.5-14b, transcribe @ whisperx"."""
    return ", ".join(f"{'/'.join(k.task_types)} @ {'/'.join(k.model_profiles)}" for k in kinds)
