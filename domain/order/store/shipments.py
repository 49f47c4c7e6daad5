"""Shipments: the shipped counters of order lines and the shipment records."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.models import OrderLineRow, ShipmentLineRow, ShipmentRow
from domain.order.types import Shipment


async def add_shipped(session: AsyncSession, order_id: uuid.UUID, line_id: str, quantity: int) -> bool:
    """Adds `quantity` to the line's shipped quantity unless that would pass
    the ordered quantity; whether it did."""
    stmt = (
        update(OrderLineRow)
        .where(
            OrderLineRow.order_id == order_id,
            OrderLineRow.line_id == line_id,
            OrderLineRow.shipped_quantity + quantity <= OrderLineRow.quantity,
        )
        .values(shipped_quantity=OrderLineRow.shipped_quantity + quantity)
        .returning(OrderLineRow.shipped_quantity)
        .execution_options(synchronize_session=False)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def insert_shipment(
    session: AsyncSession,
    shipment_id: uuid.UUID,
    order_id: uuid.UUID,
    lines: Sequence[tuple[str, int]],
    *,
    tracking_number: str,
    carrier: str,
    created_by: str,
) -> Shipment:
    """Records a shipment of (line_id, quantity) pairs."""
    created = (
        await session.execute(
            insert(ShipmentRow)
            .values(
                id=shipment_id,
                order_id=order_id,
                tracking_number=tracking_number,
                carrier=carrier,
                created_by=created_by,
            )
            .returning(ShipmentRow.created_at)
        )
    ).scalar_one()
    await session.execute(
        insert(ShipmentLineRow),
        [{"shipment_id": shipment_id, "line_id": lid, "quantity": q} for lid, q in lines],
    )
    return Shipment(str(shipment_id), str(order_id), tuple(lines), tracking_number, carrier, created)


async def shipments_of(session: AsyncSession, order_id: uuid.UUID) -> list[Shipment]:
    """The order's shipments, oldest first, each with its lines by line id."""
    shipments = list(
        (
            await session.execute(
                select(ShipmentRow)
                .where(ShipmentRow.order_id == order_id)
                .order_by(ShipmentRow.created_at, ShipmentRow.id)
            )
        ).scalars()
    )
    lines: dict[uuid.UUID, list[tuple[str, int]]] = {s.id: [] for s in shipments}
    if shipments:
        for sl in (
            await session.execute(
                select(ShipmentLineRow)
                .where(ShipmentLineRow.shipment_id.in_(list(lines)))
                .order_by(ShipmentLineRow.line_id)
            )
        ).scalars():
            lines[sl.shipment_id].append((sl.line_id, sl.quantity))
    return [
        Shipment(str(s.id), str(order_id), tuple(lines[s.id]), s.tracking_number, s.carrier, s.created_at)
        for s in shipments
    ]
