"""The `aiservice` command: serve, worker, migrate, dev, schema-dump, sidecar."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from aiservice import embedded, logs
from aiservice.api.app import create_app
from aiservice.db.migrate import MigrationError, dump_schema, migrate
from aiservice.db.pool import connect
from aiservice.settings import Settings, SettingsError, format_duration
from aiservice.sidecar import SidecarSettings
from aiservice.sidecar import run as run_sidecar
from worker.app import Worker
from worker.kinds import describe

log = logging.getLogger("aiservice")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiservice", description="PostgreSQL-native job service for AI workloads")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP API (needs DATABASE_URL)")
    commands.add_parser("worker", help="run the built-in LLM and WhisperX workers (needs DATABASE_URL)")
    commands.add_parser("migrate", help="apply pending schema migrations (needs DATABASE_URL)")
    commands.add_parser(
        "dev", help="run the API and the built-in workers on an embedded PostgreSQL kept in AISERVICE_DEV_DIR"
    )
    commands.add_parser(
        "schema-dump",
        help="print pg_dump of a freshly migrated database (throwaway embedded PostgreSQL), as in schema/schema.sql",
    )
    commands.add_parser("sidecar", help="serve GPU, container, vLLM and WhisperX telemetry (SIDECAR_* variables)")
    args = parser.parse_args(argv)

    try:
        if args.command == "sidecar":
            sidecar_settings = SidecarSettings.from_env()
            logs.setup("INFO")
            run_sidecar(sidecar_settings)
            return 0
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"aiservice: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level)

    try:
        if args.command == "serve":
            settings.require_database()
            web.run_app(create_app(settings), host=settings.http_host, port=settings.http_port, print=None)
        elif args.command == "worker":
            settings.require_database()
            return asyncio.run(_work(settings))
        elif args.command == "migrate":
            applied = asyncio.run(_migrate(settings.require_database()))
            print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
        elif args.command == "schema-dump":
            print(_dump(), end="")
        elif args.command == "dev":
            return _dev(settings)
    except SettingsError as exc:
        print(f"aiservice: configuration error: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:
        print(f"aiservice: migration failed: {exc}", file=sys.stderr)
        return 1
    return 0


async def _migrate(dsn: str) -> list[str]:
    conn = await connect(dsn)
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


async def _work(settings: Settings) -> int:
    worker = Worker(settings)
    stop = asyncio.Event()
    _on_signals(stop, worker.hurry)
    await worker.start()
    await stop.wait()
    log.info("stopping: no new claims; jobs in flight get %s", format_duration(settings.worker_shutdown_grace))
    await worker.stop()
    return 0


def _dev(settings: Settings) -> int:
    server = None
    if not settings.database_url:
        pgdata = (settings.dev_data_dir / "pgdata").resolve()
        print(f"starting embedded PostgreSQL in {pgdata} ...", flush=True)
        server = embedded.start(pgdata)
        settings = replace(settings, database_url=embedded.database_url(server, "aiservice"), migrate_on_start=True)
    try:
        asyncio.run(_serve_dev(settings))
    finally:
        if server is not None:
            print("stopping embedded PostgreSQL (data is kept for the next start)", flush=True)
            server.cleanup()
    return 0


async def _serve_dev(settings: Settings) -> None:
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::") else settings.http_host
    url = f"http://{host}:{settings.http_port}"
    auth = ' -H "Authorization: Bearer $AI_SERVICE_TOKEN"' if settings.service_token else ""
    print(
        f"aiservice is serving on {url}  (Ctrl-C stops it)\n"
        f"  curl -s{auth} -H 'Content-Type: application/json' {url}/api/v1/jobs \\\n"
        '    -d \'{"owner_service":"demo","owner_ref":"call/1","task_type":"llm_chat",'
        f'"model_profile":"{settings.llm_model}","input":{{"user":"Hello"}}}}\'\n'
        f"  curl -s{auth} {url}/api/v1/jobs",
        flush=True,
    )
    stop = asyncio.Event()
    worker: Worker | None = None
    _on_signals(stop, lambda: worker.hurry() if worker is not None else None)
    try:
        if settings.llm_base_url or settings.whisperx_url:
            # The API has migrated already; the workers share its database and event loop.
            started = Worker(replace(settings, migrate_on_start=False))
            await started.start()
            worker = started
            served = describe(worker.kinds)
            print(f"built-in workers: {served}; status on port {worker.http_port} (/worker/status)", flush=True)
        else:
            print("built-in workers off: set LLM_BASE_URL and/or WHISPERX_URL to run them", flush=True)
        await stop.wait()
    finally:
        if worker is not None:
            await worker.stop()
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
