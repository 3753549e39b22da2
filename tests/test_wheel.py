"""The built wheel carries the SQL: a non-editable install migrates without the source tree."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, done.stdout + done.stderr
    return done  # type: ignore[no-any-return]


async def test_the_wheel_ships_the_sql_and_migrates_from_it(tmp_path: Path, empty_database_url: str) -> None:
    dist = tmp_path / "dist"
    await asyncio.to_thread(_run, sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT))
    (wheel,) = dist.glob("aiservice-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    sql = {f"aiservice/schema/{p.relative_to(ROOT / 'schema')}" for p in (ROOT / "schema").rglob("*.sql")}
    assert sql <= names, sorted(sql - names)
    # The top-level worker/ folder ships as aiservice.worker (package-dir): nothing named worker in site-packages.
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "aiservice").rglob("__init__.py")}
    packages |= {f"aiservice/{p.parent.relative_to(ROOT)}" for p in (ROOT / "worker").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names, "add the missing package to pyproject.toml"
    assert "aiservice/worker/app.py" in names
    assert {name.split("/")[0] for name in names if not name.startswith("aiservice-")} == {"aiservice"}
    assert "aiservice/py.typed" in names, "the client's types reach users only with py.typed (PEP 561)"
    static = [p for p in (ROOT / "aiservice" / "console").iterdir() if p.suffix in (".html", ".css", ".js")]
    console = {f"aiservice/console/{p.name}" for p in static}
    assert console and console <= names, "add the console's files to package-data"

    site = tmp_path / "site"
    await asyncio.to_thread(
        _run, sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env |= {"PYTHONPATH": str(site), "DATABASE_URL": empty_database_url}
    where = await asyncio.to_thread(
        _run, sys.executable, "-c", "from aiservice.db import migrate; print(migrate.SCHEMA_DIR)", env=env, cwd=tmp_path
    )
    assert Path(where.stdout.strip()).is_relative_to(site)
    migrated = await asyncio.to_thread(_run, sys.executable, "-m", "aiservice.cli", "migrate", env=env, cwd=tmp_path)
    assert "0001_init.sql" in migrated.stdout and "functions/claim.sql" in migrated.stdout

    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await conn.fetchval("SELECT to_regprocedure('aiservice.maintain(interval, interval)') IS NOT NULL")
    finally:
        await conn.close()
