"""A flood of result waits against one `aiservice serve`: the API's memory and a plain GET meanwhile.

    .venv/bin/python scripts/bench_waits.py --dsn postgresql://postgres@127.0.0.1/postgres
    .venv/bin/python scripts/bench_waits.py --dsn ... --waits 2000 --ids 1000 --timeout 25

On a fresh database (created from --dsn, dropped after) it creates --ids pending jobs, starts
`aiservice serve` in a child process on 127.0.0.1 (LOG_LEVEL=WARNING, other settings from the
environment), then opens --waits concurrent POST /jobs/wait of all those ids (mode all, --timeout
seconds; nothing finishes them, so every admitted wait runs to its timeout). Meanwhile it samples
every half second: the API process's resident memory (VmRSS) and open file descriptors, and the
latency of one plain GET /jobs/{id} (30 s client timeout) on a connection of its own, one after
another. It prints one JSON object: memory
before, at its peak and after the flood, the GET latencies (median, max, how many took over a
second, how many failed), the answers to the waits by status and the slowest answer.

Bounded: everything stays on loopback and the run ends within --timeout + 90 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import aiohttp  # noqa: E402
from bench_delivery import aiservice_serve  # noqa: E402

from aiservice.db.migrate import migrate  # noqa: E402
from aiservice.db.pool import connect, create_pool  # noqa: E402
from aiservice.db.store import JobStore  # noqa: E402
from aiservice.jobs import JobCreate  # noqa: E402

API = "/api/v1"


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open file descriptors) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def server_pid(port: int) -> int:
    """The child listening on the port (found through /proc/net/tcp's inode)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1].endswith(f":{port:04X}") and parts[3] == "0A":
            inodes.add(parts[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    raise RuntimeError("no process listens on the API port")


async def flood(dsn: str, waits: int, ids_count: int, wait_seconds: float) -> dict[str, Any]:
    pool = await create_pool(dsn, max_size=4, application_name="bench-client")
    store = JobStore(pool)
    spec = {"owner_service": "bench", "task_type": "llm_chat", "model_profile": "m", "input": {"user": "x" * 200}}
    created = await store.create_jobs(
        [JobCreate.model_validate(spec | {"owner_ref": f"w/{n}"}) for n in range(ids_count)]
    )
    ids = [job.id for job, _ in created]
    await pool.close()

    async with aiservice_serve(dsn) as base:
        pid = server_pid(int(base.rsplit(":", 1)[1]))
        await asyncio.sleep(1)
        rss_before, fds_before = proc_status(pid)
        samples: list[tuple[int, int]] = []
        gets: list[float] = []
        get_failures = 0
        answers: dict[str, int] = {}
        slowest = 0.0
        done = asyncio.Event()
        slow: list[tuple[float, float]] = []  # (seconds into the flood, latency) of GETs over a second
        flood_started = time.monotonic()

        async def one_wait(session: aiohttp.ClientSession) -> None:
            nonlocal slowest
            started = time.monotonic()
            try:
                body = {"ids": ids, "mode": "all", "timeout": wait_seconds}
                async with session.post(f"{base}{API}/jobs/wait", json=body) as response:
                    await response.read()
                    key = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = type(exc).__name__
            answers[key] = answers.get(key, 0) + 1
            slowest = max(slowest, time.monotonic() - started)

        async def sample() -> None:
            while not done.is_set():
                samples.append(proc_status(pid))
                await asyncio.sleep(0.5)

        async def plain_gets() -> None:
            nonlocal get_failures
            http_timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=http_timeout) as plain:
                while not done.is_set():
                    started = time.monotonic()
                    try:
                        async with plain.get(f"{base}{API}/jobs/{ids[0]}") as response:
                            await response.read()
                            ok = response.status == 200
                    except (aiohttp.ClientError, TimeoutError):
                        ok = False
                    if ok:
                        gets.append(time.monotonic() - started)
                        if gets[-1] > 1:
                            slow.append((round(started - flood_started, 1), round(gets[-1], 2)))
                    else:
                        get_failures += 1
                    await asyncio.sleep(0.5)

        connector = aiohttp.TCPConnector(limit=0)
        http_timeout = aiohttp.ClientTimeout(total=wait_seconds + 90)
        async with aiohttp.ClientSession(connector=connector, timeout=http_timeout) as session:
            sampler = asyncio.create_task(sample())
            getter = asyncio.create_task(plain_gets())
            started = time.monotonic()
            await asyncio.gather(*(one_wait(session) for _ in range(waits)))
            elapsed = time.monotonic() - started
            done.set()
            await asyncio.gather(sampler, getter)
        await asyncio.sleep(5)
        rss_after, fds_after = proc_status(pid)

    return {
        "waits": waits,
        "ids_per_wait": ids_count,
        "wait_timeout_s": wait_seconds,
        "rss_mb": {
            "before": round(rss_before / 1024, 1),
            "peak": round(max(s[0] for s in samples) / 1024, 1),
            "after": round(rss_after / 1024, 1),
        },
        "fds": {"before": fds_before, "peak": max(s[1] for s in samples), "after": fds_after},
        "plain_get_ms": {
            "samples": len(gets),
            "median": round(statistics.median(gets) * 1000, 1) if gets else None,
            "max": round(max(gets) * 1000, 1) if gets else None,
            "over_1s": sum(1 for g in gets if g > 1),
            "over_1s_at": slow,
            "failed": get_failures,
        },
        "wait_answers": answers,
        "slowest_wait_answer_s": round(slowest, 1),
        "flood_s": round(elapsed, 1),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default=os.environ.get("AISERVICE_BENCH_DATABASE_URL"), required=False)
    parser.add_argument("--waits", type=int, default=2000)
    parser.add_argument("--ids", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=25)
    args = parser.parse_args()
    if not args.dsn:
        parser.error("--dsn (or AISERVICE_BENCH_DATABASE_URL) is required")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, args.waits * 2 + 1000), hard), hard))

    from urllib.parse import urlsplit, urlunsplit

    name = f"aiservice_bench_waits_{uuid.uuid4().hex[:8]}"
    admin = await connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(args.dsn)
    dsn = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))
    try:
        conn = await connect(dsn)
        await migrate(conn)
        await conn.close()
        result = await flood(dsn, args.waits, args.ids, args.timeout)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
