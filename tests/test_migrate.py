"""Migrations: pglast checks without a database, ledger, idempotence, concurrency, schema dump."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import pytest

from aiservice.db.migrate import (
    SCHEMA_DIR,
    Migration,
    MigrationError,
    check,
    dump_schema,
    load_functions,
    load_migrations,
    migrate,
    pg_dump_path,
)
from aiservice.db.pool import connect


def test_every_statement_and_plpgsql_body_parses() -> None:
    migrations, functions = load_migrations(), load_functions()
    bodies = check(migrations, functions)
    sql = "\n".join(m.sql for m in [*migrations, *functions])
    assert bodies == sql.count("LANGUAGE plpgsql")
    assert bodies >= 15


def test_function_files_hold_only_what_can_be_re_applied() -> None:
    for text in (
        "CREATE FUNCTION aiservice.f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;",
        "CREATE TABLE aiservice.t (id int);",
    ):
        with pytest.raises(MigrationError, match="CREATE OR REPLACE"):
            check([], [Migration("functions/x.sql", text)])


def test_every_function_has_one_home() -> None:
    """Each function and trigger is defined in exactly one function file."""
    names: list[str] = []
    for definition in load_functions():
        names += re.findall(r"CREATE OR REPLACE (?:FUNCTION|TRIGGER) (\S+?)[(\s]", definition.sql)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert "aiservice.claim_jobs" in names


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


def _names() -> list[str]:
    return [m.name for m in [*load_migrations(), *load_functions()]]


async def test_migrating_twice_is_a_no_op(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    try:
        first = await migrate(conn)
        assert first == _names()
        before = dump_schema(empty_database_url)
        assert await migrate(conn) == []
        assert dump_schema(empty_database_url) == before
        ledger = await conn.fetch("SELECT name FROM aiservice.migrations ORDER BY name")
        assert [r["name"] for r in ledger] == sorted(first)
    finally:
        await conn.close()


async def test_concurrent_migrators_do_not_collide(empty_database_url: str) -> None:
    conns = [await connect(empty_database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = [name for names in results for name in names]
        assert sorted(applied) == sorted(_names())
        count = await conns[0].fetchval("SELECT count(*) FROM aiservice.migrations")
        assert count == len(_names())
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


async def test_a_changed_function_file_is_re_applied(empty_database_url: str) -> None:
    conn = await connect(empty_database_url)
    try:
        await migrate(conn)
        functions = load_functions()
        (claim,) = [f for f in functions if f.name == "functions/claim.sql"]
        edited = Migration(
            claim.name, claim.sql.replace("    IF p_worker_id IS NULL", "    -- edited\n    IF p_worker_id IS NULL")
        )
        assert await migrate(conn, functions=[edited if f is claim else f for f in functions]) == [claim.name]
        source = await conn.fetchval("SELECT prosrc FROM pg_proc WHERE proname = 'claim_jobs'")
        assert "-- edited" in source
        assert await migrate(conn) == [claim.name]  # and back
    finally:
        await conn.close()


async def test_a_database_migrated_before_function_files_upgrades(empty_database_url: str, database_url: str) -> None:
    """A database migrated by the code that kept functions in migrations (ledger of 0001-0006 only)."""
    conn = await connect(empty_database_url)
    try:
        old = [m for m in load_migrations() if m.name <= "0006"]
        assert await migrate(conn, old, functions=[]) == [m.name for m in old]
        applied = await migrate(conn)
        assert applied == [m.name for m in load_migrations() if m.name > "0006"] + [f.name for f in load_functions()]
    finally:
        await conn.close()
    assert dump_schema(empty_database_url) == dump_schema(database_url)


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


REGENERATE = "regenerate it: .venv/bin/aiservice schema-dump > schema/schema.sql"


def _comparable(dump: str) -> str:
    # SET lines differ between server versions; the objects must not. PostgreSQL 18 names NOT NULL
    # constraints, and its dump spells out the names a partition inherits; earlier servers have none.
    return "\n".join(
        re.sub(r"CONSTRAINT \w+_not_null NOT NULL", "NOT NULL", line)
        for line in dump.splitlines()
        if not line.startswith(("SET ", "SELECT pg_catalog.set_config"))
    )


async def test_fresh_migrate_equals_committed_schema_dump(database_url: str) -> None:
    committed = (SCHEMA_DIR / "schema.sql").read_text(encoding="utf-8")
    assert _comparable(dump_schema(database_url)) == _comparable(committed), REGENERATE


async def test_committed_schema_dump_loads_with_psql(empty_database_url: str, database_url: str) -> None:
    psql = Path(pg_dump_path()).with_name("psql")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    done = await asyncio.to_thread(
        subprocess.run,
        [str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(SCHEMA_DIR / "schema.sql"), empty_database_url],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert dump_schema(empty_database_url) == dump_schema(database_url)
