"""The outbox watch hub: one per server process, shared by every WatchStockChanges
and WatchOrderEvents call.

One dedicated asyncpg connection LISTENs on `entrepot_outbox`; one reader loop
reads the outbox once per wake-up, for the topics its watchers want, and
dispatches to the watchers' bounded buffers. It reads in id order up to the
outbox's final id (domain/shared/outbox.py `Horizon`, the epoch read the event
relay uses): ids of one aggregate follow its commit order, and nothing can
appear below the final id later, so a position is an id, the same on every
replica. A watcher that resumes from an older cursor first catches up with its
own reads, then joins the live feed once it has reached the hub's position, so
nothing is lost or repeated.

The two streams differ only in what their watchers are given here:
- stock watchers see `inventory.stock_changed` as domain.inventory.watch
  StockEvents, filtered by SKU (indexed), warehouse and threshold; a watcher
  whose buffer overflows is cut off (RESOURCE_EXHAUSTED / WATCHER_TOO_SLOW,
  metadata `cursor`) and resumes from that cursor; an idle watcher gets a
  heartbeat only when its cursor advanced far past filtered-out events
  (`CursorRule`), and the first one (below);
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
"From now on" (cursor 0) starts at the final id when the watch starts.
Watchers opening together (a fleet reconnecting after a restart) share their
reads (which cursors exist, the final id) and join without a read of their own
when they start at the hub's position; a read visits only the watchers its
events match (a joined watcher's position is the hub's).

A NOTIFY can be missed (the LISTEN connection dropped, a database restart):
the loop also polls every `poll_seconds`, so a missed wake-up only delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

import domain.order as orders
from domain.inventory import watch as stock_watch
from domain.order import watch as order_watch
from domain.shared import outbox
from domain.shared.coalesce import Coalescer
from domain.shared.db import driver_url
from domain.shared.errors import ResourceExhausted
from server.runtime import Runtime

log = logging.getLogger("entrepot.watch_hub")

READ_LIMIT = 1000
# Events per stream message.
MESSAGE_EVENTS = 500
# Order watchers: events buffered before a watcher falls back to its own reads.
ORDER_BUFFER_EVENTS = 10_000

# Follow-up read while an observation of the final id waits for transactions to end.
PENDING_SECONDS = 0.02
# How long a watcher "from now on" waits for the transactions running when it opens.
START_WAIT_SECONDS = 0.5


@dataclass(slots=True)
class Message:
    events: list[Any]
    # The last event of the watcher's topics the message covers: resuming after it
    # loses and repeats nothing.
    cursor: int


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


@dataclass(frozen=True)
class CursorRule:
    """When an idle watcher is told its advanced cursor: once it is `gap_events` event ids
    behind (what resuming from the last cursor it got would re-read at most), or has
    not been told for `seconds`. Telling every advance costs one message per watcher per
    heartbeat while events it does not watch flow, most of a large fleet's messages."""

    gap_events: int
    seconds: float

    def due(self, gap: int, idle_seconds: float) -> bool:
        return gap > 0 and (gap >= self.gap_events or idle_seconds >= self.seconds)


@dataclass(eq=False)
class Watcher:
    topics: frozenset[str]
    # Index keys (SKUs, or the channel); empty: every event of its topics.
    keys: frozenset[str]
    matches: Callable[[Any], bool]
    # Every event with an id up to it was read for the watcher.
    position: int
    max_events: int
    queue: asyncio.Queue[Message | None] = field(default_factory=asyncio.Queue)
    queued_events: int = 0
    # Newest event of its topics the watcher has passed, matching or not (heartbeats carry it).
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

    def restart_from(self, cursor: int) -> None:
        """Back to catching up from what was sent (after leaving the hub)."""
        self.position = self.latest_cursor = cursor
        self.queue = asyncio.Queue()
        self.queued_events = 0
        self.overflowed = False


def _messages(events: list[Any], last: int) -> Iterable[Message]:
    """`events` in messages of at most MESSAGE_EVENTS; the last one's cursor is `last`."""
    for i in range(0, len(events), MESSAGE_EVENTS):
        chunk = events[i : i + MESSAGE_EVENTS]
        yield Message(chunk, last if i + MESSAGE_EVENTS >= len(events) else chunk[-1].event_id)


class Hub:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.watchers: set[Watcher] = set()
        # Watchers by (topic, key), and those that take every event of a topic.
        self.by_key: dict[str, dict[str, set[Watcher]]] = {}
        self.every: dict[str, set[Watcher]] = {}
        self.topics: Counter[str] = Counter()
        # Bumped when the topics read change: a read begun before is read again.
        self.generation = 0
        # Every event up to this id was read and dispatched (None: no watcher).
        self.position: int | None = None
        # The newest event of each topic dispatched since the position was set.
        self.latest: dict[str, int] = {}
        self.horizon = outbox.Horizon()
        # The observation of the final id in flight (watchers starting share it).
        self._observing: asyncio.Future[outbox.Final | None] | None = None
        # Watchers opening at once (a reconnecting fleet) share their reads: which cursors
        # exist, and the newest event up to a final id.
        self._cursors: Coalescer[int, bool] = Coalescer(self._existing)
        self._newest: Coalescer[int, int] = Coalescer(self._newest_ids)
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
            # Never past the final id: a watcher behind it must be able to read up to here.
            final = self.horizon.final
            self.position = w.position if final is None else min(w.position, final.last_id)
            self.latest.clear()
        self.watchers.add(w)
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
    async def _observe(self) -> outbox.Final | None:
        """One observation of the final id (concurrent callers share one)."""
        if self._observing is None:
            self._observing = asyncio.ensure_future(
                self.rt.read(partial(outbox.observe_horizon, horizon=self.horizon))
            )
        observing = self._observing
        try:
            return await asyncio.shield(observing)
        finally:
            if self._observing is observing and observing.done():
                self._observing = None

    async def final(self) -> outbox.Final:
        """The final id, after at least one observation made now."""
        final = await self._observe()
        while final is None:  # the first observations wait for running transactions
            await asyncio.sleep(PENDING_SECONDS)
            final = await self._observe()
        return final

    async def start(self) -> tuple[int, int]:
        """Where a watcher "from now on" starts: the final id and the newest event up to
        it (the first heartbeat's cursor). The final id of an observation made now, once
        the transactions running now have ended (at most START_WAIT_SECONDS: a long
        transaction makes the start a little earlier, never later)."""
        loop = asyncio.get_running_loop()
        final = await self.final()
        now, give_up = self.horizon.known(), loop.time() + START_WAIT_SECONDS
        while final.last_id < now and loop.time() < give_up:
            await asyncio.sleep(PENDING_SECONDS)
            final = await self._observe() or final
        return final.last_id, await self._newest.get(final.last_id) or 0

    async def resume(self, after_event_id: int, check: Callable[[AsyncSession, int], Awaitable[int]]) -> int:
        """Where a watcher resuming after `after_event_id` starts: that event, when it
        exists; otherwise `check` (the stream's rules) says why not."""
        if after_event_id > 0 and await self._cursors.get(after_event_id):
            return after_event_id
        return await self.rt.read(lambda s: check(s, after_event_id))

    async def _existing(self, ids: list[int]) -> dict[int, bool]:
        found = await self.rt.read(partial(outbox.existing, event_ids=ids))
        return {i: True for i in found}

    async def _newest_ids(self, lasts: list[int]) -> dict[int, int]:
        async def read(session: AsyncSession) -> dict[int, int]:
            return {last: await outbox.newest_id(session, last) for last in lasts}

        return await self.rt.read(read)

    async def _read_once(self) -> bool:
        """Observe the final id and read and dispatch one chunk up to it (one transaction);
        True when there may be more. The hub observes on its own, after its wake-up (a
        shared observation may have begun before the commit that woke it)."""
        pos, generation, topics = self.position, self.generation, self.read_topics()
        if pos is None or not self.watchers:
            return False

        async def observe_and_read(
            session: AsyncSession,
        ) -> tuple[outbox.Final | None, list[outbox.StoredEvent]]:
            final = await outbox.observe_horizon(session, self.horizon)
            if final is None or final.last_id <= pos:
                return final, []
            return final, await outbox.read_final(session, final, pos, READ_LIMIT, topics)

        final, rows = await self.rt.read(observe_and_read)
        if final is None or final.last_id <= pos:
            return False
        self.reads += 1
        if self.position != pos:
            return False
        if self.generation != generation:
            return True  # a watcher wants topics this read did not ask for: read again
        self._dispatch(rows)
        self.position = rows[-1].id if len(rows) == READ_LIMIT else final.last_id
        return len(rows) == READ_LIMIT

    def _dispatch(self, rows: list[outbox.StoredEvent]) -> None:
        """Hand `rows` (the events of the hub's topics after its position) to the watchers
        they match; only those are visited. A joined watcher's own position stays where it
        joined (at or after the hub's position then): the hub's position stands for it, and
        `cursor_of` gives it the newest event of its topics dispatched since."""
        matched: dict[Watcher, list[Any]] = {}
        latest = self.latest
        for e in rows:
            latest[e.topic] = e.id
            stream = _STREAMS.get(e.topic)
            every = self.every.get(e.topic)
            keyed = self.by_key.get(e.topic)
            if stream is None or not (every or keyed):
                continue
            item = stream.convert(e)
            eid = e.id
            group = keyed.get(stream.key(item)) if keyed else None
            for members in (every, group):
                if members:
                    for x in members:
                        if eid > x.position and x.matches(item):
                            matched.setdefault(x, []).append(item)
        for w, events in matched.items():
            # The newest event of its topics: the message's cursor.
            last = self._latest_of(w.topics)
            if len(events) <= MESSAGE_EVENTS:
                w.offer(Message(events, last))
            else:
                for msg in _messages(events, last):
                    w.offer(msg)
            w.latest_cursor = last

    def _latest_of(self, topics: frozenset[str]) -> int:
        return max((self.latest.get(t, 0) for t in topics), default=0)

    def cursor_of(self, w: Watcher) -> int:
        """The newest event of `w`'s topics it has passed, matching or not (a heartbeat's
        cursor). For a joined watcher that includes every event of its topics the hub
        dispatched: those up to where it joined came before its own start or reads."""
        if w not in self.watchers:
            return w.latest_cursor
        return max(w.latest_cursor, self._latest_of(w.topics))

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
                # An observation waiting for transactions to end is looked at again soon:
                # they end without a NOTIFY of their own when they wrote no event.
                wait = PENDING_SECONDS if self.watchers and self.horizon.pending else self.poll_seconds
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
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
        """Own reads from `w.position` until the watcher joins the live feed (it has
        reached the hub's position, or the final id when the hub has none). Each read goes
        up to the final id, which is at or after the hub's position, so every round gets
        there unless the hub moved on meanwhile; a watcher already there joins without a
        read (a fleet opening at once costs the database nothing per watcher). The reads also cover the hub's topics, so the watcher's position
        keeps up with the hub's even when its own topics are quiet."""
        while True:
            final = self.horizon.final
            # Join when at the hub's position; with no hub position (no other watcher), when
            # at the final id: the watcher reads what lies before on its own.
            reached = self.position if self.position is not None else final.last_id if final else 0
            if w.position >= reached and self.try_join(w):
                return
            if final is None or final.last_id <= w.position:
                final = await self.final()  # a fresh observation (the hub may be ahead of it)
            topics = sorted(w.topics.union(self.topics))
            rows = await self.rt.read(
                partial(outbox.read_final, final=final, after=w.position, limit=READ_LIMIT, topics=topics)
            )
            last = _last_of({e.topic: e for e in rows}, w.topics)
            if last is not None:
                events = [x for x in (stream.convert(e) for e in rows if e.topic in w.topics) if w.matches(x)]
                for msg in _messages(events, last.id):
                    yield msg
                if not events:
                    yield Message([], last.id)  # a heartbeat, sent when one is due
                w.latest_cursor = last.id
            w.position = max(w.position, rows[-1].id if len(rows) == READ_LIMIT else final.last_id)

    async def subscribe(
        self,
        w: Watcher,
        stream: _Stream,
        *,
        heartbeat_seconds: float,
        cut_off: bool,
        cursor_rule: CursorRule | None,
    ) -> AsyncGenerator[Message, None]:
        """Messages for one watcher: catch-up reads, then the live feed. An idle watcher
        gets a heartbeat every `heartbeat_seconds`, or with `cursor_rule` only when its
        cursor has moved as far as the rule says (the first message excepted)."""
        loop = asyncio.get_running_loop()
        sent = w.latest_cursor
        last_sent = told = loop.time()
        greeted = False  # a first message went out
        try:
            while True:
                async with contextlib.aclosing(self._catch_up(w, stream)) as catching_up:
                    async for msg in catching_up:
                        if not msg.events and loop.time() - last_sent < heartbeat_seconds:
                            continue
                        yield msg
                        sent, last_sent = msg.cursor, loop.time()
                        told, greeted = last_sent, True
                while True:
                    try:
                        async with asyncio.timeout(max(0.0, last_sent + heartbeat_seconds - loop.time())):
                            queued = await w.queue.get()
                    except TimeoutError:
                        # Queue empty: everything dispatched was sent; tell the cursor.
                        cursor = self.cursor_of(w)
                        if (
                            not greeted
                            or cursor_rule is None
                            or cursor_rule.due(cursor - sent, loop.time() - told)
                        ):
                            sent = cursor
                            yield Message([], sent)
                            told, greeted = loop.time(), True
                        last_sent = loop.time()
                        continue
                    if queued is None:
                        break
                    w.queued_events -= len(queued.events)
                    yield queued
                    sent, last_sent = queued.cursor, loop.time()
                    told, greeted = last_sent, True
                # The buffer overflowed.
                if cut_off:
                    raise ResourceExhausted(
                        "WATCHER_TOO_SLOW",
                        f"the watcher fell more than {w.max_events} events behind; resume from cursor {sent}",
                        metadata={"cursor": str(sent)},
                    )
                self.leave(w)
                self.fallbacks += 1
                w.restart_from(sent)
        finally:
            self.leave(w)


def _last_of(last_of: dict[str, outbox.StoredEvent], topics: frozenset[str]) -> outbox.StoredEvent | None:
    """The newest of the events `last_of` holds for `topics`."""
    found = [last_of[t] for t in topics if t in last_of]
    return max(found, key=lambda e: e.id) if found else None


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
    cursor_rule: CursorRule,
) -> AsyncIterator[Message]:
    """WatchStockChanges: messages of domain.inventory.watch StockEvents; an idle watcher is
    told its advanced cursor as `cursor_rule` says.

    Raises ResourceExhausted WATCHER_TOO_SLOW (metadata `cursor`) when the
    watcher's buffer overflows; it may resume from that cursor.
    """
    hub = hub_for(rt)
    if after_event_id == 0:
        # The first heartbeat names the newest event before the start: a cursor to resume after.
        start, cursor = await hub.start()
    else:
        start = cursor = await hub.resume(after_event_id, stock_watch.resume_after)
    w = Watcher(_STOCK_TOPICS, flt.skus, flt.matches, start, max_events)
    w.latest_cursor = cursor
    messages = hub.subscribe(
        w, _STOCK, heartbeat_seconds=heartbeat_seconds, cut_off=True, cursor_rule=cursor_rule
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
    hub = hub_for(rt)
    if after_event_id <= 0:
        start, cursor = await hub.start()
    else:
        start = cursor = await hub.resume(after_event_id, order_watch.resume_after)
    w = Watcher(flt.topics, frozenset({flt.channel}), flt.matches, start, ORDER_BUFFER_EVENTS)
    w.latest_cursor = cursor
    messages = hub.subscribe(w, _ORDERS, heartbeat_seconds=heartbeat_seconds, cut_off=False, cursor_rule=None)
    async with contextlib.aclosing(messages):
        async for msg in messages:
            yield msg
