"""The OpenAPI document served at /api/v1/openapi.json stays equal to the app's routes and models."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from aiservice import console
from aiservice.api.app import create_app
from aiservice.api.handlers import ROUTES
from aiservice.api.openapi import openapi_document
from aiservice.api.schemas import ListQuery
from aiservice.jobs import JobStatus
from aiservice.settings import Settings

Client = TestClient[Any, Any]
ClientFactory = Callable[..., Awaitable[Client]]

OPENAPI_PATH = "/api/v1/openapi.json"
REF_PREFIX = "#/components/schemas/"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def registered_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) the router serves, without HEAD and the document itself."""
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        assert isinstance(path, str), info
        # The document itself; Prometheus text, not JSON; the console's HTML, CSS and JavaScript.
        if path not in (OPENAPI_PATH, "/metrics", *console.PATHS):
            found.add((route.method.lower(), path))
    return found


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert method in METHODS, (path, method)
            yield method, path, operation


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                assert isinstance(value, str)
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def schema_of(doc: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith(REF_PREFIX), ref
    name = ref.removeprefix(REF_PREFIX)
    assert name in doc["components"]["schemas"], f"{ref} is not in components.schemas"
    schema: dict[str, Any] = doc["components"]["schemas"][name]
    return schema


@pytest.fixture
def served() -> dict[str, Any]:
    """The document as a client reads it (test_the_document_is_served checks the two are equal)."""
    doc: dict[str, Any] = json.loads(json.dumps(openapi_document()))
    return doc


async def test_the_document_is_served_and_is_openapi_3(api: Client) -> None:
    response = await api.get(OPENAPI_PATH)
    assert response.status == 200
    assert response.content_type == "application/json"
    served = await response.json()
    assert served["openapi"].startswith("3.")
    assert served["info"]["title"] == "aiservice"
    assert served["info"]["version"]
    assert served == json.loads(json.dumps(openapi_document()))
    assert set(served["paths"]) >= {"/api/v1/jobs", "/api/v1/jobs/{id}", "/healthz", "/readyz"}
    head = await api.head(OPENAPI_PATH)
    assert head.status == 200


def test_paths_and_methods_equal_the_registered_routes(served: dict[str, Any]) -> None:
    # Built, never started: the router is complete without a database.
    app = create_app(Settings(database_url="postgresql://unused/db", service_token="t"))
    documented = {(method, path) for method, path, _ in operations(served)}
    assert documented == registered_routes(app)
    # And the route table is what the app registered.
    assert {(r.method.lower(), r.path) for r in ROUTES} == documented


def test_every_ref_resolves_to_a_component(served: dict[str, Any]) -> None:
    found = list(refs(served))
    assert found
    for ref in found:
        schema_of(served, ref)


def test_each_operation_names_request_and_response_schemas_that_exist(served: dict[str, Any]) -> None:
    for method, path, operation in operations(served):
        where = f"{method.upper()} {path}"
        assert operation["summary"], where
        responses = operation["responses"]
        assert any(code.startswith("2") for code in responses), where
        for code, response in responses.items():
            assert code.isdigit(), (where, code)
            assert response["description"], (where, code)
            if code == "204":
                assert "content" not in response, where
                continue
            schema_of(served, response["content"]["application/json"]["schema"]["$ref"])
            if code.startswith(("4", "5")) and path not in ("/healthz", "/readyz"):
                assert response["content"]["application/json"]["schema"]["$ref"] == f"{REF_PREFIX}ErrorBody", where
        if "requestBody" in operation:
            assert method in ("post", "put"), where
            assert operation["requestBody"]["required"] is True
            body = schema_of(served, operation["requestBody"]["content"]["application/json"]["schema"]["$ref"])
            assert body.get("additionalProperties") is False, f"{where}: unknown fields are refused"
            for code in ("400", "413", "415", "422"):
                assert code in responses, (where, code)


def test_operation_ids_are_unique(served: dict[str, Any]) -> None:
    ids = [operation["operationId"] for _, _, operation in operations(served)]
    assert len(ids) == len(set(ids))


def test_auth_is_documented_where_it_is_enforced(served: dict[str, Any]) -> None:
    assert served["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert served["security"] == [{"bearer": []}]
    for method, path, operation in operations(served):
        if path.startswith("/api/v1/"):
            assert "401" in operation["responses"], (method, path)
            assert operation.get("security", served["security"]) == [{"bearer": []}], (method, path)
        else:
            assert operation["security"] == [], (method, path)
            assert "401" not in operation["responses"], (method, path)


def test_success_and_error_statuses_match_the_api(served: dict[str, Any]) -> None:
    paths = served["paths"]
    success = {
        (method, path): {c for c in operation["responses"] if c.startswith("2")}
        for method, path, operation in operations(served)
    }
    assert success.pop(("post", "/api/v1/jobs")) == {"200", "201"}
    assert success.pop(("post", "/api/v1/jobs/batch")) == {"201"}
    assert success.pop(("delete", "/api/v1/limits/{scope}/{name}")) == {"204"}
    assert success.pop(("delete", "/api/v1/webhooks/{owner_service}")) == {"204"}
    assert all(codes == {"200"} for codes in success.values()), success

    for action in ("complete", "fail", "heartbeat"):
        assert {"404", "409", "422"} <= set(paths[f"/api/v1/jobs/{{id}}/{action}"]["post"]["responses"])
    for action in ("retry", "cancel"):
        assert {"404", "409", "422"} <= set(paths[f"/api/v1/jobs/{{id}}/{action}"]["post"]["responses"])
    assert {"404", "422"} <= set(paths["/api/v1/jobs/{id}"]["get"]["responses"])
    assert "422" in paths["/api/v1/jobs"]["get"]["responses"]
    assert "503" in paths["/readyz"]["get"]["responses"]


def test_path_parameters_are_declared(served: dict[str, Any]) -> None:
    for method, path, operation in operations(served):
        in_path = [p for p in operation.get("parameters", []) if p["in"] == "path"]
        if "{id}" in path:
            assert len(in_path) == 1, (method, path)
            (param,) = in_path
            assert param["name"] == "id"
            assert param["required"] is True
            assert param["schema"]["type"] == "integer"
            assert param["schema"]["minimum"] == 1
            assert param["schema"]["maximum"] == 2**63 - 1
        else:
            assert in_path == [], (method, path)


def test_list_query_parameters_are_the_list_filters(served: dict[str, Any]) -> None:
    params = {p["name"]: p for p in served["paths"]["/api/v1/jobs"]["get"]["parameters"] if p["in"] == "query"}
    assert set(params) == set(ListQuery.model_fields)
    assert set(params) >= {
        "owner_service",
        "owner_ref",
        "task_type",
        "model_profile",
        "status",
        "created_after",
        "created_before",
        "limit",
        "cursor",
        "batch_id",
    }
    assert all(p["required"] is False for p in params.values())
    status = params["status"]
    assert (status["style"], status["explode"]) == ("form", True), "status is repeatable"
    items = next(s["items"] for s in status["schema"]["anyOf"] if s.get("type") == "array")
    assert {v.value for v in JobStatus} == set(schema_of(served, items["$ref"])["enum"])
    limit = params["limit"]["schema"]
    assert (limit["default"], limit["minimum"], limit["maximum"]) == (50, 1, 500)


async def test_the_schemas_match_what_the_api_returns(api: Client, served: dict[str, Any]) -> None:
    body = {"owner_service": "telephony", "owner_ref": "r/1", "task_type": "llm_chat", "model_profile": "qwen"}
    job = await (await api.post("/api/v1/jobs", json=body)).json()
    job_schema = served["components"]["schemas"]["Job"]
    assert set(job_schema["properties"]) == set(job)
    assert set(job_schema["required"]) == set(job)

    create = served["components"]["schemas"]["JobCreate"]
    assert set(create["required"]) == set(body)
    assert set(create["properties"]) == set(body) | {
        "input",
        "priority",
        "run_at",
        "max_attempts",
        "idempotency_key",
        "depends_on",
    }

    page = await (await api.get("/api/v1/jobs")).json()
    assert set(served["components"]["schemas"]["JobPage"]["properties"]) == set(page)
    stats = await (await api.get("/api/v1/stats")).json()
    assert set(served["components"]["schemas"]["Stats"]["properties"]) == set(stats)

    error = await (await api.get("/api/v1/jobs/1234567")).json()
    error_schema = schema_of(served, served["components"]["schemas"]["ErrorBody"]["properties"]["error"]["$ref"])
    assert {"code", "message"} <= set(error_schema["required"])
    assert set(error["error"]) <= set(error_schema["properties"])


async def test_the_document_needs_the_token_when_one_is_set(api_factory: ClientFactory) -> None:
    api = await api_factory(service_token="s3cret")
    assert (await api.get(OPENAPI_PATH)).status == 401
    response = await api.get(OPENAPI_PATH, headers={"Authorization": "Bearer s3cret"})
    assert response.status == 200
    assert await response.json() == openapi_document()


def test_the_stats_response_is_described_field_by_field(served: dict[str, Any]) -> None:
    """GET /stats answers Stats: every field of it, and of every object inside it, carries a
    description, and totals names every status."""
    operation = served["paths"]["/api/v1/stats"]["get"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"] == f"{REF_PREFIX}Stats"
    seen: set[str] = set()
    todo = [f"{REF_PREFIX}Stats"]
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        schema = schema_of(served, ref)
        if "enum" in schema:
            continue
        assert schema.get("description"), f"{ref} has no description"
        for name, prop in schema["properties"].items():
            assert prop.get("description"), f"{ref}.{name} has no description"
            todo.extend(refs(prop))
    totals = schema_of(served, f"{REF_PREFIX}StatusTotals")
    assert set(totals["properties"]) == set(totals["required"]) == {s.value for s in JobStatus}
    assert {f"{REF_PREFIX}{name}" for name in ("StatusTotals", "CreatedCount", "StatusCount", "Limit")} <= seen
