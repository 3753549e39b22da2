"""The OpenAPI 3 document, generated from the route table and its pydantic models."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from aiservice import __version__
from aiservice.api.handlers import ROUTES, Route
from aiservice.api.schemas import ErrorBody

REF = "#/components/schemas/{model}"
_ERROR_TEXT = {
    400: "Malformed JSON",
    401: "Missing or wrong bearer token",
    404: "Unknown job",
    409: "Wrong state, lost lease, or an idempotency_key that names a job another request created",
    408: "The body stopped arriving for HTTP_BODY_TIMEOUT",
    413: "Body too large",
    415: "Not application/json: a POST, PUT or DELETE must send Content-Type: application/json or X-Requested-With",
    422: "Validation failed",
    429: "Too many waits open (WAIT_MAX_CONCURRENT, WAIT_MAX_PER_CALLER): retry after Retry-After seconds",
    503: "PostgreSQL unavailable, or the request collided with concurrent ones: retry",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _parameters(route: Route, schemas: dict[str, Any]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    if "{id}" in route.path:
        params.append(
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
            }
        )
    if route.query is not None:
        props = schemas[route.query.__name__]["properties"]
        for name, schema in props.items():
            param: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema}
            if "array" in str(schema):
                param["style"] = "form"
                param["explode"] = True
            params.append(param)
    return params


@functools.cache
def openapi_document() -> dict[str, Any]:
    models: set[type[BaseModel]] = {ErrorBody}
    for route in ROUTES:
        models.update(m for m in (route.response, route.body, route.query) if m is not None)
    keyed = [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)]
    _, top = models_json_schema(keyed, ref_template=REF)  # type: ignore[arg-type]
    schemas: dict[str, Any] = top.get("$defs", {})

    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        ok = {"description": "OK", "content": {"application/json": {"schema": _ref(route.response)}}}
        responses: dict[str, Any] = {str(route.status): ok if route.status != 204 else {"description": "No Content"}}
        for status in route.also:
            responses[str(status)] = responses[str(route.status)]
        # Every bearer-protected route may answer 401, every route with a body 408 and 413, every
        # state-changing one 415. Every API route reads PostgreSQL, so every one may answer 503 while it is down.
        codes = set(route.errors) | (set() if route.public else {401, 503}) | ({408, 413} if route.body else set())
        codes |= {415} if route.method != "GET" else set()
        for code in sorted(codes):
            responses[str(code)] = {
                "description": _ERROR_TEXT[code],
                "content": {
                    "application/json": {
                        "schema": _ref(ErrorBody if code != 503 or not route.public else route.response)
                    }
                },
            }
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "responses": responses,
        }
        params = _parameters(route, schemas)
        if params:
            operation["parameters"] = params
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(route.body)}},
            }
        if route.public:
            operation["security"] = []
        paths.setdefault(route.path, {})[route.method.lower()] = operation

    return {
        "openapi": "3.1.0",
        "info": {"title": "aiservice", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
