"""Outbox: events written in the same transaction as the change they describe.

Ordering. `id` comes from a sequence, so ids are not commit-ordered: a
transaction can take id 10, and commit after another took and committed 11.
Each row therefore records its transaction id (`txid`, xid8). A reader only
delivers rows whose transaction is older than the oldest transaction still
running (`pg_snapshot_xmin(pg_current_snapshot())`), in (txid, id) order. No
transaction that can still commit has a txid below that horizon, so the
delivered sequence is a stable prefix: resuming after (txid, id) loses
nothing and repeats nothing, on any replica.

Wake-ups. A NOTIFY sent inside a writing transaction holds a cluster-wide
lock through its commit, which would serialise every writer. So writers only
mark their session (`mark_written`, done by `emit_many`); after such a
session commits, the process's notifier sends one debounced
`NOTIFY entrepot_outbox` of its own (see server/notifier.py). Readers LISTEN
and also poll on a timer, so a lost wake-up only delays delivery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event, insert, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from domain.shared.models import OutboxEvent

NOTIFY_CHANNEL = "entrepot_outbox"
_WRITTEN = "entrepot_outbox_written"
_commit_hooks: list[Callable[[], None]] = []


def mark_written(session: AsyncSession) -> None:
    """Call after inserting outbox rows by hand (emit_many does it)."""
    session.info[_WRITTEN] = True


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


async def emit(session: AsyncSession, event: Event) -> None:
    await emit_many(session, [event])


async def emit_many(session: AsyncSession, events: Iterable[Event]) -> None:
    rows = [
        {
            "topic": e.topic,
            "aggregate_type": e.aggregate_type,
            "aggregate_id": e.aggregate_id,
            "channel": e.channel,
            "payload": e.payload,
        }
        for e in events
    ]
    if rows:
        await session.execute(insert(OutboxEvent), rows)
        mark_written(session)


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
