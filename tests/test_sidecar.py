"""The AI-server sidecar against real HTTP stubs: vLLM, WhisperX, and a Docker Engine API on a unix socket."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from aiservice.settings import SettingsError
from aiservice.sidecar import SidecarSettings, create_app
from aiservice.sidecar.histogram import quantile

TOKEN = "sidecar-token-s3cret"
URL_PASSWORD = "url-pa55word"
QUERY_SECRET = "query-s3cret"
VLLM_KEY = "vllm-api-key-s3cret"


class FakeClock:
    """Drives the scrape times behind tokens/s, so rates are exact and nothing sleeps."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- a vLLM stub ---------------------------------------------------------------------------------


def histogram(name: str, bounds: tuple[str, ...], per_scrape: dict[str, tuple[int, ...]], scrape: int) -> str:
    """A cumulative histogram, one series per engine: 500 slow requests (over the highest bound) from
    before the sidecar's first scrape, then each engine's ``per_scrape`` bucket counts once per scrape."""
    text = f"# HELP {name} A histogram.\n# TYPE {name} histogram\n"
    for engine, counts in per_scrape.items():
        labels = f'engine="{engine}",model_name="qwen"'
        cumulative = [count * scrape for count in counts]
        cumulative[-1] += 500
        for le, count in zip(bounds, cumulative, strict=True):
            text += f'{name}_bucket{{{labels},le="{le}"}} {count}.0\n'
        text += f"{name}_count{{{labels}}} {cumulative[-1]}.0\n{name}_sum{{{labels}}} {cumulative[-1] * 2}.0\n"
    return text


def counter(name: str, value: int) -> str:
    return f'# HELP {name} A counter.\n# TYPE {name} counter\n{name}_total{{model_name="qwen"}} {value}.0\n'


def vllm_metrics(scrape: int, legacy: bool) -> str:
    """vLLM's exposition after ``scrape`` earlier scrapes. Per scrape: 500 prompt and 250 generation
    tokens, 3 preemptions, 1000 prefix-cache queries of which 400 hit, and 100 requests in each
    histogram. ``legacy``: the older names (KV cache, time per output token, prefix-cache hit-rate gauge)."""
    kv_metric = "vllm:gpu_cache_usage_perc" if legacy else "vllm:kv_cache_usage_perc"
    kv = (
        f'{kv_metric}{{model_name="qwen"}} 0.4\n'
        if legacy
        else f'{kv_metric}{{engine="0",model_name="qwen"}} 0.25\n{kv_metric}{{engine="1",model_name="qwen"}} 0.75\n'
    )
    # TTFT split over two engines: per scrape, merged buckets 0.1→10, 0.5→60, 1→90, 2.5→100, +Inf→100.
    ttft_bounds = ("0.1", "0.5", "1.0", "2.5", "+Inf")
    ttft = {"0": (4, 30, 45, 50, 50), "1": (6, 30, 45, 50, 50)}
    # End-to-end: 1→0, 5→20, 10→80, 30→100, +Inf→100; inter-token and queue time likewise.
    e2e = {"0": (0, 20, 80, 100, 100)}
    itl = {"0": (20, 70, 95, 100, 100)}
    queue = {"0": (50, 80, 100, 100)}
    itl_metric = "vllm:time_per_output_token_seconds" if legacy else "vllm:inter_token_latency_seconds"
    prefix = (
        '# TYPE vllm:gpu_prefix_cache_hit_rate gauge\nvllm:gpu_prefix_cache_hit_rate{model_name="qwen"} 0.65\n'
        if legacy
        else counter("vllm:prefix_cache_queries", 10000 + 1000 * scrape)
        + counter("vllm:prefix_cache_hits", 9000 + 400 * scrape)
    )
    return (
        f"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="qwen"}} 2.0
vllm:num_requests_running{{engine="1",model_name="qwen"}} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="qwen"}} 4.0
vllm:num_requests_waiting{{engine="1",model_name="qwen"}} 0.0
# HELP {kv_metric} KV-cache usage. 1 means 100 percent usage.
# TYPE {kv_metric} gauge
{kv}"""
        + counter("vllm:prompt_tokens", 1000 + 500 * scrape)
        + counter("vllm:generation_tokens", 2000 + 250 * scrape)
        + counter("vllm:num_preemptions", 7 + 3 * scrape)
        + prefix
        + histogram("vllm:time_to_first_token_seconds", ttft_bounds, ttft, scrape)
        + histogram("vllm:e2e_request_latency_seconds", ("1.0", "5.0", "10.0", "30.0", "+Inf"), e2e, scrape)
        + histogram(itl_metric, ("0.01", "0.025", "0.05", "0.1", "+Inf"), itl, scrape)
        + histogram("vllm:request_queue_time_seconds", ("0.1", "1.0", "5.0", "+Inf"), queue, scrape)
    )


class VllmStub:
    def __init__(self, legacy: bool = False, api_key: str | None = None) -> None:
        self.legacy = legacy
        self.api_key = api_key  # as vLLM's --api-key: every /v1 path wants it as a bearer token
        self.scrapes = 0
        self.metrics_body: str | None = None  # overrides the exposition when set
        self.metrics_status = 200
        self.hang = False
        self.release = asyncio.Event()
        self.authorization: list[str] = []
        self.models_authorization: list[str] = []
        self.app = web.Application()
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/v1/models", self.models)

    async def metrics(self, request: web.Request) -> web.Response:
        self.authorization.append(request.headers.get("Authorization", ""))
        if self.hang:
            await self.release.wait()
        if self.metrics_status != 200:
            return web.Response(status=self.metrics_status, text="engine dead")
        body = self.metrics_body if self.metrics_body is not None else vllm_metrics(self.scrapes, self.legacy)
        self.scrapes += 1
        return web.Response(text=body, content_type="text/plain", charset="utf-8")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "")
        self.models_authorization.append(given)
        if self.api_key is not None and given != f"Bearer {self.api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return web.json_response({"object": "list", "data": [{"id": "qwen2.5-14b", "object": "model"}]})


# --- a Docker Engine API stub ---------------------------------------------------------------------

CONTAINERS: list[dict[str, Any]] = [
    {
        "Id": "a" * 64,
        "Names": ["/vllm"],
        "Image": "vllm/vllm-openai:v0.8.5",
        "State": "running",
        "Status": "Up 2 hours (healthy)",
        "Labels": {"secret.label": "label-s3cret"},
    },
    {"Id": "b" * 64, "Names": ["/whisperx"], "Image": "whisperx:latest", "State": "exited", "Status": "Exited (1)"},
    {"Id": "c" * 64, "Names": ["/gone"], "Image": "busybox", "State": "running", "Status": "Up 1 second"},
]
INSPECTIONS: dict[str, dict[str, Any]] = {
    "a" * 64: {
        "Name": "/vllm",
        "RestartCount": 0,
        "State": {"Status": "running", "Health": {"Status": "healthy", "FailingStreak": 0}},
        "Config": {"Env": ["HF_TOKEN=hf_env_s3cret"]},
    },
    "b" * 64: {
        "Name": "/whisperx",
        "RestartCount": 3,
        "State": {"Status": "exited", "ExitCode": 1},
        "Config": {"Env": ["API_KEY=env-s3cret"]},
    },
    # "c…" was removed between the listing and the inspection: 404.
}


def docker_app() -> web.Application:
    async def containers(request: web.Request) -> web.Response:
        listed = CONTAINERS if request.query.get("all") == "1" else [c for c in CONTAINERS if c["State"] == "running"]
        return web.json_response(listed)

    async def inspect(request: web.Request) -> web.Response:
        found = INSPECTIONS.get(request.match_info["id"])
        if found is None:
            return web.json_response({"message": "No such container"}, status=404)
        return web.json_response(found)

    app = web.Application()
    app.router.add_get("/containers/json", containers)
    app.router.add_get("/containers/{id}/json", inspect)
    return app


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Serve an app on 127.0.0.1 at a random port; returns its base URL."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def vllm(serve: Callable[[web.Application], Awaitable[str]]) -> AsyncIterator[tuple[VllmStub, str]]:
    stub = VllmStub()
    url = await serve(stub.app)
    yield stub, url
    stub.release.set()


@pytest.fixture
async def docker_socket(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "docker.sock"
    runner = web.AppRunner(docker_app())
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    yield path
    await runner.cleanup()


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail, whatever is installed here.
    monkeypatch.setitem(sys.modules, "pynvml", None)


@pytest.fixture
def base_settings(tmp_path: Path, no_nvml: None) -> SidecarSettings:
    """Nothing configured, and a Docker socket that does not exist: the host's engine is never touched."""
    return SidecarSettings(docker_socket=tmp_path / "missing.sock", timeout=timedelta(seconds=5))


@pytest.fixture
async def sidecar() -> AsyncIterator[Callable[..., Awaitable[TestClient[web.Request, web.Application]]]]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(
        settings: SidecarSettings, clock: Callable[[], float] | None = None
    ) -> TestClient[web.Request, web.Application]:
        app = create_app(settings) if clock is None else create_app(settings, clock=clock)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def status(client: TestClient[web.Request, web.Application], **headers: str) -> dict[str, Any]:
    response = await client.get("/status", headers=headers)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


# --- settings -------------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    s = SidecarSettings.from_env({})
    assert (s.host, s.port, s.token) == ("0.0.0.0", 8090, None)
    assert (s.vllm_url, s.whisperx_url) == (None, None)
    assert s.docker_socket == Path("/var/run/docker.sock")
    assert s.timeout == timedelta(seconds=2)


def test_settings_from_environment() -> None:
    s = SidecarSettings.from_env(
        {
            "SIDECAR_HOST": "127.0.0.1",
            "SIDECAR_PORT": "9100",
            "SIDECAR_TOKEN": TOKEN,
            "SIDECAR_VLLM_URL": f"http://admin:{URL_PASSWORD}@gpu:8000",
            "SIDECAR_WHISPERX_URL": "http://gpu:9000",
            "SIDECAR_DOCKER_SOCKET": "/run/docker.sock",
            "SIDECAR_TIMEOUT": "750ms",
            "SIDECAR_VLLM_API_KEY": VLLM_KEY,
            "VLLM_API_KEY": "the-other-name",
            "SIDECAR_UNRELATED": "x",
        }
    )
    assert (s.host, s.port, s.token) == ("127.0.0.1", 9100, TOKEN)
    assert s.vllm_api_key == VLLM_KEY
    assert VLLM_KEY not in repr(s) and VLLM_KEY not in json.dumps(s.public()) and VLLM_KEY in s.secrets()
    assert s.public()["SIDECAR_VLLM_API_KEY"] == "***"
    assert s.vllm_url == f"http://admin:{URL_PASSWORD}@gpu:8000"
    assert s.whisperx_url == "http://gpu:9000"
    assert s.docker_socket == Path("/run/docker.sock")
    assert s.timeout == timedelta(milliseconds=750)
    assert TOKEN not in repr(s) and URL_PASSWORD not in repr(s)
    public = json.dumps(s.public())
    assert TOKEN not in public and URL_PASSWORD not in public
    assert s.public()["SIDECAR_VLLM_URL"] == "http://admin:***@gpu:8000"
    assert s.public()["SIDECAR_TIMEOUT"] == "750ms"


def test_vllm_api_key_under_the_name_vllm_reads() -> None:
    # The variable vLLM itself takes --api-key from, so a sidecar sharing its environment needs nothing more.
    assert SidecarSettings.from_env({"VLLM_API_KEY": VLLM_KEY}).vllm_api_key == VLLM_KEY
    assert SidecarSettings.from_env({}).vllm_api_key is None


def test_empty_variables_count_as_unset() -> None:
    assert SidecarSettings.from_env({"SIDECAR_TOKEN": "", "SIDECAR_PORT": ""}) == SidecarSettings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SIDECAR_PORT", "http"),
        ("SIDECAR_PORT", "70000"),
        ("SIDECAR_TIMEOUT", "2"),
        ("SIDECAR_TIMEOUT", "0s"),
        ("SIDECAR_VLLM_URL", "127.0.0.1:8000"),
        ("SIDECAR_WHISPERX_URL", "ftp://gpu/whisperx"),
        ("SIDECAR_VLLM_URL", f"http://admin:{URL_PASSWORD}@gpu:notaport"),
    ],
)
def test_bad_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name) as caught:
        SidecarSettings.from_env({name: value})
    assert URL_PASSWORD not in str(caught.value)


# --- histogram quantiles --------------------------------------------------------------------------

INF = float("inf")


def test_quantile_interpolates_within_the_bucket() -> None:
    buckets = {0.1: 10.0, 0.5: 60.0, 1.0: 90.0, 2.5: 100.0, INF: 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.42)  # 0.1 + 0.4 · 40/50
    assert quantile(0.95, buckets) == pytest.approx(1.75)  # 1.0 + 1.5 · 5/10
    assert quantile(0.05, buckets) == pytest.approx(0.05)  # the lowest bucket starts at 0


def test_quantile_edges() -> None:
    assert quantile(0.5, {}) is None
    assert quantile(0.5, {1.0: 0.0, INF: 0.0}) is None  # nothing observed
    assert quantile(0.5, {1.0: 5.0}) is None  # no +Inf bucket: not a histogram
    assert quantile(0.99, {1.0: 5.0, 2.0: 5.0, INF: 10.0}) == 2.0  # in +Inf: the highest finite bound
    assert quantile(0.5, {1.0: 10.0, 2.0: 4.0, INF: 10.0}) == pytest.approx(0.5)  # a lagging count is clamped
    with pytest.raises(ValueError):
        quantile(1.5, {1.0: 1.0, INF: 1.0})


# --- /healthz and the token -----------------------------------------------------------------------


async def test_token_guards_status_but_not_healthz(base_settings: SidecarSettings, sidecar: Any) -> None:
    client = await sidecar(replace(base_settings, token=TOKEN))
    health = await client.get("/healthz")
    assert health.status == 200 and await health.json() == {"status": "ok"}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ):
        denied = await client.get("/status", headers=headers)
        assert denied.status == 401
        assert denied.headers["WWW-Authenticate"] == "Bearer"
        text = await denied.text()
        assert json.loads(text)["error"]["code"] == "unauthorized"
        assert TOKEN not in text
    body = await status(client, Authorization=f"Bearer {TOKEN}")
    assert set(body["sources"]) == {"gpu", "containers", "vllm", "whisperx"}
    assert TOKEN not in json.dumps(body)


async def raw_get(port: int, path: str, authorization: bytes) -> tuple[int, bytes]:
    """A GET written byte for byte: HTTP clients refuse to send a header value that is not ASCII."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: %s\r\nConnection: close\r\n\r\n"
    writer.write(request % (path.encode(), authorization))
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("authorization", [b"Bearer \xff", b"Bearer " + TOKEN.encode() + b"\xff", b"\xff"])
async def test_a_token_that_is_not_ascii_is_refused(
    base_settings: SidecarSettings, sidecar: Any, authorization: bytes
) -> None:
    client = await sidecar(replace(base_settings, token=TOKEN))
    status_code, body = await raw_get(client.server.port, "/status", authorization)
    assert status_code == 401, body
    assert json.loads(body)["error"]["code"] == "unauthorized"


async def test_status_is_open_without_a_token(base_settings: SidecarSettings, sidecar: Any) -> None:
    client = await sidecar(base_settings)
    body = await status(client)
    assert datetime.fromisoformat(body["collected_at"]).tzinfo is not None
    vllm, whisperx = body["sources"]["vllm"], body["sources"]["whisperx"]
    assert vllm == {"available": False, "reason": "not configured (SIDECAR_VLLM_URL is unset)", "url": None}
    assert whisperx["available"] is False and "SIDECAR_WHISPERX_URL" in whisperx["reason"]
    assert (whisperx["reachable"], whisperx["latency_ms"]) == (False, None)


# --- vLLM -----------------------------------------------------------------------------------------


WINDOW_FIGURES = (
    "prompt_tokens_per_s",
    "generation_tokens_per_s",
    "preemptions_per_s",
    "prefix_cache_hit_rate",
    "time_to_first_token_seconds",
    "e2e_request_latency_seconds",
    "inter_token_latency_seconds",
    "request_queue_time_seconds",
)


def assert_window_latency(report: dict[str, Any], count: int) -> None:
    """The stub's per-scrape distributions; the 500 slow requests from before the first scrape are not in them."""
    expected = {
        "time_to_first_token_seconds": (0.42, 1.75),  # 0.1 + 0.4 · 40/50; 1.0 + 1.5 · 5/10
        "e2e_request_latency_seconds": (7.5, 25.0),
        "inter_token_latency_seconds": (0.019, 0.05),
        "request_queue_time_seconds": (0.1, 4.0),
    }
    for name, (p50, p95) in expected.items():
        assert report[name] == {"p50": pytest.approx(p50), "p95": pytest.approx(p95), "count": count}, name


async def test_vllm_metrics_rates_and_latency(base_settings: SidecarSettings, vllm: Any, sidecar: Any) -> None:
    stub, url = vllm
    clock = FakeClock()
    client = await sidecar(replace(base_settings, vllm_url=url), clock)

    first = (await status(client))["sources"]["vllm"]
    assert first["available"] is True and first["reason"] is None
    assert first["url"] == url
    assert first["health"] == {"ok": True, "reason": None}
    assert first["models"] == {"ok": True, "reason": None, "ids": ["qwen2.5-14b"]}
    assert (first["requests_running"], first["requests_waiting"]) == (3, 4)
    assert first["kv_cache_usage"] == pytest.approx(0.5)  # mean over the two engines
    assert first["kv_cache_metric"] == "vllm:kv_cache_usage_perc"
    # One scrape has nothing to compare with: the histograms hold everything since vLLM started.
    assert {name: first[name] for name in WINDOW_FIGURES} == dict.fromkeys(WINDOW_FIGURES)

    clock.now += 10
    second = (await status(client))["sources"]["vllm"]
    assert second["prompt_tokens_per_s"] == pytest.approx(50.0)  # 500 tokens over 10 s
    assert second["generation_tokens_per_s"] == pytest.approx(25.0)
    assert second["preemptions_per_s"] == pytest.approx(0.3)
    assert second["prefix_cache_hit_rate"] == pytest.approx(0.4)  # 400 of 1000 queries, not 9400 of 11000
    assert_window_latency(second, count=100)

    # A scrape right after the last one keeps the last figures rather than dividing by almost nothing.
    clock.now += 0.25
    third = (await status(client))["sources"]["vllm"]
    assert {name: third[name] for name in WINDOW_FIGURES} == {name: second[name] for name in WINDOW_FIGURES}

    clock.now += 4.75  # 5 s after the baseline, which is still the second scrape; two scrapes' worth since
    fourth = (await status(client))["sources"]["vllm"]
    assert fourth["prompt_tokens_per_s"] == pytest.approx(200.0)
    assert fourth["generation_tokens_per_s"] == pytest.approx(100.0)
    assert fourth["preemptions_per_s"] == pytest.approx(1.2)
    assert fourth["prefix_cache_hit_rate"] == pytest.approx(0.4)
    assert_window_latency(fourth, count=200)
    assert stub.scrapes == 4


async def test_vllm_older_metric_names(base_settings: SidecarSettings, serve: Any, sidecar: Any) -> None:
    stub = VllmStub(legacy=True)
    url = await serve(stub.app)
    clock = FakeClock()
    # An OpenAI-style base URL (…/v1), as the service's LLM_BASE_URL is written, works too.
    client = await sidecar(replace(base_settings, vllm_url=f"{url}/v1"), clock)
    await status(client)
    clock.now += 10
    vllm = (await status(client))["sources"]["vllm"]
    assert vllm["available"] is True
    assert vllm["kv_cache_usage"] == pytest.approx(0.4)
    assert vllm["kv_cache_metric"] == "vllm:gpu_cache_usage_perc"
    assert vllm["models"]["ids"] == ["qwen2.5-14b"]
    assert vllm["prefix_cache_hit_rate"] == pytest.approx(0.65)  # the gauge, as vLLM reports it
    assert_window_latency(vllm, count=100)  # inter-token latency from time_per_output_token


async def test_vllm_counter_reset_gives_no_rate(base_settings: SidecarSettings, vllm: Any, sidecar: Any) -> None:
    stub, url = vllm
    clock = FakeClock()
    client = await sidecar(replace(base_settings, vllm_url=url), clock)
    stub.scrapes = 5
    await status(client)
    stub.scrapes = 0  # vLLM restarted: counters and histograms start over
    clock.now += 10
    vllm_report = (await status(client))["sources"]["vllm"]
    assert {name: vllm_report[name] for name in WINDOW_FIGURES} == dict.fromkeys(WINDOW_FIGURES)
    clock.now += 10
    vllm_report = (await status(client))["sources"]["vllm"]
    assert vllm_report["prompt_tokens_per_s"] == pytest.approx(50.0)
    assert_window_latency(vllm_report, count=100)


async def test_vllm_api_key_is_sent_to_v1_as_bearer(base_settings: SidecarSettings, serve: Any, sidecar: Any) -> None:
    stub = VllmStub(api_key=VLLM_KEY)
    url = await serve(stub.app)
    without = (await status(await sidecar(replace(base_settings, vllm_url=url))))["sources"]["vllm"]
    assert without["models"] == {"ok": False, "reason": "HTTP 401 Unauthorized", "ids": []}

    client = await sidecar(replace(base_settings, vllm_url=url, vllm_api_key=VLLM_KEY))
    response = await client.get("/status")
    text = await response.text()
    vllm_report = json.loads(text)["sources"]["vllm"]
    assert vllm_report["models"] == {"ok": True, "reason": None, "ids": ["qwen2.5-14b"]}
    assert stub.models_authorization == ["", f"Bearer {VLLM_KEY}"]
    assert VLLM_KEY not in text


async def test_vllm_failing_metrics_degrade(base_settings: SidecarSettings, vllm: Any, sidecar: Any) -> None:
    stub, url = vllm
    client = await sidecar(replace(base_settings, vllm_url=url))
    stub.metrics_status = 500
    report = (await status(client))["sources"]["vllm"]
    assert report["available"] is False
    assert report["reason"] == "/metrics: HTTP 500 Internal Server Error"
    assert report["health"]["ok"] is True  # the other checks still report
    assert "requests_running" not in report

    stub.metrics_status = 200
    stub.metrics_body = "this is { not an exposition\n"
    report = (await status(client))["sources"]["vllm"]
    assert report["available"] is False
    assert report["reason"].startswith("/metrics is not a Prometheus text exposition")


async def test_vllm_timeout_degrades(base_settings: SidecarSettings, vllm: Any, sidecar: Any) -> None:
    stub, url = vllm
    stub.hang = True
    client = await sidecar(replace(base_settings, vllm_url=url, timeout=timedelta(milliseconds=200)))
    report = (await status(client))["sources"]["vllm"]
    assert report == {"available": False, "reason": "timed out after 200ms", "url": url}


# --- WhisperX -------------------------------------------------------------------------------------


async def test_whisperx_reachable_through_docs(base_settings: SidecarSettings, serve: Any, sidecar: Any) -> None:
    async def docs(request: web.Request) -> web.Response:
        return web.Response(text="<html>Swagger UI</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/docs", docs)  # the root answers 404, as FastAPI apps do
    url = await serve(app)
    client = await sidecar(replace(base_settings, whisperx_url=url))
    report = (await status(client))["sources"]["whisperx"]
    assert report["available"] is True and report["reason"] is None
    assert (report["reachable"], report["path"], report["url"]) == (True, "/docs", url)
    assert isinstance(report["latency_ms"], float) and report["latency_ms"] >= 0


async def test_whisperx_answering_errors_only(base_settings: SidecarSettings, serve: Any, sidecar: Any) -> None:
    url = await serve(web.Application())
    client = await sidecar(replace(base_settings, whisperx_url=url))
    report = (await status(client))["sources"]["whisperx"]
    assert report["available"] is False
    assert report["reason"] == "answered with errors only: / 404, /docs 404, /openapi.json 404"
    assert (report["reachable"], report["latency_ms"]) == (True, None)


# --- Docker ---------------------------------------------------------------------------------------


async def test_containers_from_the_engine_socket(
    base_settings: SidecarSettings, docker_socket: Path, sidecar: Any
) -> None:
    client = await sidecar(replace(base_settings, docker_socket=docker_socket))
    response = await client.get("/status")
    text = await response.text()
    report = json.loads(text)["sources"]["containers"]
    assert report["available"] is True and report["reason"] is None
    assert report["containers"] == [
        {
            "id": "cccccccccccc",
            "name": "gone",
            "image": "busybox",
            "state": "running",
            "status": "Up 1 second",
            "health": None,
            "restart_count": None,
        },
        {
            "id": "aaaaaaaaaaaa",
            "name": "vllm",
            "image": "vllm/vllm-openai:v0.8.5",
            "state": "running",
            "status": "Up 2 hours (healthy)",
            "health": "healthy",
            "restart_count": 0,
        },
        {
            "id": "bbbbbbbbbbbb",
            "name": "whisperx",
            "image": "whisperx:latest",
            "state": "exited",
            "status": "Exited (1)",
            "health": None,
            "restart_count": 3,
        },
    ]
    # Environment and labels stay on the host.
    for secret in ("hf_env_s3cret", "env-s3cret", "label-s3cret"):
        assert secret not in text


async def test_docker_socket_that_is_not_docker(base_settings: SidecarSettings, tmp_path: Path, sidecar: Any) -> None:
    path = tmp_path / "other.sock"

    async def nothing(request: web.Request) -> web.Response:
        return web.Response(text="not json")

    app = web.Application()
    app.router.add_get("/containers/json", nothing)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        client = await sidecar(replace(base_settings, docker_socket=path))
        report = (await status(client))["sources"]["containers"]
    finally:
        await runner.cleanup()
    assert report["available"] is False
    assert report["reason"] == "the reply is not JSON"


# --- GPU ------------------------------------------------------------------------------------------


async def test_nvml_absent(base_settings: SidecarSettings, sidecar: Any) -> None:
    client = await sidecar(base_settings)
    gpu = (await status(client))["sources"]["gpu"]
    assert gpu["available"] is False
    assert "nvidia-ml-py is not installed" in gpu["reason"]


def fake_nvml(calls: list[str]) -> types.ModuleType:
    """Enough of pynvml's surface for two GPUs; the second cannot report power."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def power(handle: int) -> int:
        if handle == 1:
            raise NVMLError("Not Supported")
        return 312_500

    functions: dict[str, Any] = {
        "NVMLError": NVMLError,
        "NVML_TEMPERATURE_GPU": 0,
        "nvmlInit": lambda: calls.append("init"),
        "nvmlShutdown": lambda: calls.append("shutdown"),
        "nvmlSystemGetDriverVersion": lambda: "550.54.15",
        "nvmlDeviceGetCount": lambda: 2,
        "nvmlDeviceGetHandleByIndex": lambda index: index,
        "nvmlDeviceGetName": lambda handle: b"NVIDIA H100 80GB HBM3" if handle == 0 else "NVIDIA L4",
        "nvmlDeviceGetUtilizationRates": lambda handle: types.SimpleNamespace(gpu=87 - 80 * handle, memory=40),
        "nvmlDeviceGetMemoryInfo": lambda handle: types.SimpleNamespace(
            used=40 * 2**30, total=80 * 2**30, free=40 * 2**30
        ),
        "nvmlDeviceGetTemperature": lambda handle, sensor: 61 + handle,
        "nvmlDeviceGetPowerUsage": power,
        "nvmlDeviceGetEnforcedPowerLimit": lambda handle: 700_000,
    }
    for name, value in functions.items():
        setattr(nvml, name, value)
    return nvml


async def test_gpu_readings_through_nvml(
    base_settings: SidecarSettings, monkeypatch: pytest.MonkeyPatch, sidecar: Any
) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(calls))
    client = await sidecar(base_settings)
    gpu = (await status(client))["sources"]["gpu"]
    await status(client)
    assert gpu["available"] is True and gpu["driver_version"] == "550.54.15"
    memory = {"memory_used_bytes": 40 * 2**30, "memory_total_bytes": 80 * 2**30}
    assert gpu["devices"] == [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "utilization_percent": 87, **memory, "temperature_c": 61}
        | {"power_w": 312.5, "power_limit_w": 700.0},
        {"index": 1, "name": "NVIDIA L4", "utilization_percent": 7, **memory, "temperature_c": 62}
        | {"power_w": None, "power_limit_w": 700.0},
    ]
    await client.close()
    assert calls == ["init", "shutdown"]  # initialised once, shut down with the app


# --- degraded sources and secrets -----------------------------------------------------------------


async def test_everything_absent_still_answers(base_settings: SidecarSettings, closed_port: int, sidecar: Any) -> None:
    settings = replace(
        base_settings,
        vllm_url=f"http://127.0.0.1:{closed_port}",
        whisperx_url=f"http://127.0.0.1:{closed_port}",
    )
    client = await sidecar(settings)
    sources = (await status(client))["sources"]
    assert all(source["available"] is False for source in sources.values())
    assert sources["containers"]["reason"] == f"Docker socket {settings.docker_socket} not found"
    assert sources["vllm"]["reason"].startswith("/metrics: cannot connect")
    assert sources["vllm"]["health"]["ok"] is False and sources["vllm"]["models"]["ok"] is False
    assert sources["vllm"]["models"]["ids"] == []
    assert sources["whisperx"]["reason"].startswith("cannot connect")
    assert (sources["whisperx"]["reachable"], sources["whisperx"]["latency_ms"]) == (False, None)
    assert "nvidia-ml-py" in sources["gpu"]["reason"]


async def test_no_secret_in_any_response(
    base_settings: SidecarSettings, vllm: Any, sidecar: Any, closed_port: int
) -> None:
    stub, url = vllm
    host = url.removeprefix("http://")
    stub.api_key = VLLM_KEY
    settings = replace(
        base_settings,
        token=TOKEN,
        vllm_api_key=VLLM_KEY,
        vllm_url=f"http://admin:{URL_PASSWORD}@{host}",
        whisperx_url=f"http://whisper:{URL_PASSWORD}@127.0.0.1:{closed_port}/?key={QUERY_SECRET}",
    )
    client = await sidecar(settings)
    texts = []
    for headers in ({"Authorization": f"Bearer {TOKEN}"}, {}):
        response = await client.get("/status", headers=headers)
        texts.append(await response.text())
    texts.append(await (await client.get("/healthz")).text())
    sources = json.loads(texts[0])["sources"]
    assert sources["vllm"]["available"] is True
    assert sources["vllm"]["url"] == f"http://admin:***@{host}"
    assert sources["whisperx"]["url"] == f"http://whisper:***@127.0.0.1:{closed_port}/?***"
    assert sources["vllm"]["models"]["ok"] is True
    for text in texts:
        for secret in (TOKEN, URL_PASSWORD, QUERY_SECRET, VLLM_KEY):
            assert secret not in text
    # The URL's credentials still reach vLLM's /metrics, as HTTP basic auth; /v1 gets the key instead.
    assert stub.authorization[-1].startswith("Basic ")
    assert stub.models_authorization[-1] == f"Bearer {VLLM_KEY}"
