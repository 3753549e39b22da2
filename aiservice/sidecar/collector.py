"""Collects every source concurrently, each within the timeout, into one status document."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import aiohttp

from aiservice.sidecar.containers import ContainerSource
from aiservice.sidecar.gpu import GpuSource
from aiservice.sidecar.report import Report, guarded, unavailable
from aiservice.sidecar.settings import SidecarSettings
from aiservice.sidecar.vllm import VllmSource
from aiservice.sidecar.whisperx import WhisperxSource


class Collector:
    def __init__(self, settings: SidecarSettings, session: aiohttp.ClientSession, clock: Callable[[], float]) -> None:
        self._timeout = settings.timeout
        self._secrets = settings.secrets()
        self._gpu = GpuSource(settings.timeout)
        self._containers = ContainerSource(settings.docker_socket)
        self._vllm = (
            VllmSource(settings.vllm_url, session, clock, self._secrets, api_key=settings.vllm_api_key)
            if settings.vllm_url
            else None
        )
        self._whisperx = WhisperxSource(settings.whisperx_url, session) if settings.whisperx_url else None

    async def status(self) -> dict[str, object]:
        gpu, containers, vllm, whisperx = await asyncio.gather(
            guarded("gpu", self._gpu.collect, self._timeout, self._secrets),
            guarded("containers", self._containers.collect, self._timeout, self._secrets),
            self._collect_vllm(),
            self._collect_whisperx(),
        )
        return {
            "collected_at": datetime.now(UTC).isoformat(),
            "sources": {"gpu": gpu, "containers": containers, "vllm": vllm, "whisperx": whisperx},
        }

    async def _collect_vllm(self) -> Report:
        if self._vllm is None:
            return unavailable("not configured (SIDECAR_VLLM_URL is unset)", url=None)
        return await guarded("vllm", self._vllm.collect, self._timeout, self._secrets, url=self._vllm.public_url)

    async def _collect_whisperx(self) -> Report:
        fallback: dict[str, object] = {"reachable": False, "latency_ms": None}
        if self._whisperx is None:
            return unavailable("not configured (SIDECAR_WHISPERX_URL is unset)", url=None, **fallback)
        return await guarded(
            "whisperx", self._whisperx.collect, self._timeout, self._secrets, url=self._whisperx.public_url, **fallback
        )

    async def close(self) -> None:
        await self._gpu.close()
