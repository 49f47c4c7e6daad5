"""The outbox watch hub: one per server process, shared by every WatchStockChanges
and WatchOrderEvents call.

One dedicated asyncpg connection LISTENs on `entrepot_outbox`; one reader loop
reads the outbox once per wake-up (commit order, domain/shared/outbox.py), for
the topics its watchers want, and dispatches to the watchers' bounded buffers.
A watcher that resumes from an older cursor first catches up with its own
reads, then joins the live feed once it has reached the hub's position, so
nothing is lost or repeated.

The two streams differ only in what their watchers are given here:
- stock watchers see `inventory.stock_changed` as domain.inventory.watch
  StockEvents, filtered by SKU (indexed), warehouse and threshold; a watcher
  whose buffer overflows is cut off (RESOURCE_EXHAUSTED / WATCHER_TOO_SLOW,
  metadata `cursor`) and resumes from that cursor; an idle watcher gets a
  heartbeat only when its cursor advanced past filtered-out events (and the
  first one, below);
- order watchers see the order topics they asked for as outbox.StoredEvents
  of their channel (indexed), optionally of one order; a watcher whose buffer
  overflows falls back to its own reads from what it was sent, then rejoins
  (it is never cut off); an idle watcher gets a heartbeat every
  `heartbeat_seconds`.
Every watcher gets its first message within `heartbeat_seconds` of opening, a
heartbeat with its cursor when nothing else came (an empty outbox included):
a client knows the stream is live without waiting for an event.
A message's cursor is the last event of the watcher's topics it covers,
matching its filter or not: resuming after it loses and repeats nothing.

A NOTIFY can be missed (the LISTEN connection dropped, a database restart):
the loop also polls every `poll_seconds`, so a missed wake-up only delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import asyncpg

import domain.order as orders
from domain.inventory import watch as stock_watch
from domain.order import watch as order_watch
from domain.shared import outbox
from domain.shared.db import driver_url
from domain.shared.errors import ResourceExhausted
from server.runtime import Runtime

log = logging.getLogger("entrepot.watch_hub")

READ_LIMIT = 1000
# Events per stream message.
MESSAGE_EVENTS = 500
# Order watchers: events buffered before a watcher falls back to its own reads.
ORDER_BUFFER_EVENTS = 10_000

Position = tuple[int, int]


@dataclass(slots=True)
class Message:
    events: list[Any]
    cursor: int
    # The position of the event `cursor` names (where resuming after it starts).
    position: Position


@dataclass(frozen=True)
class _Stream:
    """How a kind of watcher reads an event, and its index key."""

    convert: Callable[[outbox.StoredEvent], Any]
    key: Callable[[Any], str]


_STOCK = _Stream(stock_watch.to_stock_event, lambda e: e.sku)
_ORDERS = _Stream(lambda e: e, lambda e: e.channel or "")
_STOCK_TOPICS = frozenset(stock_watch.TOPICS)
_STREAMS = {
    **{t: _STOCK for t in stock_watch.TOPICS},
    **{t: _ORDERS for t in orders.TOPICS},
}


@dataclass(eq=False)
class Watcher:
    topics: frozenset[str]
    # Index keys (SKUs, or the channel); empty: every event of its topics.
    keys: frozenset[str]
    matches: Callable[[Any], bool]
    position: Position
    max_events: int
    queue: asyncio.Queue[Message | None] = field(default_factory=asyncio.Queue)
    queued_events: int = 0
    # Newest event of its topics the watcher has passed, matching or not (heartbeats carry it).
    latest_cursor: int = 0
    latest_position: Position = (0, 0)
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

    def restart_from(self, position: Position, cursor: int) -> None:
        """Back to catching up from what was sent (after leaving the hub)."""
        self.position = self.latest_position = position
        self.latest_cursor = cursor
        self.queue = asyncio.Queue()
        self.queued_events = 0
        self.overflowed = False


def _messages(events: list[Any], last: Position) -> Iterable[Message]:
    """`events` in messages of at most MESSAGE_EVENTS; the last one's cursor is the event at `last`."""
    for i in range(0, len(events), MESSAGE_EVENTS):
        chunk = events[i : i + MESSAGE_EVENTS]
        end = last if i + MESSAGE_EVENTS >= len(events) else chunk[-1].position
        yield Message(chunk, end[1], end)


class Hub:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.watchers: set[Watcher] = set()
        # Watchers by the topics they read (one group per stream and topic choice).
        self.by_topics: dict[frozenset[str], set[Watcher]] = {}
        # Watchers by (topic, key), and those that take every event of a topic.
        self.by_key: dict[str, dict[str, set[Watcher]]] = {}
        self.every: dict[str, set[Watcher]] = {}
        self.topics: Counter[str] = Counter()
        # Bumped when the topics read change: a read begun before is read again.
        self.generation = 0
        self.position: Position | None = None
        self.wake = asyncio.Event()
        # Other outbox readers of this process (the event relay) woken with the hub.
        self.also_wake: list[asyncio.Event] = []
        self.poll_seconds = 1.0
        self.reads = 0
        # Order watchers that overflowed and went back to their own reads.
        self.fallbacks = 0

    # ------------------------------------------------------------ membership
    def read_topics(self) -> list[str]:
        return sorted(self.topics)

    def try_join(self, w: Watcher) -> bool:
        """Join the live feed if `w` has caught up with the hub (no await: atomic)."""
        if self.position is not None and w.position < self.position:
            return False
        if self.position is None:
            self.position = w.position
        self.watchers.add(w)
        self.by_topics.setdefault(w.topics, set()).add(w)
        for topic in w.topics:
            if w.keys:
                keyed = self.by_key.setdefault(topic, {})
                for key in w.keys:
                    keyed.setdefault(key, set()).add(w)
            else:
                self.every.setdefault(topic, set()).add(w)
            if self.topics[topic] == 0:
                self.generation += 1
            self.topics[topic] += 1
        self.wake.set()
        return True

    def leave(self, w: Watcher) -> None:
        if w not in self.watchers:
            return
        self.watchers.discard(w)
        group = self.by_topics.get(w.topics)
        if group is not None:
            group.discard(w)
            if not group:
                del self.by_topics[w.topics]
        for topic in w.topics:
            self.every.get(topic, set()).discard(w)
            keyed = self.by_key.get(topic, {})
            for key in w.keys:
                group = keyed.get(key)
                if group is not None:
                    group.discard(w)
                    if not group:
                        del keyed[key]
            self.topics[topic] -= 1
            if self.topics[topic] <= 0:
                del self.topics[topic]
                self.generation += 1
        if not self.watchers:
            # Nobody listens: the next watcher sets the position again.
            self.position = None

    # ------------------------------------------------------------ reading
    async def _read_once(self) -> bool:
        """Read and dispatch one chunk; True when there may be more."""
        pos, generation, topics = self.position, self.generation, self.read_topics()
        if pos is None or not self.watchers:
            return False
        rows = await self.rt.read(lambda s: outbox.read_after(s, pos, topics, READ_LIMIT))
        self.reads += 1
        if self.position != pos:
            return False
        if self.generation != generation:
            return True  # a watcher wants topics this read did not ask for: read again
        if not rows:
            return False
        self._dispatch(rows)
        self.position = rows[-1].position
        return len(rows) == READ_LIMIT

    def _dispatch(self, rows: list[outbox.StoredEvent]) -> None:
        matched: dict[Watcher, list[Any]] = {}
        last_of: dict[str, outbox.StoredEvent] = {}
        for e in rows:
            last_of[e.topic] = e
            stream = _STREAMS.get(e.topic)
            every = self.every.get(e.topic)
            keyed = self.by_key.get(e.topic)
            if stream is None or not (every or keyed):
                continue
            item = stream.convert(e)
            pos = e.position
            group = keyed.get(stream.key(item)) if keyed else None
            for members in (every, group):
                if members:
                    for x in members:
                        if pos > x.position and x.matches(item):
                            matched.setdefault(x, []).append(item)
        end = rows[-1].position
        for topics, group in self.by_topics.items():
            # The newest event of these topics: each message's and heartbeat's cursor.
            found = _last_of(last_of, topics)
            last = None if found is None else found.position
            for w in list(group):
                if end <= w.position:
                    continue
                if last is not None and last > w.position:
                    events = matched.get(w)
                    if events:
                        if len(events) <= MESSAGE_EVENTS:
                            w.offer(Message(events, last[1], last))
                        else:
                            for msg in _messages(events, last):
                                w.offer(msg)
                    w.latest_cursor, w.latest_position = last[1], last
                w.position = end

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
                        self._woken()  # catch up on anything missed while disconnected
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_seconds):
                        await self.wake.wait()
                self.wake.clear()
                try:
                    while await self._read_once():
                        pass
                except Exception as exc:
                    log.warning("outbox read failed; retrying", extra={"error": type(exc).__name__})
                    await asyncio.sleep(backoff)
        finally:
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.shield(conn.close(timeout=2))
                except Exception as exc:  # the hub is stopping either way
                    log.warning("closing the LISTEN connection failed", extra={"error": type(exc).__name__})

    def _woken(self) -> None:
        self.wake.set()
        for event in self.also_wake:
            event.set()

    def wake_event(self) -> asyncio.Event:
        """An event set on every wake-up of the hub's LISTEN connection (NOTIFY or reconnect)."""
        event = asyncio.Event()
        self.also_wake.append(event)
        return event

    async def _listen(self) -> asyncpg.Connection | None:
        try:
            conn = await asyncpg.connect(
                driver_url(self.rt.settings.database_url or ""),
                timeout=5,
                server_settings={"application_name": "entrepot-watch"},
            )
            await conn.add_listener(outbox.NOTIFY_CHANNEL, lambda *_: self._woken())
            return conn
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            log.warning("LISTEN connection failed; retrying", extra={"error": type(exc).__name__})
            return None

    # ------------------------------------------------------------ one watcher
    async def _catch_up(self, w: Watcher, stream: _Stream) -> AsyncGenerator[Message, None]:
        """Own reads from `w.position` until the watcher joins the live feed: when
        a read comes back short (at the head) and the hub is not ahead of it. The
        reads also cover the hub's topics, so the watcher's position keeps up
        with the hub's even when its own topics are quiet."""
        while True:
            topics = sorted(w.topics.union(self.topics))
            rows = await self.rt.read(
                partial(outbox.read_after, position=w.position, topics=topics, limit=READ_LIMIT)
            )
            if rows:
                w.position = rows[-1].position
                last = _last_of({e.topic: e for e in rows}, w.topics)
                if last is not None:
                    events = [
                        x for x in (stream.convert(e) for e in rows if e.topic in w.topics) if w.matches(x)
                    ]
                    for msg in _messages(events, last.position):
                        yield msg
                    w.latest_cursor, w.latest_position = last.id, last.position
            if len(rows) < READ_LIMIT and self.try_join(w):
                return
            if not rows:
                await asyncio.sleep(0.05)  # the hub is ahead but its rows are not visible yet

    async def subscribe(
        self,
        w: Watcher,
        stream: _Stream,
        *,
        heartbeat_seconds: float,
        cut_off: bool,
        idle_heartbeat: bool,
    ) -> AsyncGenerator[Message, None]:
        """Messages for one watcher: catch-up reads, then the live feed."""
        loop = asyncio.get_running_loop()
        sent, sent_position = w.latest_cursor, w.latest_position
        last_sent = loop.time()
        greeted = False  # a first message went out
        try:
            while True:
                async with contextlib.aclosing(self._catch_up(w, stream)) as catching_up:
                    async for msg in catching_up:
                        yield msg
                        sent, sent_position, last_sent = msg.cursor, msg.position, loop.time()
                        greeted = True
                while True:
                    try:
                        async with asyncio.timeout(max(0.0, last_sent + heartbeat_seconds - loop.time())):
                            queued = await w.queue.get()
                    except TimeoutError:
                        # Queue empty: everything dispatched was sent; tell the cursor.
                        if idle_heartbeat or not greeted or w.latest_cursor > sent:
                            sent, sent_position = w.latest_cursor, w.latest_position
                            yield Message([], sent, sent_position)
                            greeted = True
                        last_sent = loop.time()
                        continue
                    if queued is None:
                        break
                    w.queued_events -= len(queued.events)
                    yield queued
                    sent, sent_position, last_sent = queued.cursor, queued.position, loop.time()
                    greeted = True
                # The buffer overflowed.
                if cut_off:
                    raise ResourceExhausted(
                        "WATCHER_TOO_SLOW",
                        f"the watcher fell more than {w.max_events} events behind; resume from cursor {sent}",
                        metadata={"cursor": str(sent)},
                    )
                self.leave(w)
                self.fallbacks += 1
                w.restart_from(sent_position, sent)
        finally:
            self.leave(w)


def _last_of(last_of: dict[str, outbox.StoredEvent], topics: frozenset[str]) -> outbox.StoredEvent | None:
    """The newest of the events `last_of` holds for `topics`."""
    found = [last_of[t] for t in topics if t in last_of]
    return max(found, key=lambda e: e.position) if found else None


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
    flt: stock_watch.Filter,
    after_event_id: int,
    *,
    max_events: int,
    heartbeat_seconds: float,
) -> AsyncIterator[Message]:
    """WatchStockChanges: messages of domain.inventory.watch StockEvents.

    Raises ResourceExhausted WATCHER_TOO_SLOW (metadata `cursor`) when the
    watcher's buffer overflows; it may resume from that cursor.
    """
    start = await rt.read(lambda s: stock_watch.start_position(s, after_event_id))
    w = Watcher(_STOCK_TOPICS, flt.skus, flt.matches, start, max_events)
    # From now (0): the head's event, so the first heartbeat names a cursor to resume after.
    w.latest_cursor, w.latest_position = start[1], start
    messages = hub_for(rt).subscribe(
        w, _STOCK, heartbeat_seconds=heartbeat_seconds, cut_off=True, idle_heartbeat=False
    )
    async with contextlib.aclosing(messages):
        async for msg in messages:
            yield msg


async def watch_orders(
    rt: Runtime,
    flt: order_watch.Filter,
    after_event_id: int,
    *,
    heartbeat_seconds: float | None = None,
) -> AsyncIterator[Message]:
    """WatchOrderEvents: messages of outbox.StoredEvents of the filter's channel; an idle
    watcher gets a heartbeat every `heartbeat_seconds` (default: the setting)."""
    if heartbeat_seconds is None:
        heartbeat_seconds = rt.settings.watch_heartbeat_seconds
    start = await rt.read(lambda s: order_watch.start_position(s, after_event_id))
    w = Watcher(flt.topics, frozenset({flt.channel}), flt.matches, start, ORDER_BUFFER_EVENTS)
    w.latest_cursor, w.latest_position = start[1], start
    messages = hub_for(rt).subscribe(
        w, _ORDERS, heartbeat_seconds=heartbeat_seconds, cut_off=False, idle_heartbeat=True
    )
    async with contextlib.aclosing(messages):
        async for msg in messages:
            yield msg
