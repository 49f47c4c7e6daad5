"""The stock watch hub: one per server process, shared by every WatchStockChanges call.

One dedicated asyncpg connection LISTENs on `entrepot_outbox`; one reader loop
reads the outbox once per wake-up (commit order, domain/shared/outbox.py) and
dispatches to the watchers' bounded buffers. A watcher that resumes from an
older cursor first catches up with its own reads, then joins the live feed
once it has reached the hub's position, so nothing is lost or repeated.

A NOTIFY can be missed (the LISTEN connection dropped, a database restart):
the loop also polls every `poll_seconds`, so a missed wake-up only delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from domain.inventory import watch
from domain.shared.errors import ResourceExhausted
from domain.shared.outbox import NOTIFY_CHANNEL
from server.runtime import Runtime

log = logging.getLogger("entrepot.stock_watch")

READ_LIMIT = 1000
# Events per stream message.
MESSAGE_EVENTS = 500


@dataclass
class Message:
    events: list[watch.StockEvent]
    cursor: int


@dataclass(eq=False)
class Watcher:
    filter: watch.Filter
    position: watch.Position
    max_events: int
    queue: asyncio.Queue[Message | None] = field(default_factory=asyncio.Queue)
    queued_events: int = 0
    # Newest event id the watcher has passed, matching or not (heartbeats carry it).
    latest_cursor: int = 0
    overflowed: bool = False

    def offer(self, msg: Message) -> None:
        if self.overflowed:
            return
        if self.queued_events + len(msg.events) > self.max_events:
            self.overflowed = True
            self.queue.put_nowait(None)
            return
        self.queued_events += len(msg.events)
        self.queue.put_nowait(msg)


class Hub:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.watchers: set[Watcher] = set()
        # Only watchers without a SKU filter are scanned for every event; the
        # others are found through this index.
        self.by_sku: dict[str, set[Watcher]] = {}
        self.all_skus: set[Watcher] = set()
        self.position: watch.Position | None = None
        self.wake = asyncio.Event()
        self.poll_seconds = 1.0
        self.reads = 0

    # ------------------------------------------------------------ membership
    def try_join(self, w: Watcher) -> bool:
        """Join the live feed if `w` has caught up with the hub (no await: atomic)."""
        if self.position is not None and w.position < self.position:
            return False
        if self.position is None:
            self.position = w.position
        self.watchers.add(w)
        if w.filter.skus:
            for sku in w.filter.skus:
                self.by_sku.setdefault(sku, set()).add(w)
        else:
            self.all_skus.add(w)
        self.wake.set()
        return True

    def leave(self, w: Watcher) -> None:
        self.watchers.discard(w)
        self.all_skus.discard(w)
        for sku in w.filter.skus:
            group = self.by_sku.get(sku)
            if group is not None:
                group.discard(w)
                if not group:
                    del self.by_sku[sku]
        if not self.watchers:
            # Nobody listens: the next watcher sets the position again.
            self.position = None

    # ------------------------------------------------------------ reading
    async def _read_once(self) -> bool:
        """Read and dispatch one chunk; True when there may be more."""
        pos = self.position
        if pos is None or not self.watchers:
            return False
        rows = await self.rt.read(lambda s: watch.read_after(s, pos, READ_LIMIT))
        self.reads += 1
        if not rows or self.position != pos:
            return False
        self._dispatch(rows)
        self.position = rows[-1].position
        return len(rows) == READ_LIMIT

    def _dispatch(self, rows: list[watch.StockEvent]) -> None:
        matched: dict[Watcher, list[watch.StockEvent]] = {}
        for e in rows:
            group = self.by_sku.get(e.sku)
            for members in (self.all_skus, group) if group else (self.all_skus,):
                for x in members:
                    if e.position > x.position and x.filter.matches(e):
                        matched.setdefault(x, []).append(e)
        last = rows[-1]
        for w in list(self.watchers):
            if last.position <= w.position:
                continue
            events = matched.get(w)
            if events:
                for i in range(0, len(events), MESSAGE_EVENTS):
                    chunk = events[i : i + MESSAGE_EVENTS]
                    final = i + MESSAGE_EVENTS >= len(events)
                    w.offer(Message(chunk, last.event_id if final else chunk[-1].event_id))
            w.position = last.position
            w.latest_cursor = last.event_id

    async def serve(self) -> None:
        """The reader loop with its LISTEN connection; runs until cancelled."""
        conn: asyncpg.Connection | None = None
        backoff = 0.5
        try:
            while True:
                if conn is None or conn.is_closed():
                    conn = await self._listen()
                    if conn is None:
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 5.0)
                    else:
                        backoff = 0.5
                        self.wake.set()  # catch up on anything missed while disconnected
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_seconds):
                        await self.wake.wait()
                self.wake.clear()
                try:
                    while await self._read_once():
                        pass
                except (OSError, asyncpg.PostgresError, ConnectionError) as exc:
                    log.warning("outbox read failed; retrying", extra={"error": type(exc).__name__})
                    await asyncio.sleep(backoff)
                except Exception as exc:
                    log.warning("outbox read failed; retrying", extra={"error": type(exc).__name__})
                    await asyncio.sleep(backoff)
        finally:
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close(timeout=2))

    async def _listen(self) -> asyncpg.Connection | None:
        url = self.rt.settings.database_url or ""
        dsn = "postgresql://" + url.split("://", 1)[1] if "://" in url else url
        try:
            conn = await asyncpg.connect(
                dsn, timeout=5, server_settings={"application_name": "entrepot-watch"}
            )
            await conn.add_listener(NOTIFY_CHANNEL, lambda *_: self.wake.set())
            return conn
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            log.warning("LISTEN connection failed; retrying", extra={"error": type(exc).__name__})
            return None


async def _read(session: AsyncSession, position: watch.Position) -> list[watch.StockEvent]:
    return await watch.read_after(session, position, READ_LIMIT)


_HUBS: weakref.WeakKeyDictionary[Runtime, Hub] = weakref.WeakKeyDictionary()


def hub_for(rt: Runtime) -> Hub:
    hub = _HUBS.get(rt)
    if hub is None:
        hub = _HUBS[rt] = Hub(rt)
    return hub


async def run_hub(rt: Runtime, holder: str) -> None:
    """Background job (server/background.py): every replica runs its own hub."""
    await hub_for(rt).serve()


async def watch_stock(
    rt: Runtime,
    flt: watch.Filter,
    after_event_id: int,
    *,
    max_events: int,
    heartbeat_seconds: float,
) -> AsyncIterator[Message]:
    """Messages for one watcher: catch-up reads, then the hub's live feed.

    Raises ResourceExhausted WATCHER_TOO_SLOW (metadata `cursor`) when the
    watcher's buffer overflows; it may resume from that cursor.
    """
    hub = hub_for(rt)
    start = await rt.read(lambda s: watch.start_position(s, after_event_id))
    w = Watcher(flt, start, max_events)
    sent = after_event_id
    # Catch up with own reads; join the live feed once a read comes back short
    # (at the head) and the hub is not ahead of this watcher.
    while True:
        rows = await rt.read(partial(_read, position=w.position))
        if rows:
            w.position = rows[-1].position
            events = [e for e in rows if flt.matches(e)]
            for i in range(0, len(events), MESSAGE_EVENTS):
                chunk = events[i : i + MESSAGE_EVENTS]
                cursor = rows[-1].event_id if i + MESSAGE_EVENTS >= len(events) else chunk[-1].event_id
                yield Message(chunk, cursor)
                sent = cursor
            w.latest_cursor = rows[-1].event_id
        if len(rows) < READ_LIMIT and hub.try_join(w):
            break
        if not rows:
            await asyncio.sleep(0.05)  # the hub is ahead but its rows are not visible yet
    try:
        while True:
            try:
                async with asyncio.timeout(heartbeat_seconds):
                    msg = await w.queue.get()
            except TimeoutError:
                # Queue empty: everything dispatched was sent; tell the cursor.
                if w.latest_cursor > sent:
                    sent = w.latest_cursor
                    yield Message([], sent)
                continue
            if msg is None:
                raise ResourceExhausted(
                    "WATCHER_TOO_SLOW",
                    f"the watcher fell more than {max_events} events behind; resume from cursor {sent}",
                    metadata={"cursor": str(sent)},
                )
            w.queued_events -= len(msg.events)
            yield msg
            sent = msg.cursor
    finally:
        hub.leave(w)
