"""The sidecar's settings, read once from the environment.

The sidecar runs on the GPU host, apart from the service, so it has its own small set of variables:

    SIDECAR_HOST           address to listen on (default 0.0.0.0)
    SIDECAR_PORT           port to listen on (default 8090)
    SIDECAR_TOKEN          bearer token required on /status; unset leaves /status open
    SIDECAR_VLLM_URL       vLLM base URL, e.g. http://127.0.0.1:8000; unset reports vllm as unavailable
    SIDECAR_VLLM_API_KEY   the key vLLM was started with (--api-key), sent as a bearer token to its /v1
                           paths; VLLM_API_KEY, the variable vLLM itself reads, is taken when this is unset.
                           On /v1 the key replaces basic credentials written in SIDECAR_VLLM_URL.
    SIDECAR_WHISPERX_URL   WhisperX base URL, e.g. http://127.0.0.1:9000; unset reports whisperx as unavailable
    SIDECAR_DOCKER_SOCKET  Docker Engine API socket (default /var/run/docker.sock)
    SIDECAR_TIMEOUT        time limit per source, a Go duration (default 2s)

An empty variable counts as unset. A bad value raises SettingsError naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from aiservice.settings import SettingsError, format_duration, mask_url, parse_duration, url_secrets


@dataclass(frozen=True)
class SidecarSettings:
    host: str = "0.0.0.0"
    port: int = 8090
    token: str | None = field(default=None, repr=False)
    vllm_url: str | None = field(default=None, repr=False)
    vllm_api_key: str | None = field(default=None, repr=False)
    whisperx_url: str | None = field(default=None, repr=False)
    docker_socket: Path = Path("/var/run/docker.sock")
    timeout: timedelta = timedelta(seconds=2)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SidecarSettings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            raw = env.get(name)
            return raw if raw else None

        values: dict[str, object] = {}
        if (host := get("SIDECAR_HOST")) is not None:
            values["host"] = host
        if (port := get("SIDECAR_PORT")) is not None:
            values["port"] = _port("SIDECAR_PORT", port)
        if (token := get("SIDECAR_TOKEN")) is not None:
            values["token"] = token
        if (vllm := get("SIDECAR_VLLM_URL")) is not None:
            values["vllm_url"] = _url("SIDECAR_VLLM_URL", vllm)
        if (vllm_key := get("SIDECAR_VLLM_API_KEY") or get("VLLM_API_KEY")) is not None:
            values["vllm_api_key"] = vllm_key
        if (whisperx := get("SIDECAR_WHISPERX_URL")) is not None:
            values["whisperx_url"] = _url("SIDECAR_WHISPERX_URL", whisperx)
        if (socket := get("SIDECAR_DOCKER_SOCKET")) is not None:
            values["docker_socket"] = Path(socket)
        if (timeout := get("SIDECAR_TIMEOUT")) is not None:
            values["timeout"] = _timeout("SIDECAR_TIMEOUT", timeout)
        return cls(**values)  # type: ignore[arg-type]

    def public(self) -> dict[str, object]:
        """The effective settings with secrets masked, safe to log."""
        return {
            "SIDECAR_HOST": self.host,
            "SIDECAR_PORT": self.port,
            "SIDECAR_TOKEN": "***" if self.token else None,
            "SIDECAR_VLLM_URL": mask_url(self.vllm_url),
            "SIDECAR_VLLM_API_KEY": "***" if self.vllm_api_key else None,
            "SIDECAR_WHISPERX_URL": mask_url(self.whisperx_url),
            "SIDECAR_DOCKER_SOCKET": str(self.docker_socket),
            "SIDECAR_TIMEOUT": format_duration(self.timeout),
        }

    def secrets(self) -> list[str]:
        """Strings that must never reach a response or a log: the token, the vLLM key, URL passwords and queries."""
        found = [secret for secret in (self.token, self.vllm_api_key) if secret]
        for url in (self.vllm_url, self.whisperx_url):
            found.extend(url_secrets(url))
        return found


def _port(name: str, raw: str) -> int:
    try:
        number = int(raw)
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} is not an integer") from None
    if not 0 <= number <= 65535:
        raise SettingsError(f"{name}: {number} is not a port number (0-65535)")
    return number


def _url(name: str, raw: str) -> str:
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise SettingsError(f"{name}: is not a URL") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise SettingsError(f"{name}: is not an http(s) URL like http://127.0.0.1:8000")
    return raw


def _timeout(name: str, raw: str) -> timedelta:
    try:
        value = parse_duration(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from exc
    if value <= timedelta(0):
        raise SettingsError(f"{name}: {raw!r} must be longer than zero")
    return value
