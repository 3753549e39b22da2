"""Waiting for jobs to finish: one LISTEN connection per API process fans out to every waiter.

A registry holds one entry per awaited job id, however many requests wait for it; a waiter keeps
its ids (the request's own list) and a count of those still unfinished. Nothing is taken on trust
from a notification: any role that may NOTIFY could forge one, so a notified id is only a hint to
re-read that job's status. Every read goes through one checker, which asks PostgreSQL once for all
ids gathered since its last read (new waiters' ids, notified ids, and every second all ids still
awaited, which covers notifications lost while the listener was down). A parked waiter holds no
pooled connection, and 2,000 waiters on the same 1,000 jobs cost one query of 1,000 ids.

Waits are bounded: at most ``max_waits`` at once, and ``max_per_caller`` for one caller (bearer
token or client address); past either the caller gets errors.TooManyWaits (429, Retry-After) at
once. Answers (the full jobs) are read at most ``readers`` at a time, so that waits ending together
leave pooled connections to other requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from aiservice import errors
from aiservice.db.listener import FINISHED_CHANNEL, Listener
from aiservice.db.store import JobStore
from aiservice.events import wait_event
from aiservice.jobs import FINISHED, JobFilter

log = logging.getLogger(__name__)

Mode = Literal["any", "all"]

_CHUNK = 5000  # ids per status query
_DOCUMENTS_KEPT = 5.0  # seconds a job's document is kept for waits ending together
_MAX_ID = 2**63 - 1
RETRY_AFTER = 2  # seconds, in the Retry-After of a refused wait


@dataclass(eq=False)
class Waiter:
    ids: Sequence[int]  # the caller's list, not a copy
    mode: Mode
    unfinished: int = 0
    closed: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def finished_one(self) -> None:
        self.unfinished -= 1
        if self.mode == "any" or self.unfinished <= 0:
            self.done.set()


@dataclass(eq=False)
class _Entry:
    """One awaited job id: its waiters (closed ones are dropped lazily) and what the last read found."""

    waiters: list[Waiter] = field(default_factory=list)
    live: int = 0
    checked: bool = False
    missing: bool = False
    finished: bool = False


class Waiters:
    def __init__(
        self,
        store: JobStore,
        dsn: str,
        *,
        recheck: float = 1.0,
        on_finished: Callable[[], None] | None = None,
        max_waits: int = 2000,
        max_per_caller: int = 1000,
        readers: int = 5,
    ) -> None:
        self.store = store
        self.dsn = dsn
        self.recheck = recheck
        self.on_finished = on_finished  # the webhook sender wants to know too
        self.max_waits = max_waits
        self.max_per_caller = max_per_caller
        self._listener: Listener | None = None
        self._entries: dict[int, _Entry] = {}
        self._unchecked: set[int] = set()
        self._round: asyncio.Future[None] | None = None  # resolved when the next read has run
        self._wake = asyncio.Event()
        self._checker: asyncio.Task[None] | None = None
        self._count = 0
        self._by_caller: dict[str, int] = {}
        self._readers = asyncio.Semaphore(readers)
        self._docs: dict[int, tuple[float, bytes]] = {}  # job id -> (when its read began, its JSON)
        self._check_failing = False
        self._malformed_seen = 0

    @property
    def connected(self) -> bool:
        """Whether the LISTEN connection is up (else only the re-check finds finished jobs)."""
        return self._listener is not None and self._listener.connected

    @property
    def waiting(self) -> int:
        return self._count

    @property
    def awaited_ids(self) -> int:
        return len(self._entries)

    async def wait(self, ids: Sequence[int], mode: Mode, seconds: float, caller: str = "") -> list[bytes]:
        """Wait until any (or all) of ``ids`` finished, or ``seconds`` passed; answer their jobs, each
        as its JSON document, in the order of ``ids`` (which must hold no duplicates). Unknown ids
        raise errors.NotFound before any waiting; a wait over the bounds raises errors.TooManyWaits.

        Waits that end together on the same jobs share their reads: a job's document read after a
        wait ended serves that wait too (never one read before: the answer is the state at its end)."""
        with self._admitted(caller):
            waiter = Waiter(ids, mode)
            try:
                first_read = self._register(waiter)
                if first_read is not None:
                    await first_read  # shared with every waiter registered since the last read
                missing = [i for i in ids if self._entries[i].missing]
                if missing:
                    raise errors.NotFound(f"no such jobs: {missing[:20]}")
                if not waiter.done.is_set():
                    await wait_event(waiter.done, seconds)
            finally:
                self._unregister(waiter)
            return await self._documents(ids, since=asyncio.get_running_loop().time())

    def check_room(self, caller: str) -> None:
        """Raise errors.TooManyWaits now if a wait of ``caller`` would be refused (before its body is read)."""
        with self._admitted(caller):
            pass

    @contextlib.contextmanager
    def _admitted(self, caller: str) -> Iterator[None]:
        if self._count >= self.max_waits:
            raise errors.TooManyWaits(
                f"the service holds {self.max_waits} waits already (WAIT_MAX_CONCURRENT); retry later",
                retry_after=RETRY_AFTER,
            )
        held = self._by_caller.get(caller, 0)
        if held >= self.max_per_caller:
            raise errors.TooManyWaits(
                f"this caller holds {self.max_per_caller} waits already (WAIT_MAX_PER_CALLER); retry later",
                retry_after=RETRY_AFTER,
            )
        self._count += 1
        self._by_caller[caller] = held + 1
        try:
            yield
        finally:
            self._count -= 1
            left = self._by_caller[caller] - 1
            if left:
                self._by_caller[caller] = left
            else:
                del self._by_caller[caller]

    def _register(self, waiter: Waiter) -> asyncio.Future[None] | None:
        """Enter the waiter under each of its ids; the future to await when some are new to the registry."""
        waiter.unfinished = len(waiter.ids)
        unread = False
        for job_id in waiter.ids:
            entry = self._entries.get(job_id)
            if entry is None:
                entry = self._entries[job_id] = _Entry()
                self._unchecked.add(job_id)
            entry.waiters.append(waiter)
            entry.live += 1
            if entry.finished:
                waiter.finished_one()
            elif not entry.checked:
                unread = True
        if not unread:
            return None
        self._ensure_checker()
        if self._round is None:
            self._round = asyncio.get_running_loop().create_future()
            self._round.add_done_callback(_retrieve)
        self._wake.set()
        return self._round

    def _unregister(self, waiter: Waiter) -> None:
        waiter.closed = True
        for job_id in waiter.ids:
            entry = self._entries.get(job_id)
            if entry is None:
                continue
            entry.live -= 1
            if entry.live <= 0:
                del self._entries[job_id]
            elif len(entry.waiters) > 2 * entry.live + 8:
                entry.waiters = [w for w in entry.waiters if not w.closed]

    async def _documents(self, ids: Sequence[int], since: float) -> list[bytes]:
        """The jobs' JSON documents, from reads begun at ``since`` or later (at most ``readers`` at once)."""
        found: dict[int, bytes] = {}
        async with self._readers:
            for job_id in ids:
                kept = self._docs.get(job_id)
                if kept is not None and kept[0] >= since:
                    found[job_id] = kept[1]
            stale = [i for i in ids if i not in found]
            if stale:
                began = asyncio.get_running_loop().time()
                for job in await self.store.list_jobs(JobFilter(), before_id=None, limit=len(stale), ids=stale):
                    document = job.model_dump_json().encode()
                    self._docs[job.id] = (began, document)
                    found[job.id] = document
        missing = [i for i in ids if i not in found]
        if missing:
            raise errors.NotFound(f"no such jobs: {missing[:20]}")
        return [found[i] for i in ids]

    def _forget_documents(self) -> None:
        """Drop documents too old to serve a wait that ends from now on."""
        if self._docs:
            oldest = asyncio.get_running_loop().time() - _DOCUMENTS_KEPT
            self._docs = {i: d for i, d in self._docs.items() if d[0] >= oldest}

    # The checker ---------------------------------------------------------------------------------

    def _ensure_checker(self) -> None:
        if self._checker is None or self._checker.done():
            self._checker = asyncio.create_task(self._check_forever(), name="aiservice-waiters-check")

    async def _check_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._check()

    async def _check(self) -> None:
        """One read of every id gathered since the last: finished ones wake their waiters."""
        ids = [i for i in self._unchecked if i in self._entries]
        self._unchecked.clear()
        round_, self._round = self._round, None
        try:
            statuses: dict[int, str] = {}
            for start in range(0, len(ids), _CHUNK):
                statuses.update(await self.store.list_job_statuses(ids[start : start + _CHUNK]))
        except Exception as exc:
            self._unchecked.update(ids)  # read again next time
            if not self._check_failing:
                log.warning("waiters: reading job statuses failed (%s); retrying", exc)
            self._check_failing = True
            if round_ is not None:
                round_.set_exception(exc)
            return
        self._check_failing = False
        for job_id in ids:
            entry = self._entries.get(job_id)
            if entry is None:
                continue
            entry.checked = True
            status = statuses.get(job_id)
            if status is None:
                entry.missing = True
            elif status not in FINISHED:
                entry.finished = False  # retried since: later waiters wait for it again
            elif not entry.finished:
                entry.finished = True
                for waiter in entry.waiters:
                    if not waiter.closed:
                        waiter.finished_one()
        if round_ is not None:
            round_.set_result(None)

    def _recheck(self) -> None:
        """Read every awaited id again (notifications may have been lost; a finished job may have been retried)."""
        self._forget_documents()
        self._unchecked.update(self._entries)
        if self._unchecked:
            self._ensure_checker()
            self._wake.set()

    def _notified(self, payload: object) -> None:
        """A notification on aiservice_finished: its job ids are hints to read, never a verdict."""
        ids = self._payload_ids(payload)
        hinted = [i for i in ids if (e := self._entries.get(i)) is not None and not e.finished]
        if hinted:
            self._unchecked.update(hinted)
            self._ensure_checker()
            self._wake.set()
        if self.on_finished is not None:
            self.on_finished()

    def _payload_ids(self, payload: object) -> list[int]:
        """The job ids a payload names ({"jobs": [{"id": ...}, ...]}, or a batch's, which names none).
        Anything else is skipped, and told once at warning level, later at debug."""
        if isinstance(payload, dict):
            jobs = payload.get("jobs")
            if jobs is None and "batch_id" in payload:
                return []
            if isinstance(jobs, list):
                ids = [
                    j["id"]
                    for j in jobs
                    if isinstance(j, dict) and type(j.get("id")) is int and 1 <= j["id"] <= _MAX_ID
                ]
                if len(ids) == len(jobs):
                    return ids
                self._malformed(payload)
                return ids
        self._malformed(payload)
        return []

    def _malformed(self, payload: object) -> None:
        self._malformed_seen += 1
        level = logging.WARNING if self._malformed_seen == 1 else logging.DEBUG
        log.log(level, "waiters: ignoring a malformed %s notification: %.200r", FINISHED_CHANNEL, payload)

    async def run(self) -> None:
        """Listen (aiservice.db.listener, which reconnects after a loss), and re-check every
        ``recheck`` seconds whether the listener is up or not: polling stands in while it is down."""
        self._ensure_checker()
        self._listener = Listener(
            self.dsn,
            FINISHED_CHANNEL,
            self._notified,
            on_connected=self._recheck,  # whatever finished while we were away
            application_name="aiservice-waiters",
        )
        listening = asyncio.create_task(self._listener.run(), name="aiservice-waiters-listen")
        try:
            while True:
                await asyncio.sleep(self.recheck)
                self._recheck()
        finally:
            for task in (listening, self._checker):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a failed read's exception as seen: the waiters that awaited it have raised it already."""
    if not future.cancelled():
        future.exception()
