"""The API process's memory while its webhook sender meets a receiver answering 500 with a huge body.

    python3 scripts/webhook_memory.py --dsn postgresql://postgres@127.0.0.1:5432/postgres [--mib 1024]

Creates a database of its own (dropped at the end), starts `aiservice serve` on it, registers a
webhook to a receiver on loopback that answers every delivery with 500 and a body of --mib MiB
(produced as it is sent), finishes one job, and waits until the attempt is recorded. Prints the
API process's resident memory (VmRSS) before the delivery and its peak (VmHWM) after it, and the
bytes the receiver managed to send before the sender closed the connection. Linux only."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_delivery import free_port  # noqa: E402

CHUNK = 256 * 1024


def memory_kib(pid: int) -> dict[str, int]:
    wanted = ("VmRSS", "VmHWM")
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            found[key] = int(value.split()[0])
    return found


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


async def main(dsn: str, mib: int) -> None:
    import aiohttp
    import asyncpg
    from aiohttp import web

    from aiservice.db.migrate import migrate
    from aiservice.db.pool import create_pool
    from aiservice.db.store import JobStore
    from aiservice.jobs import JobCreate

    body_bytes = mib * 1024 * 1024
    sent = 0

    async def hook(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        await request.read()
        response = web.StreamResponse(status=500, headers={"content-length": str(body_bytes)})
        await response.prepare(request)
        chunk = b"x" * CHUNK
        with_suppressed = (ConnectionResetError, asyncio.CancelledError)
        try:
            while sent < body_bytes:
                await response.write(chunk)
                sent += CHUNK
            await response.write_eof()
        except with_suppressed:
            pass
        return response

    name = f"webhook_memory_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    db = with_database(dsn, name)
    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    proc: asyncio.subprocess.Process | None = None
    try:
        conn = await asyncpg.connect(db)
        await migrate(conn)
        await conn.close()
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        receiver = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        port = free_port()
        env = dict(os.environ, DATABASE_URL=db, HTTP_HOST="127.0.0.1", HTTP_PORT=str(port))
        env |= {"MIGRATE_ON_START": "false", "LOG_LEVEL": "WARNING", "WEBHOOK_TIMEOUT": "60s"}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "aiservice.cli", "serve", env=env, cwd=ROOT)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                try:
                    async with session.get(f"{base}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            async with session.put(f"{base}/api/v1/webhooks/memory", json={"url": receiver}) as r:
                assert r.status == 200, await r.text()
        await asyncio.sleep(1)
        before = memory_kib(proc.pid)
        pool = await create_pool(db, max_size=2)
        store = JobStore(pool)
        await store.create_job(JobCreate(owner_service="memory", owner_ref="r", task_type="t", model_profile="m"))
        (job,) = await store.claim_jobs("w", 1, lease_timeout=timedelta(minutes=5))
        started = time.monotonic()
        await store.complete_job(job.id, "w", {})
        while not await pool.fetchval("SELECT last_status FROM aiservice.webhook_deliveries"):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        took = time.monotonic() - started
        after = memory_kib(proc.pid)
        error = await pool.fetchval("SELECT last_error FROM aiservice.webhook_deliveries")
        await pool.close()
        print(f"error body {mib} MiB; attempt recorded after {took:.1f} s; last_error {len(error)} characters")
        print(f"API VmRSS before: {before['VmRSS'] / 1024:.0f} MiB; VmHWM after: {after['VmHWM'] / 1024:.0f} MiB")
        print(f"receiver sent {sent / 1024 / 1024:.1f} MiB of {mib} MiB before the sender closed the connection")
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()
        await runner.cleanup()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", required=True, help="a PostgreSQL server where a database may be created")
    parser.add_argument("--mib", type=int, default=1024, help="size of the receiver's error body (MiB)")
    args = parser.parse_args()
    asyncio.run(main(args.dsn, args.mib))
