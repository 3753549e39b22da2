"""Fixtures of the SQL-level tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlapi import Conn, Connections

from aiservice.db.pool import connect


@pytest.fixture
async def connections(database_url: str) -> AsyncIterator[Connections]:
    """Open n more connections to the test database; all are closed after the test."""
    opened: list[Conn] = []

    async def open_n(n: int) -> list[Conn]:
        conns = await asyncio.gather(*(connect(database_url) for _ in range(n)))
        opened.extend(conns)
        return list(conns)

    yield open_n
    await asyncio.gather(*(c.close() for c in opened))
