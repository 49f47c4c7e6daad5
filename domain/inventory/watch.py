"""WatchStockChanges: what a watcher sees of the outbox (pure filters, cursors).

The tailing itself (one LISTEN connection and one reader per server process,
fan-out to watchers, shared with WatchOrderEvents) lives in server/watch_hub.py;
this module decides which `inventory.stock_changed` events match a watcher and
where a cursor resumes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from domain.inventory.catalog import kit_components_of
from domain.inventory.ledger import TOPIC
from domain.inventory.validation import normalize_sku
from domain.shared import outbox
from domain.shared.errors import InvalidArgument, OutOfRange

TOPICS = (TOPIC,)
MAX_FILTER = 1000


@dataclass(frozen=True, slots=True)
class StockEvent:
    event_id: int
    sku: str
    warehouse_code: str
    type: str
    on_hand_delta: int
    reserved_delta: int
    on_hand: int
    reserved: int
    available: int
    reason: str
    time: datetime
    below_threshold: bool
    # The last ledger id the event covers: increases with every change of one
    # level, in application order.
    movement_id: int
    # The first ledger id it covers (a SyncStock batch's movements of one level
    # are one event; movement_id for a single movement).
    first_movement_id: int
    # A component movement of a reserved kit: the kit ("" otherwise).
    kit_sku: str = ""


def to_stock_event(e: outbox.StoredEvent) -> StockEvent:
    p = e.payload
    return StockEvent(
        event_id=e.id,
        sku=str(p.get("sku", e.aggregate_id)),
        warehouse_code=str(p.get("warehouse_code", "")),
        type=str(p.get("type", "")),
        on_hand_delta=int(p.get("on_hand_delta", 0)),
        reserved_delta=int(p.get("reserved_delta", 0)),
        on_hand=int(p.get("on_hand", 0)),
        reserved=int(p.get("reserved", 0)),
        available=int(p.get("available", 0)),
        reason=str(p.get("reason") or ""),
        time=e.created_at,
        below_threshold=bool(p.get("below_threshold", False)),
        movement_id=int(p.get("ledger_id", 0)),
        # Events written before first_ledger_id existed cover their one movement.
        first_movement_id=int(p.get("first_ledger_id", p.get("ledger_id", 0))),
        kit_sku=str(p.get("kit_sku") or ""),
    )


@dataclass(frozen=True)
class Filter:
    skus: frozenset[str]
    warehouses: frozenset[str]
    below_threshold_only: bool
    channel_warehouses: frozenset[str] | None = None  # a channel's warehouses (None: no channel filter)

    def matches(self, e: StockEvent) -> bool:
        if self.skus and e.sku not in self.skus:
            return False
        if self.warehouses and e.warehouse_code not in self.warehouses:
            return False
        if self.channel_warehouses is not None and e.warehouse_code not in self.channel_warehouses:
            return False
        return not self.below_threshold_only or e.below_threshold


def make_filter(
    skus: Sequence[str],
    warehouses: Sequence[str],
    below_threshold_only: bool,
    channel_warehouses: Collection[str] | None = None,
) -> Filter:
    if len(skus) > MAX_FILTER or len(warehouses) > MAX_FILTER:
        raise InvalidArgument("INVALID_FILTER", f"at most {MAX_FILTER} SKUs and {MAX_FILTER} warehouses")
    norm = set()
    for raw in skus:
        sku = normalize_sku(raw)
        if sku is None:
            raise InvalidArgument("INVALID_FILTER", f"{raw!r} is not a valid SKU", metadata={"field": "skus"})
        norm.add(sku)
    return Filter(
        frozenset(norm),
        frozenset(warehouses),
        below_threshold_only,
        None if channel_warehouses is None else frozenset(channel_warehouses),
    )


async def with_kit_components(session: AsyncSession, skus: Sequence[str]) -> list[str]:
    """The SKUs of a watch filter, with the components of the kits among them (as
    defined now): a kit has no stock of its own, its availability changes when a
    component's stock does, so a watcher of a kit receives its components' changes."""
    norm = [sku for sku in map(normalize_sku, skus) if sku is not None]  # make_filter refuses the others
    found = await kit_components_of(session, norm) if norm else {}
    extra = sorted({c.sku for components in found.values() for c in components} - set(norm))
    return [*skus, *extra]


async def resume_after(session: AsyncSession, after_event_id: int) -> int:
    """Where a watcher resuming after `after_event_id` (> 0) starts: that id.

    A cursor whose event was purged by retention is OUT_OF_RANGE /
    CURSOR_EXPIRED: the watcher must resync (read levels) and watch from now.
    """
    if after_event_id < 0:
        raise InvalidArgument("INVALID_CURSOR", "after_event_id must not be negative")
    if await outbox.exists(session, after_event_id):
        return after_event_id
    if after_event_id > await outbox.last_drawn_id(session):
        raise InvalidArgument(
            "UNKNOWN_CURSOR",
            f"event {after_event_id} does not exist",
            metadata={"after_event_id": str(after_event_id)},
        )
    raise OutOfRange(
        "CURSOR_EXPIRED",
        f"event {after_event_id} is no longer retained; read current levels and watch from now",
        metadata={"after_event_id": str(after_event_id)},
    )
