"""The `aiservice` command as a new user meets it: --help and --version, where `dev` and `serve`
listen, what `dev` prints about its database, and a busy port."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import shlex
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import processes
import pytest
from conftest import SERVICE_VARIABLES
from processes import Spawn, free_port, listening_addresses, require_proc_net, run

from aiservice.cli import DEV_DEFAULTS, main
from aiservice.settings import Settings, mask_url
from aiservice.sidecar import SidecarSettings

spawn = processes.spawn

# An LLM endpoint nobody answers: enough for the built-in workers to start (they call it only for a job).
NOWHERE = "http://127.0.0.1:9/v1"


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "--version").strip() == f"aiservice {importlib.metadata.version('aiservice')}"


# Per command: words its help must say, variables it must list, variables it must not list.
HELP = {
    "serve": (
        ["HTTP API", "DATABASE_URL"],
        ["DATABASE_URL", "HTTP_HOST", "HTTP_PORT", "AI_SERVICE_TOKEN", "MIGRATE_ON_START", "WORKER_LEASE_TIMEOUT"],
        ["WORKER_HTTP_PORT", "WORKER_CLAIM_LIMIT", "AISERVICE_DEV_DIR"],
    ),
    "worker": (
        ["LLM_BASE_URL", "WHISPERX_URL", "migrations", "(MIGRATE_ON_START)", "MIGRATE_ON_START=false"],
        [
            "DATABASE_URL",
            "LLM_BASE_URL",
            "LLM_API_KEY",
            "LLM_MODEL",
            "WORKER_HTTP_PORT",
            "WORKER_CLAIM_LIMIT",
            "MIGRATE_ON_START",
        ],
        ["HTTP_PORT", "AI_SERVICE_TOKEN", "AISERVICE_DEV_DIR"],
    ),
    "migrate": (["migrations"], ["DATABASE_URL", "DATABASE_CONNECT_WAIT"], ["HTTP_PORT", "WORKER_HTTP_PORT"]),
    "dev": (["embedded PostgreSQL", "psql", "127.0.0.1"], SERVICE_VARIABLES, []),
    "schema-dump": (["schema/schema.sql"], [], ["DATABASE_URL", "HTTP_PORT"]),
    "sidecar": (["GPU", "vLLM"], [*SidecarSettings().public(), "VLLM_API_KEY"], ["DATABASE_URL", "HTTP_PORT"]),
}


def listed_variables(text: str) -> dict[str, str]:
    """The help's environment lines, by variable: ``  NAME   default``."""
    return {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()[0].isupper()}


@pytest.mark.parametrize("command", HELP)
def test_help_says_what_a_command_does_and_what_it_reads(capsys: pytest.CaptureFixture[str], command: str) -> None:
    text = run_main(capsys, command, "--help")
    words, listed, unlisted = HELP[command]
    for word in words:
        assert word in text, f"{command} --help does not mention {word}:\n{text}"
    variables = set(listed_variables(text))
    assert set(listed) <= variables, f"{command} --help misses {set(listed) - variables}:\n{text}"
    assert not set(unlisted) & variables, f"{command} --help lists {set(unlisted) & variables}:\n{text}"


def test_help_gives_each_command_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert "127.0.0.1" in listed_variables(run_main(capsys, "dev", "--help"))["HTTP_HOST"]
    assert "0.0.0.0" in listed_variables(run_main(capsys, "serve", "--help"))["HTTP_HOST"]


def test_dev_defaults_give_way_to_a_variable_that_is_set() -> None:
    assert Settings.from_env({}, defaults=DEV_DEFAULTS).http_host == "127.0.0.1"
    # Set explicitly to the class default, it still wins over dev's default.
    assert Settings.from_env({"HTTP_HOST": "0.0.0.0"}, defaults=DEV_DEFAULTS).http_host == "0.0.0.0"
    assert Settings.from_env({"HTTP_HOST": ""}, defaults=DEV_DEFAULTS).http_host == "127.0.0.1"
    assert Settings.from_env({}).http_host == "0.0.0.0"


@pytest.mark.parametrize(
    ("command", "env", "where"),
    [
        pytest.param("dev", {}, "127.0.0.1", id="dev-default"),
        pytest.param("dev", {"HTTP_HOST": "0.0.0.0"}, "0.0.0.0", id="dev-explicit"),
        pytest.param("serve", {}, "0.0.0.0", id="serve-default"),
    ],
)
async def test_where_the_api_listens(
    database_url: str, spawn: Spawn, command: str, env: dict[str, str], where: str
) -> None:
    require_proc_net()
    port = free_port()
    api = spawn(command, DATABASE_URL=database_url, HTTP_PORT=str(port), **env)
    await api.wait_until(lambda: bool(listening_addresses(port)), f"listening on {port}")
    assert listening_addresses(port) == {where}


async def test_dev_workers_listen_on_loopback_too(database_url: str, spawn: Spawn) -> None:
    require_proc_net()
    worker_port = free_port()
    dev = spawn(
        "dev", DATABASE_URL=database_url, HTTP_PORT="0", LLM_BASE_URL=NOWHERE, WORKER_HTTP_PORT=str(worker_port)
    )
    await dev.wait_for_output("built-in workers:")
    assert listening_addresses(worker_port) == {"127.0.0.1"}
    assert await dev.interrupt() == 0, dev.output()


def with_password(dsn: str, password: str) -> str:
    """The test server trusts local connections, so any password works; dev must not print it."""
    parts = urlsplit(dsn)
    if parts.password:
        return dsn
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.netloc.rsplit('@', 1)[-1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def test_dev_prints_database_url_masked_and_a_psql_line(database_url: str, spawn: Spawn) -> None:
    dsn = with_password(database_url, "s3cret-pw")
    dev = spawn("dev", DATABASE_URL=dsn, HTTP_PORT="0")
    await dev.wait_for_output("serving on")
    out = dev.output()
    assert f"database: {mask_url(dsn)}" in out, out
    password = urlsplit(dsn).password
    assert password and password not in out

    psql = (await dev.wait_for_output(r"^\s*psql: +(.+)$", within=0)).group(1)
    assert psql.endswith('"$DATABASE_URL"'), psql
    # Run as printed, in a shell where DATABASE_URL is set (and no PG* variable helps it).
    query = f"{psql} -X -At -c 'SELECT count(*) FROM aiservice.migrations'"
    code, out, err = await run(["bash", "-c", query], env={"DATABASE_URL": dsn, "PATH": "/usr/bin:/bin"})
    assert code == 0 and int(out) > 0, (shlex.split(psql), out, err)
    assert await dev.interrupt() == 0, out


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("command", "variable", "env"),
    [
        pytest.param("serve", "HTTP_PORT", {}, id="serve"),
        pytest.param("dev", "HTTP_PORT", {}, id="dev-api"),
        pytest.param("dev", "WORKER_HTTP_PORT", {"HTTP_PORT": "0", "LLM_BASE_URL": NOWHERE}, id="dev-workers"),
        pytest.param("worker", "WORKER_HTTP_PORT", {"LLM_BASE_URL": NOWHERE}, id="worker"),
    ],
)
async def test_a_busy_port_names_the_variable_to_change(
    database_url: str, spawn: Spawn, busy_port: int, command: str, variable: str, env: dict[str, str]
) -> None:
    hosts = {"HTTP_HOST": "127.0.0.1", "WORKER_HTTP_HOST": "127.0.0.1"}
    started = spawn(command, DATABASE_URL=database_url, **hosts, **env, **{variable: str(busy_port)})

    assert await started.exit_code() == 2, started.output()
    out = started.output()
    assert re.search(rf"(?<![A-Z_]){variable}\b", out) and str(busy_port) in out and "in use" in out, out
    assert "Traceback" not in out and "exception" not in out.lower(), out
    # Found before anything else started: no database connection, no embedded PostgreSQL.
    assert "starting embedded PostgreSQL" not in out and "database:" not in out, out


async def test_a_busy_port_stops_dev_before_it_starts_its_postgresql(spawn: Spawn, busy_port: int) -> None:
    dev = spawn("dev", HTTP_HOST="127.0.0.1", HTTP_PORT=str(busy_port))
    assert await dev.exit_code() == 2, dev.output()
    out = dev.output()
    assert "HTTP_PORT" in out and "embedded PostgreSQL" not in out, out


async def test_serve_says_where_it_listens(database_url: str, spawn: Spawn) -> None:
    api = spawn("serve", DATABASE_URL=database_url, HTTP_HOST="127.0.0.1", HTTP_PORT="0")
    port = int((await api.wait_for_output(r"^listening on http://127\.0\.0\.1:(\d+)$")).group(1))
    await api.wait_until_ready(f"http://127.0.0.1:{port}/readyz")


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released: connections to it are refused)."""
    return free_port()


ALL_DATABASE_COMMANDS = ["migrate", "serve", "worker", "dev"]
ANYWHERE = {"HTTP_HOST": "127.0.0.1", "HTTP_PORT": "0", "WORKER_HTTP_HOST": "127.0.0.1", "WORKER_HTTP_PORT": "0"}


@pytest.mark.parametrize("command", ALL_DATABASE_COMMANDS)
async def test_an_unreachable_database_is_waited_for_then_one_line_and_exit_3(spawn: Spawn, command: str) -> None:
    port = closed_port()
    dsn = f"postgresql://aiservice:s3cret-pw@127.0.0.1:{port}/aiservice"
    started = spawn(command, DATABASE_URL=dsn, DATABASE_CONNECT_WAIT="1s", LLM_BASE_URL=NOWHERE, **ANYWHERE)

    assert await started.exit_code() == 3, started.output()
    out = started.output()
    assert "Traceback" not in out and "s3cret-pw" not in out, out
    waits = [line for line in out.splitlines() if "waiting for PostgreSQL" in line]
    assert waits and all(f"127.0.0.1:{port}" in w and "DATABASE_CONNECT_WAIT" in w for w in waits), out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"aiservice: cannot connect to PostgreSQL at 127.0.0.1:{port}"), out
    assert f"DATABASE_URL=postgresql://aiservice:***@127.0.0.1:{port}/aiservice" in last, last
    assert "connection refused" in last and "gave up after 1s" in last, last
    assert len(out.splitlines()) < 12, out


@pytest.mark.parametrize("command", ALL_DATABASE_COMMANDS)
@pytest.mark.parametrize(
    ("user", "database", "refusal"),
    [
        pytest.param(None, "aiservice_no_such_db", 'database "aiservice_no_such_db" does not exist', id="database"),
        pytest.param("aiservice_no_such_role", None, 'role "aiservice_no_such_role" does not exist', id="role"),
    ],
)
async def test_a_refused_connection_is_not_retried(
    pg_server: str, spawn: Spawn, command: str, user: str | None, database: str | None, refusal: str
) -> None:
    parts = urlsplit(pg_server)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{user or parts.username or 'postgres'}:pw@{host}"
    dsn = urlunsplit((parts.scheme, netloc, f"/{database or 'postgres'}", parts.query, ""))
    started = spawn(command, DATABASE_URL=dsn, DATABASE_CONNECT_WAIT="30s", LLM_BASE_URL=NOWHERE, **ANYWHERE)

    assert await started.exit_code(within=20) == 3, started.output()
    out = started.output()
    assert "Traceback" not in out and "waiting for PostgreSQL" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("aiservice: PostgreSQL at ") and "(DATABASE_URL=" in last and ":***@" in last, last
    assert refusal in last and "not retried" in last, last


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs; an exited one not yet reaped (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"


def postmaster(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])


@pytest.fixture
def dev_postgres(tmp_path: Path) -> Iterator[Path]:
    """The data directory of `aiservice dev` under `spawn`; a server a failed test left running is stopped."""
    pgdata = (tmp_path / "dev" / "pgdata").resolve()
    yield pgdata
    if (pgdata / "postmaster.pid").exists() and alive(pid := postmaster(pgdata)):
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown


async def stopped(pid: int) -> bool:
    for _ in range(200):
        if not alive(pid):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_second_dev_on_the_same_data_directory_says_it_shares_the_running_postgresql(
    spawn: Spawn, dev_postgres: Path
) -> None:
    first = spawn("dev", HTTP_PORT="0")
    await first.wait_for_output("serving on", within=120)
    pid = postmaster(dev_postgres)

    second = spawn("dev", HTTP_PORT="0")
    await second.wait_for_output("serving on")
    out = second.output()
    assert "starting embedded PostgreSQL" not in out, out
    assert f"already running in {dev_postgres} (pid {pid})" in out and str(first.proc.pid) in out, out

    assert await second.interrupt() == 0, second.output()
    out = second.output()
    assert f"leaving embedded PostgreSQL running: the aiservice dev with pid {first.proc.pid}" in out, out
    assert "stopping embedded PostgreSQL" not in out and alive(pid), out

    assert await first.interrupt() == 0, first.output()
    assert "stopping embedded PostgreSQL" in first.output()
    assert await stopped(pid), "the last dev did not stop PostgreSQL"


async def test_dev_takes_over_the_postgresql_a_killed_dev_left_running(spawn: Spawn, dev_postgres: Path) -> None:
    killed = spawn("dev", HTTP_PORT="0")
    await killed.wait_for_output("serving on", within=120)
    pid = postmaster(dev_postgres)
    killed.proc.kill()
    killed.proc.wait()
    assert alive(pid)  # orphaned

    later = spawn("dev", HTTP_PORT="0")
    await later.wait_for_output("serving on")
    out = later.output()
    assert "starting embedded PostgreSQL" not in out, out
    assert f"found an embedded PostgreSQL (pid {pid})" in out and f"gone (pid {killed.proc.pid})" in out, out
    assert "stopping it when this dev stops" in out, out

    assert await later.interrupt() == 0, later.output()
    assert "stopping embedded PostgreSQL" in later.output()
    assert await stopped(pid), "the orphaned PostgreSQL is still running"
