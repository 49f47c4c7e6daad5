"""Allocation per channel: the warehouses a channel sells from, in its order,
and its allocation strategy (docs/allocation.md).

The setting is read by the reserve path inside its locking statement
(reservation_store.load_for_plan) and applied by allocation.allocate; the
functions here set and read it, and answer which warehouses a channel sells
from for the stock reads. A channel without a setting allocates from every
active warehouse by (priority, code), strategy "priority".
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.inventory.types import STRATEGIES, ChannelAllocation
from domain.inventory.validation import check_text, check_warehouse_code, filters_or_raise
from domain.shared.errors import NotFound, Violations
from domain.shared.outbox import Event, emit

MAX_CHANNEL_WAREHOUSES = 100

# The channel (platform.channels: the allocation setting belongs to an existing
# channel) and its setting, if any.
_GET = text(
    """SELECT c.slug, a.warehouse_codes, a.strategy, a.updated_at
       FROM platform.channels c LEFT JOIN inventory.channel_allocations a ON a.channel_slug = c.slug
       WHERE c.slug = :slug"""
)
_KNOWN_WAREHOUSES = text("SELECT code FROM inventory.warehouses WHERE code = ANY(CAST(:codes AS text[]))")
_UPSERT = text(
    """INSERT INTO inventory.channel_allocations (channel_slug, warehouse_codes, strategy)
       VALUES (:slug, CAST(:codes AS text[]), :strategy)
       ON CONFLICT (channel_slug) DO UPDATE
       SET warehouse_codes = excluded.warehouse_codes, strategy = excluded.strategy, updated_at = now()
       RETURNING channel_slug, warehouse_codes, strategy, updated_at"""
)
# The warehouses a channel allocates from, in its PRIORITY order (the same rule
# as allocation._Plan: the list's active warehouses, or every active one by
# (priority, code)). No row: the channel does not exist; a NULL code: none.
_SELLABLE = text(
    """WITH ch AS (
           SELECT c.slug, coalesce(a.warehouse_codes, '{}') AS codes
           FROM platform.channels c LEFT JOIN inventory.channel_allocations a ON a.channel_slug = c.slug
           WHERE c.slug = :slug
       )
       SELECT ch.slug, w.code
       FROM ch LEFT JOIN inventory.warehouses w
            ON w.active AND (cardinality(ch.codes) = 0 OR w.code = ANY(ch.codes))
       ORDER BY array_position(ch.codes, w.code), w.priority, w.code"""
)


def _channel_not_found(slug: str) -> NotFound:
    return NotFound("CHANNEL_NOT_FOUND", f"channel {slug!r} does not exist", metadata={"slug": slug})


async def get_channel_allocation(session: AsyncSession, channel: str) -> ChannelAllocation:
    """The channel's setting (the default one when it was never set)."""
    filters_or_raise(channel=channel)
    row = (await session.execute(_GET, {"slug": channel})).one_or_none()
    if row is None:
        raise _channel_not_found(channel)
    if row.strategy is None:
        return ChannelAllocation(channel)
    return ChannelAllocation(channel, tuple(row.warehouse_codes), row.strategy, row.updated_at)


async def set_channel_allocation(
    session: AsyncSession, *, channel: str, warehouse_codes: Sequence[str], strategy: str = "priority"
) -> ChannelAllocation:
    """Replace the channel's setting. Reservations already made keep their warehouses."""
    v = Violations()
    check_text(v, "allocation.channel", channel, 64)
    if not channel:
        v.add("allocation.channel", "required")
    if strategy not in STRATEGIES:
        v.add("allocation.strategy", f"must be one of {', '.join(STRATEGIES)}")
    if len(warehouse_codes) > MAX_CHANNEL_WAREHOUSES:
        v.add("allocation.warehouse_codes", f"at most {MAX_CHANNEL_WAREHOUSES} warehouses")
    seen: set[str] = set()
    for i, code in enumerate(warehouse_codes):
        check_warehouse_code(v, f"allocation.warehouse_codes[{i}]", code)
        if code in seen:
            v.add(f"allocation.warehouse_codes[{i}]", f"{code!r} is listed twice")
        seen.add(code)
    v.raise_if_any("the channel allocation is invalid")
    if (await session.execute(_GET, {"slug": channel})).one_or_none() is None:
        raise _channel_not_found(channel)
    known = set((await session.execute(_KNOWN_WAREHOUSES, {"codes": list(seen)})).scalars())
    unknown = [c for c in warehouse_codes if c not in known]
    if unknown:
        raise NotFound(
            "WAREHOUSE_NOT_FOUND",
            f"warehouse(s) {', '.join(map(repr, unknown))} do not exist",
            metadata={"code": ",".join(unknown)},
        )
    row = (
        await session.execute(
            _UPSERT, {"slug": channel, "codes": list(warehouse_codes), "strategy": strategy}
        )
    ).one()
    await emit(
        session,
        Event(
            "inventory.channel_allocation_set",
            "channel",
            channel,
            {"channel": channel, "warehouse_codes": list(warehouse_codes), "strategy": strategy},
            channel=channel,
        ),
    )
    return ChannelAllocation(channel, tuple(row.warehouse_codes), row.strategy, row.updated_at)


async def sellable_warehouses(session: AsyncSession, channel: str) -> list[str]:
    """The warehouses `channel` allocates from, in its order (stock reads per channel)."""
    filters_or_raise(channel=channel)
    rows = (await session.execute(_SELLABLE, {"slug": channel})).all()
    if not rows:
        raise _channel_not_found(channel)
    return [r.code for r in rows if r.code is not None]
