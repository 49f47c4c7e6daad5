"""Keeping `inventory_risk` true to what inventory does to an order's reservation.

The order's own paths set it (reserving with backordered units) and clear it
(cancelling); inventory calls `on_reservations_changed` in the transaction of
every release, fulfilment or expiry of a reservation referenced "order:<id>"
(a shipment, a cancellation, or inventory's ReleaseReservation and expiry),
and the order is at risk when a line still to ship is no longer covered.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

import domain.inventory as inventory
from domain.order.store import orders

RESERVATION_PREFIX = "order:"


async def on_reservations_changed(
    session: AsyncSession, changes: Sequence[inventory.ReservationChange]
) -> None:
    await orders.set_risk_from_reservations(
        session, [(c.reservation_id, c.state, c.open_quantity, c.backordered_quantity) for c in changes]
    )


def observe_inventory() -> None:
    inventory.observe_reservations(RESERVATION_PREFIX, on_reservations_changed)
