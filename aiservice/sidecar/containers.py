"""Containers from the Docker Engine API over its unix socket.

Only name, image, state, health and restart count leave this module: a container inspection also
carries environment variables and mounts, which may hold secrets.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from aiservice.sidecar.report import Report, available, unavailable

# The host part is ignored over a unix socket, but HTTP needs one.
ENGINE = "http://docker"
# Inspections run concurrently, a few at a time, so a host with hundreds of containers stays polite.
INSPECT_CONCURRENCY = 8


class ContainerSource:
    def __init__(self, socket_path: Path) -> None:
        self._socket = socket_path

    async def collect(self) -> Report:
        connector = aiohttp.UnixConnector(path=str(self._socket))
        async with aiohttp.ClientSession(connector=connector, raise_for_status=True) as session:
            try:
                listing = await _get(session, "/containers/json?all=1")
            except aiohttp.ClientConnectorError as exc:
                return unavailable(self._connect_reason(exc))
            if not isinstance(listing, list):
                raise ValueError("the Docker Engine API did not answer a container list")
            gate = asyncio.Semaphore(INSPECT_CONCURRENCY)
            containers = await asyncio.gather(*(_container(session, gate, entry) for entry in listing))
        containers.sort(key=lambda c: str(c["name"]))
        return available(socket=str(self._socket), containers=containers)

    def _connect_reason(self, exc: aiohttp.ClientConnectorError) -> str:
        if isinstance(exc.os_error, FileNotFoundError):
            return f"Docker socket {self._socket} not found"
        if isinstance(exc.os_error, PermissionError):
            return f"permission denied on Docker socket {self._socket} (run the sidecar in the docker group)"
        return f"cannot connect to Docker socket {self._socket}: {exc.os_error.strerror or type(exc.os_error).__name__}"


async def _get(session: aiohttp.ClientSession, path: str) -> Any:
    async with session.get(ENGINE + path) as response:
        return await response.json()


async def _container(session: aiohttp.ClientSession, gate: asyncio.Semaphore, entry: Any) -> dict[str, object]:
    names = entry.get("Names") or []
    container_id = str(entry.get("Id", ""))
    summary: dict[str, object] = {
        "id": container_id[:12],
        "name": names[0].lstrip("/") if names else container_id[:12],
        "image": entry.get("Image"),
        "state": entry.get("State"),
        "status": entry.get("Status"),
        "health": None,
        "restart_count": None,
    }
    try:
        async with gate:
            inspected = await _get(session, f"/containers/{container_id}/json")
    except aiohttp.ClientResponseError:
        # Removed between the listing and the inspection: keep what the listing told.
        return summary
    state = inspected.get("State") or {}
    health = state.get("Health") or {}
    summary["health"] = health.get("Status")
    summary["restart_count"] = inspected.get("RestartCount")
    return summary
