"""Outbox: events written in the same transaction as the change they describe.

Ordering. `id` comes from a sequence, so ids are not commit-ordered: a
transaction can take id 10, and commit after another took and committed 11.
Each row therefore records its transaction id (`txid`, xid8), and every reader
goes through one read, `read_epoch`: the events whose transactions are visible
in one observed snapshot (`end`) and not in an earlier one (`start`), with ids
in a range, in id order. Within what it returns, the id order of one
aggregate's events is their commit order: writers draw an aggregate's id while
holding its row lock (docs/events.md "Order"). What differs between readers is
how they bound what they read:
- the event relay (server/relay.py, domain/platform/relay.py) reads epochs:
  between two snapshots it observed, each epoch whole before the next;
- the watch hub (server/watch_hub.py) reads in plain id order up to a final id
  (`Horizon`): an id up to which every transaction that drew an id has ended,
  so no smaller id can still appear. Resuming after an id is then a question
  of ids alone, the same on every replica: WatchStockChanges' and
  WatchOrderEvents' cursors are event ids.

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
# id (no sort of the epoch, whatever its size); the watch hub's form reads only its topics.
_PAGE = """
    SELECT id, txid::text::bigint AS txid, topic, aggregate_type, aggregate_id, channel, payload, created_at
    {epoch} AND id > :after AND id <= :last {topics}
    ORDER BY id
    LIMIT :limit
    """
_READ_EPOCH = text(_PAGE.format(epoch=_EPOCH, topics=""))
_READ_EPOCH_TOPICS = text(_PAGE.format(epoch=_EPOCH, topics="AND topic = ANY(:topics)"))

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

_EXISTING = text("SELECT id FROM platform.outbox WHERE id = ANY(:ids)")

# The newest event up to an id: one backward step on the primary key.
_NEWEST = text("SELECT coalesce(max(id), 0) FROM platform.outbox WHERE id <= :last")

# The highest id ever drawn (its transaction running, committed or rolled back; purged or not).
_DRAWN = text("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM platform.outbox_id_seq")

# A snapshot and its xmin: every transaction below xmin has ended.
_SNAPSHOT_XMIN = text(
    "SELECT CAST(s AS text), pg_snapshot_xmin(s)::text::bigint FROM pg_current_snapshot() AS s"
)

# The same, and a transaction id of the observer's own: above every one assigned before.
_SNAPSHOT_XMIN_XID = text(
    """
    SELECT CAST(s AS text), pg_snapshot_xmin(s)::text::bigint, pg_current_xact_id()::text::bigint
    FROM pg_current_snapshot() AS s
    """
)

# Observations kept while waiting for their transactions to end (more are merged: a
# merged observation becomes final later, never wrongly).
_PENDING_MAX = 64


@dataclass(frozen=True)
class Final:
    """Every event with an id up to `last_id` has committed or never will, and snapshot
    `snapshot` (pg_snapshot text) sees every one that committed: the epoch
    (EMPTY_SNAPSHOT, snapshot] holds them all."""

    last_id: int
    snapshot: str


class Horizon:
    """The final id of the outbox (`Final`), from observations (`observe_horizon`).

    An observation reads the highest id drawn so far, then takes a transaction id of
    its own. An event's transaction had its transaction id before it drew the event's
    id (the outbox's id default assigns it first, migration platform_0003), and ids
    are assigned in order, so every id up to the one read belongs to a transaction
    below the observer's. (A snapshot's xmax would not do: it is one past the newest
    transaction that ended, and a running one above it is in no snapshot's list.)
    Once a later snapshot's xmin is above the observer's transaction id, all of them
    have ended: the observation is final. Until then it waits here (`pending`); an
    observation that finds no new id takes no transaction id."""

    def __init__(self) -> None:
        self.final: Final | None = None
        # (highest id drawn, the observer's transaction id), oldest first.
        self._pending: list[tuple[int, int]] = []

    @property
    def pending(self) -> bool:
        """Whether an observation waits for running transactions to end."""
        return bool(self._pending)

    def known(self) -> int:
        """The highest id observed so far (-1: none)."""
        if self._pending:
            return self._pending[-1][0]
        return self.final.last_id if self.final else -1

    def observe(self, drawn: int, xid: int | None, snapshot: str, xmin: int) -> Final | None:
        """Take one observation: `drawn`, then (when it is above `known()`) the observer's
        transaction id `xid`, and a snapshot taken after `drawn` was read, with its xmin."""
        if xid is not None and drawn > self.known():
            self._pending.append((drawn, xid))
            if len(self._pending) > _PENDING_MAX:
                del self._pending[-2]
        ended = [d for d, x in self._pending if x < xmin]
        if ended:
            self._pending = [(d, x) for d, x in self._pending if x >= xmin]
            last = max(ended)
            if self.final is None or last >= self.final.last_id:
                self.final = Final(last, snapshot)
        return self.final


async def observe_horizon(session: AsyncSession, horizon: Horizon) -> Final | None:
    """One observation into `horizon` (the id, then the snapshot and, when new ids were
    drawn, a transaction id); its final id, None while no observation has become final."""
    drawn = int((await session.execute(_DRAWN)).scalar_one())
    if drawn > horizon.known():
        snapshot, xmin, xid = (await session.execute(_SNAPSHOT_XMIN_XID)).one()
        return horizon.observe(drawn, int(xid), str(snapshot), int(xmin))
    snapshot, xmin = (await session.execute(_SNAPSHOT_XMIN)).one()
    return horizon.observe(drawn, None, str(snapshot), int(xmin))


async def last_drawn_id(session: AsyncSession) -> int:
    """The highest id ever drawn: above it, no event was ever written."""
    return int((await session.execute(_DRAWN)).scalar_one())


async def newest_id(session: AsyncSession, last: int) -> int:
    """The newest event id up to `last` (0: none)."""
    return int((await session.execute(_NEWEST, {"last": last})).scalar_one())


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
    session: AsyncSession,
    start: str,
    end: str,
    after: int,
    last: int,
    limit: int,
    topics: Sequence[str] | None = None,
) -> list[StoredEvent]:
    """Events committed in the epoch (start, end] of snapshots, with an id above `after`
    and at most `last`, in id order; of `topics` only, when given."""
    args: dict[str, object] = {"start": start, "end": end, "after": after, "last": last, "limit": limit}
    if topics is None:
        result = await session.execute(_READ_EPOCH, args)
    else:
        result = await session.execute(_READ_EPOCH_TOPICS, {**args, "topics": list(topics)})
    return [StoredEvent(*row) for row in result.all()]


async def read_final(
    session: AsyncSession, final: Final, after: int, limit: int, topics: Sequence[str]
) -> list[StoredEvent]:
    """Events of `topics` with an id above `after` and at most `final.last_id`, in id
    order: the epoch (EMPTY_SNAPSHOT, final.snapshot] holds every one of them."""
    return await read_epoch(session, EMPTY_SNAPSHOT, final.snapshot, after, final.last_id, limit, topics)


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


async def existing(session: AsyncSession, event_ids: Sequence[int]) -> set[int]:
    """Those of `event_ids` that are in the outbox (not unknown, not purged)."""
    return {int(i) for i in (await session.execute(_EXISTING, {"ids": list(event_ids)})).scalars()}


async def exists(session: AsyncSession, event_id: int) -> bool:
    """Whether event `event_id` is in the outbox (not unknown, not purged)."""
    return event_id in await existing(session, [event_id])


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
