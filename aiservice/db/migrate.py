"""Append-only migrations from schema/migrations, checked with pglast and applied under an advisory lock."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pglast
from pglast import parser

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"
MIGRATIONS_DIR = SCHEMA_DIR / "migrations"
# Any fixed 64-bit number; every migrator of this database takes the same one.
LOCK_KEY = 0x61697365727669  # "aiservi"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_FORBIDDEN = {"TransactionStmt"}  # the migrator owns the transaction of each file


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
    return types


def check(migrations: list[Migration]) -> int:
    """Parse every statement and every PL/pgSQL body without a database.

    Returns the number of PL/pgSQL bodies checked; raises MigrationError on the first problem."""
    types = defined_types(migrations)
    bodies = 0
    for migration in migrations:
        for index, text in enumerate(migration.statements(), 1):
            where = f"{migration.name}, statement {index}"
            try:
                (raw,) = pglast.parse_sql(text)
            except parser.ParseError as exc:
                raise MigrationError(f"{where}: {exc}") from exc
            kind = type(raw.stmt).__name__
            if kind in _FORBIDDEN:
                raise MigrationError(f"{where}: {kind} is not allowed in a migration")
            if kind == "CreateFunctionStmt" and _language(raw.stmt) == "plpgsql":
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
        text = re.sub(rf"\b{re.escape(name)}\b", stand_in, text)
    try:
        json.loads(parser.parse_plpgsql_json(text))
    except parser.ParseError as exc:
        raise MigrationError(f"{where}: PL/pgSQL: {exc}") from exc


async def migrate(conn: Any, migrations: list[Migration] | None = None) -> list[str]:
    """Apply the migrations not yet in the ledger; returns the names applied.

    Safe to run from several processes at once: they serialize on an advisory lock."""
    todo = load_migrations() if migrations is None else migrations
    check(todo)
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
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
        applied = []
        for migration in todo:
            if migration.name in ledger:
                if ledger[migration.name] != migration.checksum:
                    raise MigrationError(
                        f"{migration.name} changed after it was applied; migrations are append-only: add a new file"
                    )
                continue
            async with conn.transaction():
                for index, statement in enumerate(migration.statements(), 1):
                    try:
                        await conn.execute(statement)
                    except asyncpg.PostgresError as exc:
                        raise MigrationError(f"{migration.name}, statement {index}: {exc}") from exc
                await conn.execute(
                    "INSERT INTO aiservice.migrations (name, checksum) VALUES ($1, $2)",
                    migration.name,
                    migration.checksum,
                )
            applied.append(migration.name)
        unknown = set(ledger) - {m.name for m in todo}
        if unknown:
            raise MigrationError(f"the database has migrations this code does not know: {sorted(unknown)}")
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


# A canonical description of everything in schema aiservice, compared with the
# committed schema/schema.sql so that every migration shows up in review as a diff.
DESCRIBE_SCHEMA = """
SELECT section, definition FROM (
    SELECT 1 AS section, format('TYPE %s AS ENUM (%s);', t.typname,
           string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)) AS definition, t.typname AS k
    FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
    WHERE t.typnamespace = 'aiservice'::regnamespace GROUP BY t.typname
  UNION ALL
    SELECT 2, format(E'TABLE %s (\\n%s\\n) WITH (%s);', c.relname,
           string_agg(format('    %s %s%s%s', a.attname, format_type(a.atttypid, a.atttypmod),
                             CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END,
                             CASE WHEN d.adbin IS NOT NULL THEN ' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid)
                                  WHEN a.attidentity <> '' THEN ' IDENTITY' ELSE '' END),
                      E',\\n' ORDER BY a.attnum),
           coalesce(array_to_string(c.reloptions, ', '), '')), c.relname
    FROM pg_class c
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
    WHERE c.relnamespace = 'aiservice'::regnamespace AND c.relkind = 'r' AND c.relname <> 'migrations'
    GROUP BY c.relname, c.reloptions
  UNION ALL
    SELECT 3, format('CONSTRAINT %s ON %s %s;', con.conname, con.conrelid::regclass, pg_get_constraintdef(con.oid)),
           con.conname
    FROM pg_constraint con WHERE con.connamespace = 'aiservice'::regnamespace AND con.contype <> 'n'
  UNION ALL
    SELECT 4, pg_get_indexdef(i.indexrelid) || ';', ic.relname
    FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
    WHERE ic.relnamespace = 'aiservice'::regnamespace
  UNION ALL
    SELECT 5, rtrim(pg_get_functiondef(p.oid), E'\\n') || ';', p.oid::regprocedure::text
    FROM pg_proc p WHERE p.pronamespace = 'aiservice'::regnamespace
  UNION ALL
    SELECT 6, pg_get_triggerdef(t.oid) || ';', t.tgname
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
    WHERE c.relnamespace = 'aiservice'::regnamespace AND NOT t.tgisinternal
) parts
ORDER BY section, k
"""


async def describe_schema(conn: Any) -> str:
    rows = await conn.fetch(DESCRIBE_SCHEMA)
    header = "-- Generated by `aiservice schema-dump` from a fully migrated database. Do not edit.\n"
    return header + "\n\n".join(r["definition"] for r in rows) + "\n"
