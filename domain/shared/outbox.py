"""Outbox: events written in the same transaction as the change they describe.

Ordering. `id` comes from a sequence, so ids are not commit-ordered: a
transaction can take id 10, and commit after another took and committed 11.
Each row therefore records its transaction id (`txid`, xid8). A reader only
delivers rows whose transaction is older than the oldest transaction still
running (`pg_snapshot_xmin(pg_current_snapshot())`), in (txid, id) order. No
transaction that can still commit has a txid below that horizon, so the
delivered sequence is a stable prefix: resuming after (txid, id) loses
nothing and repeats nothing, on any replica. That order is not commit order
per aggregate (a transaction can take its txid before it waits for the
aggregate's lock); the event relay, which must keep that order, reads in epochs
instead (`read_epoch` below, docs/events.md "Order").

Writing. Every row is written by the one INSERT of `cte`: `emit` / `emit_many`
run it on their own (one event, or many in order); hot paths fold it into
their own statement as a CTE, with `params` for its parameters. Payloads are
built in Python (the events given to `params`) or, when they carry ids the
statement itself draws, by the statement's `derived` SELECT (one builder per
topic: inventory.stock_changed in domain/inventory/ledger.py, the order
status events in domain/order/store/entries.py).

Wake-ups. A NOTIFY sent inside a writing transaction holds a cluster-wide
lock through its commit, which would serialise every writer. So the writer
only marks its session (`params` does it, so no writer can forget); after
such a session commits, the process's notifier sends one debounced
`NOTIFY entrepot_outbox` of its own (see server/notifier.py). Readers LISTEN
and also poll on a timer, so a lost wake-up only delays delivery.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

NOTIFY_CHANNEL = "entrepot_outbox"
_WRITTEN = "entrepot_outbox_written"
_commit_hooks: list[Callable[[], None]] = []


def on_outbox_commit(hook: Callable[[], None]) -> None:
    """Register a callback run after every commit that wrote outbox rows."""
    _commit_hooks.append(hook)


def remove_outbox_commit_hook(hook: Callable[[], None]) -> None:
    if hook in _commit_hooks:
        _commit_hooks.remove(hook)


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.info.pop(_WRITTEN, False):
        for hook in _commit_hooks:
            hook()


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_WRITTEN, None)


@dataclass(frozen=True)
class Event:
    topic: str
    aggregate_type: str
    aggregate_id: str
    payload: dict[str, Any]
    channel: str | None = None


def cte(name: str = "o", *, derived: str = "", when: str = "", events: bool = True) -> str:
    """The one INSERT INTO platform.outbox, as the CTE `name` of a larger statement.

    It writes, in this order (ids follow it): the events given to `params`
    (payloads built in Python), then the rows of `derived`, a SELECT of
    (k, topic, aggregate_type, aggregate_id, channel, payload) ordered by k,
    for payloads built from rows the statement writes itself (ids it draws).
    `when`: a condition on the statement's other CTEs for the `params` events
    (e.g. "EXISTS (SELECT FROM o)" to write them only when a row was inserted).
    `events=False`: the statement writes only `derived` rows (no unnest of
    empty arrays in its plan). The parameters are named `<name>_...` and come
    only from `params`."""
    if not events:
        return f"""{name} AS (
        INSERT INTO platform.outbox (topic, aggregate_type, aggregate_id, channel, payload)
        SELECT d.topic, d.aggregate_type, d.aggregate_id, d.channel, d.payload
        FROM ({derived}) AS d(k, topic, aggregate_type, aggregate_id, channel, payload)
        ORDER BY d.k
    )"""
    rows = f"""SELECT 0 AS part, e.k, e.topic, e.aggregate_type, e.aggregate_id, e.channel, e.payload
            FROM unnest(CAST(:{name}_topic AS text[]), CAST(:{name}_aggregate_type AS text[]),
                        CAST(:{name}_aggregate_id AS text[]), CAST(:{name}_channel AS text[]),
                        CAST(:{name}_payload AS jsonb[]))
                 WITH ORDINALITY AS e(topic, aggregate_type, aggregate_id, channel, payload, k)"""
    if when:
        rows += f"\n            WHERE {when}"
    if derived:
        rows += f"\n            UNION ALL SELECT 1, d.* FROM ({derived}) AS d"
    return f"""{name} AS (
        INSERT INTO platform.outbox (topic, aggregate_type, aggregate_id, channel, payload)
        SELECT r.topic, r.aggregate_type, r.aggregate_id, r.channel, r.payload
        FROM ({rows}) AS r
        ORDER BY r.part, r.k
    )"""


def params(
    session: AsyncSession, events: Sequence[Event] = (), *, name: str = "o", derived_rows: int = 0
) -> dict[str, object]:
    """The parameters of `cte(name)` for `events`, and the wake-up: when the
    statement writes rows (`events`, or `derived_rows` > 0 from its `derived`
    SELECT), the process's notifier is poked after the session commits."""
    if events or derived_rows:
        session.info[_WRITTEN] = True
    return {
        f"{name}_topic": [e.topic for e in events],
        f"{name}_aggregate_type": [e.aggregate_type for e in events],
        f"{name}_aggregate_id": [e.aggregate_id for e in events],
        f"{name}_channel": [e.channel for e in events],
        f"{name}_payload": [json.dumps(e.payload) for e in events],
    }


_EMIT = text(f"WITH {cte()} SELECT 1")


async def emit(session: AsyncSession, event: Event) -> None:
    await emit_many(session, [event])


async def emit_many(session: AsyncSession, events: Iterable[Event]) -> None:
    """Writes `events` in the session's transaction, in order."""
    batch = list(events)
    if batch:
        await session.execute(_EMIT, params(session, batch))


@dataclass(frozen=True)
class StoredEvent:
    id: int
    txid: int
    topic: str
    aggregate_type: str
    aggregate_id: str
    channel: str | None
    payload: dict[str, Any]
    created_at: datetime

    @property
    def position(self) -> tuple[int, int]:
        """Where it stands in delivery order: (txid, id)."""
        return (self.txid, self.id)


_READ = text(
    """
    SELECT id, txid::text::bigint AS txid, topic, aggregate_type, aggregate_id, channel, payload, created_at
    FROM platform.outbox
    WHERE (txid, id) > (CAST(CAST(:txid AS text) AS xid8), :id)
      AND txid < pg_snapshot_xmin(pg_current_snapshot())
      AND topic = ANY(:topics)
    ORDER BY txid, id
    LIMIT :limit
    """
)

# The event relay's reads (server/relay.py, domain/platform/relay.py): epochs. An epoch
# is the set of events whose transactions are visible in snapshot :end but not in
# snapshot :start (pg_snapshot values the relay observed, :start before :end): every
# transaction of an epoch has ended, so the epoch is final, and it is read in id order.
# Why that order is commit order per aggregate: docs/events.md "Order".
_EPOCH = """
    FROM platform.outbox
    WHERE pg_visible_in_snapshot(txid, CAST(CAST(:end AS text) AS pg_snapshot))
      AND NOT pg_visible_in_snapshot(txid, CAST(CAST(:start AS text) AS pg_snapshot))"""

# The first and last id of an epoch: a range scan of the txid index (the epoch's txids lie
# in [xmin(:start), xmax(:end)); index-only, once per epoch). OFFSET 0 keeps the rows
# found that way: without it the planner answers min and max by walking the primary key
# from either end, through every older event.
_EPOCH_IDS = text(
    f"""
    SELECT min(id), max(id) FROM (
        SELECT id {_EPOCH}
          AND txid >= pg_snapshot_xmin(CAST(CAST(:start AS text) AS pg_snapshot))
          AND txid < pg_snapshot_xmax(CAST(CAST(:end AS text) AS pg_snapshot))
        OFFSET 0) AS e
    """
)

# A page: the primary key walked in id order between the page's start and the epoch's last
# id (no sort of the epoch, whatever its size).
_READ_EPOCH = text(
    f"""
    SELECT id, txid::text::bigint AS txid, topic, aggregate_type, aggregate_id, channel, payload, created_at
    {_EPOCH} AND id > :after AND id <= :last
    ORDER BY id
    LIMIT :limit
    """
)

_IN_EPOCH = text(f"SELECT 1 {_EPOCH} AND id = :id")

_SNAPSHOT = text("SELECT CAST(pg_current_snapshot() AS text)")

# What an epoch cursor has still to publish: the rest of its epoch (id > :after) and every
# event not visible in :end (a later epoch). Both lie at txid >= xmin(:start) (the
# txid index's range); counted up to :cap, with the age of the oldest of those counted.
_BACKLOG_EPOCH = text(
    """
    SELECT count(*), extract(epoch FROM now() - min(created_at)) FROM (
        SELECT created_at FROM platform.outbox
        WHERE txid >= pg_snapshot_xmin(CAST(CAST(:start AS text) AS pg_snapshot))
          AND NOT pg_visible_in_snapshot(txid, CAST(CAST(:start AS text) AS pg_snapshot))
          AND (id > :after OR NOT pg_visible_in_snapshot(txid, CAST(CAST(:end AS text) AS pg_snapshot)))
        LIMIT :cap) AS b
    """
)

# A snapshot in which no transaction is visible: the start of the first epoch.
EMPTY_SNAPSHOT = "1:1:"

_POSITION = text("SELECT txid::text::bigint FROM platform.outbox WHERE id = :id")

# The last committed event in delivery order: one backward step on ix_outbox_txid_id
# (max() over a cast read the whole table).
_HEAD = text(
    """
    SELECT o.txid::text::bigint AS last_txid, o.id FROM platform.outbox o
    WHERE o.txid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY o.txid DESC, o.id DESC LIMIT 1
    """
)


async def read_after(
    session: AsyncSession, position: tuple[int, int], topics: Sequence[str], limit: int
) -> list[StoredEvent]:
    """Committed events after `position` = (txid, id), in delivery order."""
    result = await session.execute(
        _READ, {"txid": str(position[0]), "id": position[1], "topics": list(topics), "limit": limit}
    )
    return [StoredEvent(*row) for row in result.all()]


async def current_snapshot(session: AsyncSession) -> str:
    """The snapshot of transactions this statement sees as ended (pg_snapshot, as text):
    the end of a new epoch."""
    return str((await session.execute(_SNAPSHOT)).scalar_one())


async def epoch_ids(session: AsyncSession, start: str, end: str) -> tuple[int, int] | None:
    """The first and last event id of the epoch (start, end] of snapshots; None when it
    holds no event."""
    first, last = (await session.execute(_EPOCH_IDS, {"start": start, "end": end})).one()
    return None if first is None else (int(first), int(last))


async def read_epoch(
    session: AsyncSession, start: str, end: str, after: int, last: int, limit: int
) -> list[StoredEvent]:
    """Events of every topic committed in the epoch (start, end] of snapshots, with an id
    above `after` and at most `last`, in id order."""
    result = await session.execute(
        _READ_EPOCH, {"start": start, "end": end, "after": after, "last": last, "limit": limit}
    )
    return [StoredEvent(*row) for row in result.all()]


async def in_epoch(session: AsyncSession, start: str, end: str, event_id: int) -> bool:
    """Whether event `event_id` exists and belongs to the epoch (start, end]."""
    found = await session.execute(_IN_EPOCH, {"start": start, "end": end, "id": event_id})
    return found.scalar_one_or_none() is not None


async def backlog_of_epoch(
    session: AsyncSession, start: str, end: str, after: int, cap: int
) -> tuple[int, float]:
    """(events after id `after` of the epoch (start, end] and of every later epoch, counted
    up to `cap`; seconds since the oldest of those counted was written, 0 when none)."""
    count, age = (
        await session.execute(_BACKLOG_EPOCH, {"start": start, "end": end, "after": after, "cap": cap})
    ).one()
    return int(count), float(age or 0.0)


async def position_of(session: AsyncSession, event_id: int) -> tuple[int, int] | None:
    """The (txid, id) position of an event id, or None when it is unknown or purged."""
    txid = (await session.execute(_POSITION, {"id": event_id})).scalar_one_or_none()
    return None if txid is None else (int(txid), event_id)


async def head_position(session: AsyncSession) -> tuple[int, int]:
    """A position at or after every event committed so far ("from now on")."""
    last = (await session.execute(_HEAD)).one_or_none()
    return (int(last[0]), int(last[1])) if last else (0, 0)


async def purge_older_than(session: AsyncSession, age: timedelta, limit: int = 10_000) -> int:
    """Delete outbox events older than the retention (watchers resuming from a purged
    cursor get OUT_OF_RANGE and restart from now)."""
    result = await session.execute(
        text(
            """
            DELETE FROM platform.outbox WHERE id = ANY(ARRAY(
                SELECT id FROM platform.outbox
                WHERE created_at < now() - make_interval(secs => :secs)
                ORDER BY id LIMIT :limit))
            """
        ),
        {"secs": age.total_seconds(), "limit": limit},
    )
    return int(getattr(result, "rowcount", 0) or 0)
