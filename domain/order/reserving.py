"""Reserving an order's stock through the inventory port, and the entry that records it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.inventory_port import InventoryPort, Reserved, StockLine
from domain.order.models import OrderRow
from domain.order.rules import Severity
from domain.order.store import entries, orders


def sum_by_sku(items: Sequence[tuple[str, int]]) -> list[StockLine]:
    # One StockLine per SKU, in first-mention order: inventory sums demand per SKU anyway.
    totals: dict[str, int] = {}
    for sku, qty in items:
        totals[sku] = totals.get(sku, 0) + qty
    return [StockLine(sku, q) for sku, q in totals.items() if q > 0]


def reservation_entry(demand: Sequence[StockLine], res: Reserved, actor: str) -> entries.EntrySpec:
    """inventory:reservation_confirmed, or a WARNING inventory:reservation_backordered
    listing the units that exceeded on_hand."""
    payload: dict[str, Any] = {
        "reservation_id": res.reservation_id,
        "lines": [{"sku": s.sku, "quantity": s.quantity} for s in demand],
    }
    if res.backordered:
        payload["backordered"] = [{"sku": k, "quantity": v} for k, v in sorted(res.backordered.items())]
        return entries.EntrySpec(
            "inventory:reservation_backordered",
            actor,
            Severity.WARNING,
            category="inventory",
            payload=payload,
        )
    return entries.EntrySpec("inventory:reservation_confirmed", actor, category="inventory", payload=payload)


async def reserve_new(
    session: AsyncSession,
    head: entries.OrderHead,
    wanted: list[tuple[str, int]],
    *,
    actor: str,
    inventory: InventoryPort,
) -> tuple[str, bool]:
    """`reserve` for an order just inserted: the order update and its entry in
    one statement. The reservation's id, and whether it leaves the order at risk."""
    demand = sum_by_sku(wanted)
    res = await inventory.reserve(
        session, demand, reference=f"order:{head.id}", actor=actor, channel=head.channel
    )
    await entries.set_reservation(
        session,
        head,
        res.reservation_id,
        reservation_entry(demand, res, actor),
        inventory_risk=bool(res.backordered),
    )
    return res.reservation_id, bool(res.backordered)


async def reserve(
    session: AsyncSession,
    row: OrderRow,
    wanted: list[tuple[str, int]],
    *,
    actor: str,
    inventory: InventoryPort,
) -> None:
    """Reserves (sku, quantity) pairs for the order and records the reservation on it."""
    demand = sum_by_sku(wanted)
    res = await inventory.reserve(
        session, demand, reference=f"order:{row.id}", actor=actor, channel=row.channel
    )
    # Backordered units leave the order at risk until they ship.
    await orders.update_order(
        session, row, reservation_id=res.reservation_id, inventory_risk=bool(res.backordered)
    )
    await entries.append_entry(session, row, reservation_entry(demand, res, actor))
