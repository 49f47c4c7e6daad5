"""WatchOrderEvents: what a watcher sees of the outbox (filter, where a cursor resumes).

The tailing itself (one LISTEN connection and one reader per server process,
shared with WatchStockChanges) lives in server/watch_hub.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.types import TOPICS
from domain.shared.errors import OutOfRange
from domain.shared.outbox import StoredEvent, exists


@dataclass(frozen=True)
class Filter:
    channel: str
    topics: frozenset[str]
    order_id: str = ""

    def matches(self, e: StoredEvent) -> bool:
        return e.channel == self.channel and (not self.order_id or e.aggregate_id == self.order_id)


def make_filter(channel: str, topics: Sequence[str] = TOPICS, order_id: str = "") -> Filter:
    """The channel's events of `topics` (the order topics among them; none: all)."""
    return Filter(channel, frozenset([t for t in topics if t in TOPICS] or TOPICS), order_id)


async def resume_after(session: AsyncSession, after_event_id: int) -> int:
    """Where a watcher resuming after `after_event_id` (> 0) starts: that id."""
    if not await exists(session, after_event_id):
        raise OutOfRange(
            "UNKNOWN_EVENT_ID",
            f"event {after_event_id} is unknown or no longer retained; resume from 0 (now) instead",
            metadata={"after_event_id": str(after_event_id)},
        )
    return after_event_id
