"""No Docker engine runs in CI, so the compose file's structure is checked instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from aiservice.cli import main

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_services_and_commands() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "api", "worker"}
    assert services["api"]["command"] == ["aiservice", "serve"]
    assert services["worker"]["command"] == ["aiservice", "worker"]
    assert services["api"]["build"] == services["worker"]["build"] == "."


def test_every_service_has_a_healthcheck_and_waits_for_its_dependency() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
    assert "readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert "8081/readyz" in " ".join(services["worker"]["healthcheck"]["test"])
    assert services["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_database_url_points_at_the_compose_postgres() -> None:
    services = compose()["services"]
    pg = services["postgres"]["environment"]
    expected = f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    assert services["api"]["environment"]["DATABASE_URL"] == expected
    assert services["worker"]["environment"]["DATABASE_URL"] == expected


def test_the_commands_exist_in_the_cli(capsys: Any) -> None:
    for command in ("serve", "worker"):
        try:
            main([command, "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        assert command in capsys.readouterr().out


def test_dockerfile_installs_the_wheel_not_the_source_tree() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for part in ("COPY schema ./schema", "pip wheel", "pip install --no-cache-dir /dist/*.whl"):
        assert part in text
    assert "-e ." not in text


PROVIDER_VARIABLES = ("LLM_BASE_URL", "LLM_API_KEY", "LLM_MODEL", "WHISPERX_URL")


def test_the_api_knows_the_workers_providers() -> None:
    """GET /api/v1/providers/status runs in the API: it needs the providers the worker uses."""
    services = compose()["services"]
    for name in PROVIDER_VARIABLES:
        assert name in services["worker"]["environment"], name
        assert services["api"]["environment"].get(name) == services["worker"]["environment"][name], name


def test_host_docker_internal_resolves_on_linux_too() -> None:
    """Docker Desktop knows host.docker.internal; Docker Engine on Linux only with this mapping."""
    for name, service in compose()["services"].items():
        uses_it = any("host.docker.internal" in str(value) for value in (service.get("environment") or {}).values())
        if uses_it:
            assert "host.docker.internal:host-gateway" in service.get("extra_hosts", []), name


def test_the_ports_the_readme_names_are_published() -> None:
    services = compose()["services"]
    assert "8080:8080" in services["api"]["ports"]
    assert "8081:8081" in services["worker"]["ports"]
    assert services["worker"]["environment"]["WORKER_HTTP_PORT"] == "8081"
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## docker-compose\n") :]
    section = section[: section.index("\n## ", 1)]
    assert "8080" in section and "8081" in section
