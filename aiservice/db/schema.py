"""Is the database's schema the one this code needs? The migration ledger against the code's migrations.

serve and worker read the ledger once at start (one query) and again only when something suggests
it changed: while it is wrong (every few seconds, until `aiservice migrate` has run), or when a call
fails because a table, function, type or schema is missing. Requests never query it: JobStore
refuses them from the last reading (errors.SchemaNotMigrated / errors.SchemaTooNew, HTTP 503).

A database migrated by newer code is refused at start too. A running process is not turned away
when a newer release migrates under it (append-only migrations keep old code working; a rolling
deploy would otherwise take every old replica out of service before a new one is up), unless a
call of its own then fails on a missing object."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg

from aiservice import errors
from aiservice.db.migrate import Migration, load_functions, load_migrations
from aiservice.db.store import translate_errors

log = logging.getLogger("aiservice.schema")

# SQLSTATEs of a call that found part of the schema missing: undefined_table, undefined_function,
# invalid_schema_name, undefined_object (a type), undefined_column.
MISSING_OBJECT = frozenset({"42P01", "42883", "3F000", "42704", "42703"})


def _number(name: str) -> int:
    return int(name[:4]) if name[:4].isdigit() else 0


@dataclass(frozen=True)
class SchemaState:
    expected: int  # the last migration this code has
    found: int  # the last migration in the database's ledger (0: none, or no ledger)
    pending: tuple[str, ...] = ()  # this code's migrations (and function files) the ledger lacks
    unknown: tuple[str, ...] = ()  # migrations in the ledger this code does not have

    @property
    def status(self) -> str:
        if self.unknown:
            return errors.SchemaTooNew.code
        if self.pending:
            return errors.SchemaNotMigrated.code
        return "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def message(self) -> str:
        if self.unknown:
            return (
                f"the database is at migration {self.found}, this code knows up to {self.expected} "
                f"(unknown: {', '.join(self.unknown)}): upgrade aiservice"
            )
        if self.pending:
            where = "has no aiservice schema" if self.found == 0 else f"is at migration {self.found}"
            return (
                f"the database {where}, this code needs migration {self.expected}: run `aiservice migrate` "
                "(or start with MIGRATE_ON_START=true)"
            )
        return f"the database is at migration {self.found}"

    def error(self) -> errors.SchemaMismatch:
        kind = errors.SchemaTooNew if self.unknown else errors.SchemaNotMigrated
        return kind(self.message, details={"expected_migration": self.expected, "found_migration": self.found})


def compare(ledger: list[str], migrations: list[Migration], functions: list[Migration]) -> SchemaState:
    """The state of a database whose ledger holds ``ledger`` (names), for code with these files.
    A function file whose checksum differs is not counted: the migrator re-applies it, and the
    functions are meant to stay compatible between releases."""
    applied = set(ledger)
    known = {m.name for m in migrations}
    in_ledger = [n for n in ledger if not n.startswith("functions/")]
    pending = [m.name for m in migrations if m.name not in applied]
    pending += [f.name for f in functions if f.name not in applied]
    return SchemaState(
        expected=max((_number(m.name) for m in migrations), default=0),
        found=max((_number(n) for n in in_ledger), default=0),
        pending=tuple(pending),
        unknown=tuple(sorted(n for n in in_ledger if n not in known)),
    )


async def read_ledger(db: Any) -> list[str]:
    """The names in aiservice.migrations; none when the ledger (or the schema) does not exist.
    ``db`` is a connection or a pool."""
    try:
        rows = await db.fetch("SELECT name FROM aiservice.migrations")
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        return []
    return [str(r["name"]) for r in rows]


class SchemaGate:
    """The last reading of the ledger, for JobStore and the readiness probes.

    ``recheck``: seconds between readings while the schema is wrong (and at least between two
    readings prompted by failing calls); ``remind``: seconds between two log lines saying it is
    still wrong."""

    def __init__(
        self,
        db: Any,
        *,
        recheck: float = 2.0,
        remind: float = 60.0,
        migrations: list[Migration] | None = None,
        functions: list[Migration] | None = None,
    ) -> None:
        self.db = db
        self.recheck = recheck
        self.remind = remind
        self.migrations = load_migrations() if migrations is None else migrations
        self.functions = load_functions() if functions is None else functions
        self.state: SchemaState | None = None  # None until read (or when PostgreSQL did not answer)
        self.readings = 0
        self._read_at = float("-inf")
        self._prompted_at = float("-inf")
        self._logged_at = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def ok(self) -> bool:
        """Not known to be wrong (unread counts as fine: the call itself will tell)."""
        return self.state is None or self.state.ok

    def require(self) -> None:
        """Raise the schema's error when the last reading found it wrong; never queries."""
        if self.state is not None and not self.state.ok:
            raise self.state.error()

    async def check(self) -> SchemaState:
        """Read the ledger now (one query) and log what changed."""
        async with translate_errors():
            ledger = await read_ledger(self.db)
        state = compare(ledger, self.migrations, self.functions)
        self.readings += 1
        self._read_at = asyncio.get_running_loop().time()
        self._note(state)
        return state

    def _note(self, state: SchemaState) -> None:
        before, self.state = self.state, state
        now = asyncio.get_running_loop().time()
        if not state.ok:
            if before is None or before.ok or before.status != state.status or now - self._logged_at >= self.remind:
                self._logged_at = now
                log.warning("%s; waiting for it (checking every %gs)", state.message, self.recheck)
        elif before is not None and not before.ok:
            log.info("the database is at migration %d now: starting", state.found)

    async def _check_soon(self, *, prompted: bool = False) -> None:
        """Read the ledger unless another caller did less than ``recheck`` seconds ago (for a failed
        call, ``prompted``: unless another failed call did)."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            last = self._prompted_at if prompted else self._read_at
            if loop.time() - last >= self.recheck:
                if prompted:
                    self._prompted_at = loop.time()
                # Unreachable: the next reading will tell; callers see PostgreSQL's state themselves.
                with contextlib.suppress(errors.DatabaseUnavailable):
                    await self.check()

    async def wait_ready(self) -> None:
        """Return once the schema is right, reading the ledger every ``recheck`` seconds until then
        (one reading per interval however many tasks wait)."""
        while not self.ok:
            await self._check_soon()
            if self.ok:
                return
            await asyncio.sleep(self.recheck)

    async def missing_object(self, exc: asyncpg.PostgresError) -> None:
        """A call failed on a missing table, function, type or schema: read the ledger again and
        raise the schema's error if that is why; otherwise return (the caller re-raises)."""
        if exc.sqlstate not in MISSING_OBJECT:
            return
        await self._check_soon(prompted=True)
        if self.state is not None and not self.state.ok:
            raise self.state.error() from exc
