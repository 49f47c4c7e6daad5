"""The event relay's cursor: the position (txid, event id) of the last outbox event the
broker acknowledged, per relay (sink and stream; server/relay.py publishes).

Only the holder of the relay's lease (domain.shared.leases) moves it, and only forward:
`advance` renews the lease and moves the cursor in one transaction, so a relay that lost
its lease (paused, partitioned) can no longer write it. Delivery order and the horizon
rule are the outbox's (domain/shared/outbox.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.shared import leases, outbox

Position = tuple[int, int]

# Backlogs are counted up to this many events (every replica counts once a second, and
# the count reads the index that far).
BACKLOG_CAP = 100_000

_LOAD = text("SELECT txid::text::bigint, event_id FROM platform.relay_cursors WHERE name = :name")

_ADVANCE = text(
    """
    INSERT INTO platform.relay_cursors AS c (name, txid, event_id, published)
    VALUES (:name, CAST(CAST(:txid AS text) AS xid8), :id, :published)
    ON CONFLICT (name) DO UPDATE
        SET txid = EXCLUDED.txid, event_id = EXCLUDED.event_id,
            published = c.published + EXCLUDED.published, updated_at = now()
        WHERE (c.txid, c.event_id) < (EXCLUDED.txid, EXCLUDED.event_id)
    RETURNING 1
    """
)


@dataclass(frozen=True)
class Backlog:
    """Events committed after the cursor (counted up to BACKLOG_CAP), and how long the
    first of them has waited (seconds)."""

    events: int
    seconds: float


def lease_name(relay: str) -> str:
    return f"relay:{relay}"


async def cursor(session: AsyncSession, relay: str) -> Position:
    """Where `relay` stands; (0, 0) before its first event: it starts at the oldest retained."""
    row = (await session.execute(_LOAD, {"name": relay})).one_or_none()
    return (int(row[0]), int(row[1])) if row else (0, 0)


async def advance(
    session: AsyncSession, relay: str, holder: str, ttl: timedelta, position: Position, published: int
) -> bool:
    """Renew `holder`'s lease on `relay` and move its cursor forward to `position`
    (`published` more events). False, and nothing written, when another holder owns the
    lease. A position at or behind the cursor leaves it where it is."""
    if not await leases.try_acquire(session, lease_name(relay), holder, ttl):
        return False
    await session.execute(
        _ADVANCE, {"name": relay, "txid": str(position[0]), "id": position[1], "published": published}
    )
    return True


async def backlog(session: AsyncSession, relay: str) -> Backlog:
    """What `relay` has still to publish."""
    count, age = await outbox.backlog_after(session, await cursor(session, relay), BACKLOG_CAP)
    return Backlog(count, age)
