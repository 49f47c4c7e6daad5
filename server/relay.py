"""The event relay: every platform.outbox event published to a message broker, once, in
commit order per aggregate (docs/events.md).

- Order: the relay publishes epoch after epoch (domain/platform/relay.py): the events whose
  transactions ended between two snapshots it observed, each epoch in outbox id order.
  Epochs follow commit time, and within one the id order of an aggregate's events is their
  commit order (ids are drawn under the aggregate's lock): docs/events.md "Order".
- Exactly once: each event carries its outbox id as the broker's message id; the broker
  drops a message id it already stored (JetStream de-duplication), and the cursor moves
  only after the broker acknowledged. A relay that dies between the ack and the cursor
  write is followed by one that first asks the broker for the newest event it holds
  (`EventSink.last_published`: epoch and id) and moves the cursor there, so even a takeover
  after the de-duplication window publishes nothing twice. An epoch is stored before any
  of its events is published, so that epoch number always names a stored epoch.
- One relay across replicas: the job runs under a lease (server/background.py run_leased,
  domain/shared/leases.py); every cursor write renews the lease in the same transaction and
  is refused to a replica that lost it.
- Sinks: `EventSink` is all a broker needs to provide (NATS JetStream: server/nats_sink.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from domain.platform import relay as cursors
from domain.shared import outbox
from server import metrics
from server.runtime import Runtime
from server.settings import Settings

log = logging.getLogger("entrepot.relay")

# (epoch, event id): where a published event stands.
Position = tuple[int, int]


@dataclass(frozen=True)
class Published:
    """What the broker acknowledged of a batch: its first `acked` events (stored, or
    recognised as already stored: `duplicates` of them), and why it stopped short."""

    acked: int
    duplicates: int = 0
    error: Exception | None = None


class EventSink(Protocol):
    """A broker the relay publishes to."""

    # Names the relay's cursor and lease: one per broker and stream.
    name: str

    async def publish(self, events: Sequence[outbox.StoredEvent], epoch: int) -> Published:
        """Publish `events` (of relay epoch `epoch`) in order; the broker must store them in
        that order, with their position (epoch, id), and drop an event id it already
        holds. Returns how many leading events it acknowledged."""
        ...

    async def last_published(self) -> Position | None:
        """The position of the newest event the broker holds from this relay (None: none,
        or it cannot tell)."""
        ...

    async def close(self) -> None: ...


class LeaseLost(Exception):
    """Another replica holds the relay's lease: this one stops publishing."""


def relay_name(settings: Settings) -> str | None:
    """The configured relay's name (its cursor and lease), None when no relay is configured."""
    if settings.nats_url:
        return f"nats:{settings.events_stream}"
    return None


def make_sink(settings: Settings) -> EventSink | None:
    if settings.nats_url:
        from server.nats_sink import NatsSink

        return NatsSink(settings)
    return None


class Relay:
    def __init__(self, rt: Runtime, holder: str, sink: EventSink) -> None:
        self.rt = rt
        self.holder = holder
        self.sink = sink
        self.ttl = timedelta(seconds=rt.settings.relay_lease_seconds)
        # Ask the broker where it stands before the next batch: at start, and after any
        # failure or a gap longer than the lease (another relay may have published meanwhile).
        self.unsure = True
        self.last_step = 0.0

    async def step(self, rt: Runtime) -> int:
        """Publish what is committed, until caught up; the number of events acknowledged.
        Called by run_leased while this replica holds the lease."""
        now = asyncio.get_running_loop().time()
        if now - self.last_step > self.ttl.total_seconds():
            self.unsure = True  # the lease may have been another replica's meanwhile
        self.last_step = now
        try:
            return await self._publish_all()
        except BaseException:
            self.unsure = True
            raise

    async def _publish_all(self) -> int:
        name, limit = self.sink.name, self.rt.settings.relay_batch_size
        at = await self.rt.read(lambda s: cursors.cursor(s, name))
        if self.unsure:
            at = await self._catch_up_with_broker(at)
            self.unsure = False
        total = 0
        while True:
            if at.done:
                # The next epoch ends at a snapshot observed now.
                end, ids = await self.rt.read(partial(_next_epoch, at=at))
                if ids is None:
                    return total
                at = await self._begin_epoch(at, end, ids)
            events = await self.rt.read(partial(_read_epoch, at=at, limit=limit))
            if not events:
                # The rest of the epoch was purged (retention) before it was published.
                log.warning(
                    "events of the relay's epoch were purged before they were published",
                    extra={"relay": self.sink.name, "after": at.event_id, "last": at.last_id},
                )
                at = await self._advance(at, at.last_id, 0)
                continue
            result = await self.sink.publish(events, at.epoch)
            if result.acked:
                at = await self._advance(at, events[result.acked - 1].id, result.acked)
                total += result.acked
                metrics.RELAY_PUBLISHED.inc(result.acked)
                if result.duplicates:
                    metrics.RELAY_DUPLICATES.inc(result.duplicates)
                    log.info(
                        "the broker already held events of this batch",
                        extra={"relay": self.sink.name, "duplicates": result.duplicates},
                    )
            if result.error is not None:
                raise result.error
            if len(events) < limit and at.done:
                return total

    async def _begin_epoch(self, at: cursors.Cursor, end: str, ids: tuple[int, int]) -> cursors.Cursor:
        async with self.rt.uow() as uow:
            begun = await cursors.begin_epoch(
                uow.session, self.sink.name, self.holder, self.ttl, at, end, ids
            )
            await uow.commit()
        if begun is None:
            raise LeaseLost(f"the cursor of relay {self.sink.name} was moved by another replica")
        return begun

    async def _advance(self, at: cursors.Cursor, event_id: int, published: int) -> cursors.Cursor:
        async with self.rt.uow() as uow:
            moved = await cursors.advance(
                uow.session, self.sink.name, self.holder, self.ttl, at, event_id, published
            )
            await uow.commit()
        if moved is None:
            raise LeaseLost(f"the lease of relay {self.sink.name} is held by another replica")
        return moved

    async def _catch_up_with_broker(self, at: cursors.Cursor) -> cursors.Cursor:
        """Move the cursor to the newest event the broker already holds when it is ahead
        (a relay died after the broker's ack, before writing the cursor)."""
        held = await self.sink.last_published()
        if held is None or held <= at.position:
            return at
        epoch, event_id = held
        known = epoch == at.epoch and await self.rt.read(
            lambda s: outbox.in_epoch(s, at.start, at.end, event_id)
        )
        if not known:
            # An epoch this cursor never stored (another database used the same stream).
            log.warning(
                "the broker's newest event is not in this relay's epoch; not moving the cursor",
                extra={"relay": self.sink.name, "epoch": epoch, "event_id": event_id},
            )
            return at
        at = await self._advance(at, event_id, 0)
        log.info(
            "cursor moved to the broker's newest event", extra={"relay": self.sink.name, "event_id": event_id}
        )
        return at

    async def close(self) -> None:
        await self.sink.close()


async def _read_epoch(session: AsyncSession, at: cursors.Cursor, limit: int) -> list[outbox.StoredEvent]:
    return await outbox.read_epoch(session, at.start, at.end, at.event_id, at.last_id, limit)


async def _next_epoch(session: AsyncSession, at: cursors.Cursor) -> tuple[str, tuple[int, int] | None]:
    end = await outbox.current_snapshot(session)
    return end, await outbox.epoch_ids(session, at.end, end)


async def backlog(rt: Runtime) -> cursors.Backlog | None:
    """What the configured relay has still to publish (None: no relay configured); also
    sets the lag gauges."""
    name = relay_name(rt.settings)
    if name is None:
        return None
    found = await rt.read(lambda s: cursors.backlog(s, name))
    metrics.RELAY_LAG_EVENTS.set(found.events)
    metrics.RELAY_LAG_SECONDS.set(found.seconds)
    return found
