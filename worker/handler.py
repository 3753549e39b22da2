"""What the runner needs from a built-in worker: the jobs it serves and how to run one."""

from __future__ import annotations

from typing import Any, Protocol

from aiservice.models import Job


class Handler(Protocol):
    """Runs one kind of job against one provider.

    ``run`` returns the job's result or raises worker.failure.JobFailure; it must stop promptly
    when cancelled (the runner cancels it on abort, lost lease or shutdown)."""

    name: str
    task_types: tuple[str, ...]
    model_profiles: tuple[str, ...]

    async def run(self, job: Job) -> dict[str, Any]: ...

    async def close(self) -> None: ...


def serves(handler: Handler, task_type: str, model_profile: str) -> bool:
    return task_type in handler.task_types and model_profile in handler.model_profiles
