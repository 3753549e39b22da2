"""Migrations: pglast checks without a database, ledger, idempotence, concurrency, schema dump."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from aiservice.db.migrate import (
    SCHEMA_DIR,
    Migration,
    MigrationError,
    check,
    describe_schema,
    load_migrations,
    migrate,
)
from aiservice.db.pool import connect


def test_every_statement_and_plpgsql_body_parses() -> None:
    migrations = load_migrations()
    bodies = check(migrations)
    sql = "\n".join(m.sql for m in migrations)
    assert bodies == sql.count("LANGUAGE plpgsql")
    assert bodies >= 15


def test_check_rejects_broken_plpgsql() -> None:
    broken = Migration(
        "0001_broken.sql",
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN IF true THEN RETURN 1; END; $$;",
    )
    with pytest.raises(MigrationError, match="PL/pgSQL"):
        check([broken])


def test_check_rejects_syntax_errors_and_transaction_control() -> None:
    with pytest.raises(MigrationError, match=r"0001_bad\.sql"):
        check([Migration("0001_bad.sql", "CREATE TABLE x (id int;")])
    with pytest.raises(MigrationError, match="TransactionStmt"):
        check([Migration("0001_tx.sql", "BEGIN; CREATE TABLE x (id int); COMMIT;")])


def test_migration_files_are_numbered_without_gaps(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="without gaps"):
        load_migrations(tmp_path)


async def test_migrating_twice_is_a_no_op(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    try:
        first = await migrate(conn)
        assert first == [m.name for m in load_migrations()]
        before = await describe_schema(conn)
        assert await migrate(conn) == []
        assert await describe_schema(conn) == before
        ledger = await conn.fetch("SELECT name FROM aiservice.migrations ORDER BY name")
        assert [r["name"] for r in ledger] == first
    finally:
        await conn.close()


async def test_concurrent_migrators_do_not_collide(empty_database_url: str) -> None:
    conns = [await connect(empty_database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = [name for names in results for name in names]
        assert sorted(applied) == [m.name for m in load_migrations()]
        count = await conns[0].fetchval("SELECT count(*) FROM aiservice.migrations")
        assert count == len(load_migrations())
    finally:
        for c in conns:
            await c.close()


async def test_a_changed_migration_is_refused(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    try:
        await migrate(conn)
        changed = [Migration(m.name, m.sql + "\n-- edited\n") for m in load_migrations()]
        with pytest.raises(MigrationError, match="append-only"):
            await migrate(conn, changed)
    finally:
        await conn.close()


async def test_a_failing_migration_rolls_back_whole(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    try:
        await migrate(conn)
        extra = [*load_migrations(), Migration("0002_bad.sql", "CREATE TABLE aiservice.t (id int);\nSELECT 1/0;")]
        with pytest.raises(MigrationError, match=r"0002_bad.sql, statement 2"):
            await migrate(conn, extra)
        assert await conn.fetchval("SELECT to_regclass('aiservice.t')") is None
        assert await conn.fetchval("SELECT count(*) FROM aiservice.migrations WHERE name = '0002_bad.sql'") == 0
    finally:
        await conn.close()


async def test_fresh_migrate_equals_committed_schema_dump(conn: asyncpg.Connection[Any]) -> None:
    committed = (SCHEMA_DIR / "schema.sql").read_text(encoding="utf-8")
    assert await describe_schema(conn) == committed, "run scripts/dump_schema.py and commit schema/schema.sql"
