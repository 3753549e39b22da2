"""Provider status against stub providers that speak real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from aiservice.providers import ProviderStatus
from aiservice.settings import Settings

KEY = "sk-provider-secret-123"


@dataclass
class Stub:
    url: str
    requests: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: ["qwen2.5-14b"])
    hang: bool = False
    authorizations: list[str | None] = field(default_factory=list)
    # What a wrong key gets: (status, JSON body).
    refusal: tuple[int, Any] = (401, {"error": {"message": "bad key"}})


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    state = Stub(url="")

    async def models(request: web.Request) -> web.Response:
        state.requests.append(request.path_qs)
        if state.hang:
            await asyncio.sleep(30)
        state.authorizations.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            status, body = state.refusal
            return web.json_response(body, status=status)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in state.models]})

    async def openapi(request: web.Request) -> web.Response:
        state.requests.append(request.path_qs)
        return web.json_response({"openapi": "3.1.0", "paths": {"/asr": {}}})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/openapi.json", openapi)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = f"http://127.0.0.1:{server.port}"
    yield state
    await server.close()


def provider_up(provider: str) -> float | None:
    return REGISTRY.get_sample_value("aiservice_provider_up", {"provider": provider})


def leaks(doc: dict[str, Any], *secrets: str) -> list[str]:
    text = json.dumps(doc)
    return [s for s in secrets if s in text]


async def test_unconfigured_providers_are_not_errors() -> None:
    doc = await ProviderStatus(Settings()).status()
    assert doc["providers"] == {"llm": {"configured": False}, "whisperx": {"configured": False}}


async def test_llm_reachable_and_model_served(stub: Stub) -> None:
    settings = Settings(llm_base_url=f"{stub.url}/v1", llm_api_key=KEY, whisperx_url=stub.url)
    doc = await ProviderStatus(settings).status()
    llm = doc["providers"]["llm"]
    assert llm["configured"] and llm["reachable"] and llm["authorized"] and llm["model_served"]
    assert llm["models"] == ["qwen2.5-14b"] and llm["error"] is None
    assert llm["latency_ms"] >= 0
    assert doc["providers"]["whisperx"]["reachable"] is True
    assert doc["providers"]["whisperx"]["authorized"] is True
    assert leaks(doc, KEY) == []
    assert (provider_up("llm"), provider_up("whisperx")) == (1.0, 1.0)


async def test_model_not_served_is_reported(stub: Stub) -> None:
    stub.models = ["llama-3-8b"]
    settings = Settings(llm_base_url=f"{stub.url}/v1", llm_api_key=KEY, llm_model="qwen2.5-14b")
    llm = (await ProviderStatus(settings).status())["providers"]["llm"]
    assert llm["reachable"] is True and llm["model_served"] is False
    assert "qwen2.5-14b" in llm["error"]


async def test_wrong_key_is_an_error_without_the_key(stub: Stub) -> None:
    settings = Settings(llm_base_url=f"{stub.url}/v1", llm_api_key="sk-wrong-key-456")
    doc = await ProviderStatus(settings).status()
    llm = doc["providers"]["llm"]
    # It answered, so it is reachable; it refused the key, so it is not authorized.
    assert (llm["reachable"], llm["authorized"], llm["http_status"]) == (True, False, 401)
    assert llm["error"] == "HTTP 401 from provider: bad key"
    assert leaks(doc, "sk-wrong-key-456") == []
    assert provider_up("llm") == 0.0


async def test_litellm_without_a_database_refusing_the_key(stub: Stub) -> None:
    # LiteLLM without a database answers a key it does not know with 400, and (here) echoes it.
    message = "Authentication Error, No connected db. Received Bearer sk-wrong-key-456"
    stub.refusal = (400, {"error": {"message": message, "type": "no_db_connection", "param": "None", "code": "400"}})
    doc = await ProviderStatus(Settings(llm_base_url=f"{stub.url}/v1", llm_api_key="sk-wrong-key-456")).status()
    llm = doc["providers"]["llm"]
    assert (llm["reachable"], llm["authorized"], llm["http_status"]) == (True, False, 400)
    assert llm["error"] == "HTTP 400 from provider: Authentication Error, No connected db. Received Bearer ***"
    assert llm["model_served"] is False
    assert leaks(doc, "sk-wrong-key-456") == []
    assert provider_up("llm") == 0.0


async def test_provider_errors_are_kept_short(stub: Stub) -> None:
    stub.refusal = (500, {"detail": "x" * 5000})
    llm = (await ProviderStatus(Settings(llm_base_url=f"{stub.url}/v1", llm_api_key="other")).status())["providers"][
        "llm"
    ]
    # A server error is no refusal of the key, and no sign it was accepted either.
    assert (llm["reachable"], llm["authorized"], llm["http_status"]) == (True, None, 500)
    assert llm["error"].startswith("HTTP 500 from provider: xxx")
    assert len(llm["error"]) < 400
    assert provider_up("llm") == 0.0


async def test_without_a_key_the_probe_sends_what_the_worker_sends(stub: Stub) -> None:
    doc = await ProviderStatus(Settings(llm_base_url=f"{stub.url}/v1")).status()
    # The openai client of the LLM worker insists on a key and sends "unused" when none is set.
    assert stub.authorizations == ["Bearer unused"]
    assert doc["providers"]["llm"]["authorized"] is False


async def test_url_credentials_never_appear(stub: Stub) -> None:
    # Port 9 on loopback: nothing listens, so the connection error names the URL's host.
    llm_url = "http://alice:url-pass-789@127.0.0.1:9/v1?api_key=query-secret-000"
    settings = Settings(llm_base_url=llm_url, llm_api_key=KEY, whisperx_url="http://bob:wx-pass-321@127.0.0.1:9")
    doc = await ProviderStatus(settings).status()
    assert doc["providers"]["llm"]["reachable"] is False
    assert doc["providers"]["llm"]["authorized"] is None
    assert doc["providers"]["llm"]["error"]
    assert doc["providers"]["whisperx"]["reachable"] is False
    assert (provider_up("llm"), provider_up("whisperx")) == (0.0, 0.0)
    assert leaks(doc, "url-pass-789", "query-secret-000", "wx-pass-321", KEY) == []
    assert doc["providers"]["llm"]["url"] == "http://alice:***@127.0.0.1:9/v1?***"


async def test_query_string_keys_are_kept_on_the_request(stub: Stub) -> None:
    settings = Settings(llm_base_url=f"{stub.url}/v1?tenant=a", llm_api_key=KEY)
    await ProviderStatus(settings).status()
    assert stub.requests == ["/v1/models?tenant=a"]


async def test_results_are_cached_and_shared(stub: Stub) -> None:
    status = ProviderStatus(Settings(llm_base_url=f"{stub.url}/v1", llm_api_key=KEY), cache_seconds=60)
    docs = await asyncio.gather(*(status.status() for _ in range(10)))
    await status.status()
    assert len(stub.requests) == 1
    assert all(d == docs[0] for d in docs)


async def test_a_hanging_provider_times_out(stub: Stub) -> None:
    stub.hang = True
    status = ProviderStatus(Settings(llm_base_url=f"{stub.url}/v1", llm_api_key=KEY), timeout=0.3)
    llm = (await status.status())["providers"]["llm"]
    assert llm["reachable"] is False
    assert "no answer within 0.3s" in llm["error"]
