"""The event relay's cursor, per relay (sink and stream; server/relay.py publishes): the
epoch it is publishing and the id of the last event of that epoch the broker acknowledged.

An epoch (domain/shared/outbox.py) is the set of outbox events whose transactions are
visible in snapshot `end` and not in snapshot `start`; epoch n+1 starts at epoch n's `end`
with a snapshot observed when it begins. Its events are final and published in id order,
which is commit order per aggregate (docs/events.md "Order"). An epoch is stored here
before any of its events is published, so the number carried by each message
(`Entrepot-Position: epoch:id`) names the same epoch for a relay that takes over.

Only the holder of the relay's lease (domain.shared.leases) moves the cursor, and only
forward: each write renews the lease in the same transaction, so a relay that lost its
lease (paused, partitioned) can no longer write it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.shared import leases, outbox

# Backlogs are counted up to this many events (every replica counts once a second, and
# the count reads the index that far).
BACKLOG_CAP = 100_000

_LOAD = text(
    """
    SELECT epoch, CAST(epoch_start AS text), CAST(epoch_end AS text), last_id, event_id
    FROM platform.relay_cursors WHERE name = :name
    """
)

# The next epoch, only from the epoch the caller read (another writer moved it otherwise).
_BEGIN = text(
    """
    INSERT INTO platform.relay_cursors AS c (name, epoch, epoch_start, epoch_end, last_id, event_id)
    VALUES (
        :name, :epoch + 1, CAST(CAST(:start AS text) AS pg_snapshot),
        CAST(CAST(:end AS text) AS pg_snapshot), :last, :after)
    ON CONFLICT (name) DO UPDATE
        SET epoch = EXCLUDED.epoch, epoch_start = EXCLUDED.epoch_start, epoch_end = EXCLUDED.epoch_end,
            last_id = EXCLUDED.last_id, event_id = EXCLUDED.event_id, updated_at = now()
        WHERE c.epoch = :epoch
    RETURNING 1
    """
)

_ADVANCE = text(
    """
    UPDATE platform.relay_cursors
    SET event_id = :id, published = published + :published, updated_at = now()
    WHERE name = :name AND epoch = :epoch AND event_id < :id
    """
)


@dataclass(frozen=True)
class Cursor:
    """Epoch `epoch` = events visible in snapshot `end` and not in `start` (pg_snapshot
    text), the last of them `last_id`; `event_id`: the last of them the broker
    acknowledged (below the epoch's first id: none yet)."""

    epoch: int
    start: str
    end: str
    last_id: int
    event_id: int

    @property
    def done(self) -> bool:
        return self.event_id >= self.last_id

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, event id): increases with every event published."""
        return (self.epoch, self.event_id)


# Before the first event: an empty epoch 0; epoch 1 holds everything retained.
START = Cursor(0, outbox.EMPTY_SNAPSHOT, outbox.EMPTY_SNAPSHOT, 0, 0)


@dataclass(frozen=True)
class Backlog:
    """Events committed after the cursor (counted up to BACKLOG_CAP), and how long the
    oldest of them has waited (seconds)."""

    events: int
    seconds: float


def lease_name(relay: str) -> str:
    return f"relay:{relay}"


async def cursor(session: AsyncSession, relay: str) -> Cursor:
    """Where `relay` stands; START before its first epoch."""
    row = (await session.execute(_LOAD, {"name": relay})).one_or_none()
    return Cursor(int(row[0]), str(row[1]), str(row[2]), int(row[3]), int(row[4])) if row else START


async def begin_epoch(
    session: AsyncSession,
    relay: str,
    holder: str,
    ttl: timedelta,
    current: Cursor,
    end: str,
    ids: tuple[int, int],
) -> Cursor | None:
    """Renew `holder`'s lease and store the epoch after `current`, ending at snapshot
    `end`, its events' ids from ids[0] to ids[1] (outbox.epoch_ids). None, and nothing
    written, when another holder owns the lease or the cursor is no longer at `current`."""
    if not await leases.try_acquire(session, lease_name(relay), holder, ttl):
        return None
    begun = Cursor(current.epoch + 1, current.end, end, ids[1], ids[0] - 1)
    found = await session.execute(
        _BEGIN,
        {
            "name": relay,
            "epoch": current.epoch,
            "start": begun.start,
            "end": begun.end,
            "last": begun.last_id,
            "after": begun.event_id,
        },
    )
    return begun if found.scalar_one_or_none() is not None else None


async def advance(
    session: AsyncSession,
    relay: str,
    holder: str,
    ttl: timedelta,
    current: Cursor,
    event_id: int,
    published: int,
) -> Cursor | None:
    """Renew `holder`'s lease on `relay` and move its cursor within `current`'s epoch to
    `event_id` (`published` more events). None, and nothing written, when another holder
    owns the lease. An id at or behind the cursor leaves it where it is."""
    if not await leases.try_acquire(session, lease_name(relay), holder, ttl):
        return None
    await session.execute(
        _ADVANCE, {"name": relay, "epoch": current.epoch, "id": event_id, "published": published}
    )
    return replace(current, event_id=max(current.event_id, event_id))


async def backlog(session: AsyncSession, relay: str) -> Backlog:
    """What `relay` has still to publish."""
    at = await cursor(session, relay)
    count, age = await outbox.backlog_of_epoch(session, at.start, at.end, at.event_id, BACKLOG_CAP)
    return Backlog(count, age)
