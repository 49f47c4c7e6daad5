"""Tailing order events from platform.outbox: resumable, in commit order.

`OutboxWaker` keeps ONE dedicated asyncpg connection per process in LISTEN
`entrepot_outbox` and wakes every tailing watcher on NOTIFY. Watchers also
poll on a short interval, so a lost notification or a dropped LISTEN
connection only adds latency, never loses events: correctness comes from
outbox.read_after's (txid, id) positions, not from the notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.order.types import TOPICS
from domain.shared.errors import OutOfRange
from domain.shared.outbox import NOTIFY_CHANNEL, StoredEvent, head_position, position_of, read_after

log = logging.getLogger("entrepot.order.watch")


def _plain_dsn(url: str) -> str:
    for prefix in ("postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


class OutboxWaker:
    def __init__(self, database_url: str, *, reconnect_delay: float = 1.0) -> None:
        self._dsn = _plain_dsn(database_url)
        self._reconnect_delay = reconnect_delay
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self._watchers = 0

    def acquire(self) -> None:
        """A watcher starts: LISTEN runs while at least one watcher is active."""
        self._watchers += 1
        self._ensure_started()

    async def release(self) -> None:
        self._watchers -= 1
        if self._watchers <= 0:
            self._watchers = 0
            await self.close()

    def ticket(self) -> asyncio.Event:
        """Take before reading; waiting on it then cannot miss a NOTIFY that came in between."""
        self._ensure_started()
        return self._event

    async def wait(self, ticket: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await ticket.wait()

    def _wake(self, *_: Any) -> None:
        old, self._event = self._event, asyncio.Event()
        old.set()

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="order-outbox-listen")

    async def _listen(self) -> None:
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(
                    self._dsn, timeout=5, server_settings={"application_name": "entrepot-listen"}
                )
                self._conn = conn
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(NOTIFY_CHANNEL, self._wake)
                # Events committed while we were not listening are found by the
                # watchers' next read; wake them so it happens now.
                self._wake()
                await lost.wait()
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
                TimeoutError,
            ) as exc:
                log.warning(
                    "outbox LISTEN connection unavailable (%s); watchers fall back to polling",
                    type(exc).__name__,
                )
            finally:
                conn_, self._conn = self._conn, None
                if conn_ is not None and not conn_.is_closed():
                    with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                        await conn_.close(timeout=2)
            await asyncio.sleep(self._reconnect_delay)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close(timeout=2)
        self._wake()


async def _read_after(
    session: AsyncSession, position: tuple[int, int], topics: Sequence[str], limit: int
) -> list[StoredEvent]:
    return await read_after(session, position, topics, limit)


@dataclass(frozen=True)
class Batch:
    events: list[StoredEvent]
    # Resume point: the id of the last event read, matching or not.
    cursor: int


async def start_position(session: AsyncSession, after_event_id: int) -> tuple[int, int]:
    if after_event_id <= 0:
        return await head_position(session)
    pos = await position_of(session, after_event_id)
    if pos is None:
        raise OutOfRange(
            "UNKNOWN_EVENT_ID",
            f"event {after_event_id} is unknown or no longer retained; resume from 0 (now) instead",
            metadata={"after_event_id": str(after_event_id)},
        )
    return pos


async def tail_order_events(
    sessions: async_sessionmaker[AsyncSession],
    waker: OutboxWaker,
    *,
    channel: str,
    after_event_id: int = 0,
    order_id: str = "",
    topics: Sequence[str] = TOPICS,
    batch_size: int = 500,
    poll_interval: float = 1.0,
    heartbeat: float = 15.0,
) -> AsyncIterator[Batch]:
    """Yields batches of the channel's matching events forever (until the caller stops)."""
    topics = [t for t in topics if t in TOPICS] or list(TOPICS)
    async with sessions() as s:
        position = await start_position(s, after_event_id)
    cursor = position[1]
    waker.acquire()
    inner = _tail(
        sessions, waker, position, cursor, channel, order_id, topics, batch_size, poll_interval, heartbeat
    )
    try:
        async with contextlib.aclosing(inner):
            async for batch in inner:
                yield batch
    finally:
        await waker.release()


async def _tail(
    sessions: async_sessionmaker[AsyncSession],
    waker: OutboxWaker,
    position: tuple[int, int],
    cursor: int,
    channel: str,
    order_id: str,
    topics: Sequence[str],
    batch_size: int,
    poll_interval: float,
    heartbeat: float,
) -> AsyncGenerator[Batch, None]:
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    while True:
        ticket = waker.ticket()
        async with sessions() as s:
            rows = await _read_after(s, position, topics, batch_size)
        if rows:
            position = (rows[-1].txid, rows[-1].id)
            cursor = rows[-1].id
            matching = [
                r for r in rows if r.channel == channel and (not order_id or r.aggregate_id == order_id)
            ]
            if matching:
                yield Batch(matching, cursor)
                last_sent = loop.time()
            if len(rows) == batch_size:
                continue
        if loop.time() - last_sent >= heartbeat:
            yield Batch([], cursor)
            last_sent = loop.time()
        await waker.wait(ticket, poll_interval)
