"""Fuzz the HTTP API from its own OpenAPI document (schemathesis) against a real server on 127.0.0.1.

Every operation gets bounded positive (schema-valid) and negative (schema-breaking) examples, with
the bearer token and without it: no answer is a 5xx, and every answer has a documented status,
content type and body schema."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import hypothesis
import requests
import schemathesis
from conftest import ClientFactory, JobFactory
from hypothesis import HealthCheck, given
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from aiservice.api.openapi import openapi_document
from aiservice.db.store import JobStore
from aiservice.jobs import JobFilter

TOKEN = "fuzz-token-7f3a9c1e5b"
EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def fuzz(base_url: str, headers: dict[str, str], modes: list[GenerationMode]) -> Counter[int]:
    """Run every operation's examples (blocking: call from a thread); returns the statuses seen."""
    schema = schemathesis.openapi.from_dict(openapi_document())
    statuses: Counter[int] = Counter()
    session = requests.Session()
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), "schemathesis cannot read some operations of the document"
    assert len(operations) >= 17, "the document lost operations"
    for operation in operations:
        raw = openapi_document()["paths"][operation.path][operation.method.lower()]
        takes_input = "parameters" in raw or "requestBody" in raw
        for mode in modes:
            if mode is GenerationMode.NEGATIVE and not takes_input:
                continue  # nothing to break in a request without parameters or body

            @hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                response = case.call(base_url=base_url, session=session, headers=headers, timeout=10)
                statuses[response.status_code] += 1
                assert response.status_code < 500, (case.method, case.path, response.status_code, response.text)
                case.validate_response(response, checks=CHECKS, headers=headers)

            run()
    session.close()
    return statuses


async def _run(base_url: str, headers: dict[str, str], modes: list[GenerationMode]) -> Counter[int]:
    # The server lives on this event loop; the blocking client runs beside it in a thread.
    return await asyncio.to_thread(fuzz, base_url, headers, modes)


async def _seed(job_factory: JobFactory, store: JobStore) -> None:
    """A few jobs in every status, so generated ids and filters sometimes hit something."""
    for n in range(6):
        await job_factory(owner_ref=f"seed/{n}")


async def test_fuzz_with_the_token(api_factory: ClientFactory, job_factory: JobFactory, store: JobStore) -> None:
    await _seed(job_factory, store)
    api = await api_factory(service_token=TOKEN)
    base_url = str(api.make_url("")).rstrip("/")

    auth = {"Authorization": f"Bearer {TOKEN}"}
    positive = await _run(base_url, auth, [GenerationMode.POSITIVE])
    # Negative examples may also break the Authorization header itself: 401 is then a right answer.
    negative = await _run(base_url, auth, [GenerationMode.NEGATIVE])

    statuses = positive + negative
    print(f"fuzzed with the token: {statuses.total()} requests, statuses {dict(sorted(statuses.items()))}")
    assert all(status < 500 for status in statuses)
    # Honest fuzzing: the generated requests reach the handlers, they are not all refused at the door.
    assert 401 not in positive, positive
    assert positive[200] + positive[201] > 50, positive
    assert negative[422] + negative[400] > 50, negative
    # The service still works after the onslaught.
    assert (await api.get("/readyz")).status == 200
    assert await store.list_jobs(JobFilter(), before_id=None, limit=1)


async def test_fuzz_without_the_token_is_refused_everywhere_but_the_probes(
    api_factory: ClientFactory, job_factory: JobFactory, store: JobStore
) -> None:
    await _seed(job_factory, store)
    before = await store.list_jobs(JobFilter(), before_id=None, limit=500)
    api = await api_factory(service_token=TOKEN)
    base_url = str(api.make_url("")).rstrip("/")

    statuses = await _run(base_url, {"Authorization": "Bearer wrong-token"}, [GenerationMode.POSITIVE])
    statuses += await _run(base_url, {}, [GenerationMode.POSITIVE])

    print(f"fuzzed without the token: {statuses.total()} requests, statuses {dict(sorted(statuses.items()))}")
    # Only the two open probes (and the open OpenAPI document, not in the document) answer 200.
    assert set(statuses) <= {200, 401}, statuses
    assert statuses[401] > 10 * statuses[200], statuses
    # Nothing a stranger sent changed anything.
    assert await store.list_jobs(JobFilter(), before_id=None, limit=500) == before
