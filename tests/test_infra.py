"""/api/v1/infra/status proxies the real sidecar app over HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from aiservice.infra import InfraStatus
from aiservice.settings import Settings
from aiservice.sidecar import SidecarSettings, create_app

TOKEN = "sidecar-token-abc"


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[str]:
    # No vLLM, WhisperX, Docker socket or NVML here: every source reports itself unavailable.
    settings = SidecarSettings(token=TOKEN, docker_socket=tmp_path / "absent.sock")
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


async def test_unconfigured() -> None:
    assert await InfraStatus(Settings()).status() == {"configured": False}


async def test_proxies_the_sidecar_with_its_token(sidecar: str) -> None:
    doc = await InfraStatus(Settings(infra_sidecar_url=sidecar, infra_sidecar_token=TOKEN)).status()
    assert doc["configured"] is True and doc["reachable"] is True and doc["error"] is None
    assert set(doc["sources"]) == {"gpu", "containers", "vllm", "whisperx"}
    assert all(source["available"] is False and source["reason"] for source in doc["sources"].values())
    assert TOKEN not in json.dumps(doc)


async def test_wrong_token_is_a_clear_status(sidecar: str) -> None:
    doc = await InfraStatus(Settings(infra_sidecar_url=sidecar, infra_sidecar_token="wrong-token-xyz")).status()
    assert doc == {"configured": True, "url": sidecar, "reachable": False, "error": "sidecar answered HTTP 401"}


async def test_sidecar_down_is_a_clear_status_without_credentials() -> None:
    url = "http://ops:sidecar-pass-42@127.0.0.1:9"
    doc = await InfraStatus(Settings(infra_sidecar_url=url, infra_sidecar_token=TOKEN)).status()
    assert doc["reachable"] is False and doc["error"]
    assert doc["url"] == "http://ops:***@127.0.0.1:9"
    text = json.dumps(doc)
    assert "sidecar-pass-42" not in text and TOKEN not in text


async def test_cached_briefly(sidecar: str) -> None:
    infra = InfraStatus(Settings(infra_sidecar_url=sidecar, infra_sidecar_token=TOKEN), cache_seconds=60)
    first = await infra.status()
    assert await infra.status() is first
