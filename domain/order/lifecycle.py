"""An order's lifecycle: state transitions, shipments (whole or partial) and
the shipment status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.inventory_port import DEFAULT_INVENTORY, InventoryPort
from domain.order.models import OrderLineRow, OrderRow
from domain.order.reserving import reserve, sum_by_sku
from domain.order.rules import (
    TRANSITION_TARGETS,
    State,
    check_shippable,
    check_transition,
    validate_shipment,
)
from domain.order.store import entries, orders, shipments
from domain.order.types import TRANSITIONED, Order, Shipment, ShipmentStatus
from domain.shared.errors import FailedPrecondition, FieldViolation, InvalidArgument, PreconditionViolation
from domain.shared.ids import new_id
from domain.shared.outbox import Event


async def transition(
    session: AsyncSession,
    order_id: str,
    target: State,
    *,
    channel: str,
    actor: str,
    reason: str = "",
    tracking_number: str = "",
    carrier: str = "",
    inventory: InventoryPort = DEFAULT_INVENTORY,
) -> Order:
    _check_transition_request(target, reason)
    row = await orders.order_row(session, order_id, channel, lock=True)
    check_transition(order_id, State(row.state), target)
    if target is State.SHIPPED:
        lines = await orders.order_lines(session, row.id)
        remaining = [
            (li.line_id, li.quantity - li.shipped_quantity)
            for li in lines
            if li.shipped_quantity < li.quantity
        ]
        await _ship(
            session, row, lines, remaining, tracking_number, carrier, actor=actor, inventory=inventory
        )
        return await orders.load(session, row)
    if target is State.PROCESSING and row.reservation_id is None:
        lines = await orders.order_lines(session, row.id)
        wanted = [(li.sku, li.quantity - li.shipped_quantity) for li in lines]
        await reserve(session, row, wanted, actor=actor, inventory=inventory)
    if target is State.CANCELLED and row.reservation_id is not None:
        await _release(session, row, order_id, actor=actor, inventory=inventory)
    await _set_state(session, row, target, actor=actor, reason=reason)
    return await orders.load(session, row)


def _check_transition_request(target: State, reason: str) -> None:
    if target not in TRANSITION_TARGETS:
        raise InvalidArgument(
            "INVALID_TARGET_STATE",
            f"TransitionOrder cannot target {target.value}",
            field_violations=[
                FieldViolation("target_state", "must be PROCESSING, SHIPPED, DELIVERED or CANCELLED; "
                               "partial shipments go through ShipOrderItems")
            ],
        )  # fmt: skip
    if len(reason) > 1000:
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            "reason is too long",
            field_violations=[FieldViolation("reason", "at most 1000 characters")],
        )


async def _release(
    session: AsyncSession, row: OrderRow, order_id: str, *, actor: str, inventory: InventoryPort
) -> None:
    """Gives back everything the order's reservation still holds, and records it."""
    assert row.reservation_id is not None
    reservation_id = row.reservation_id
    await inventory.release(session, reservation_id, reason=f"order {order_id} cancelled", actor=actor)
    spec = entries.EntrySpec(
        "inventory:released", actor, category="inventory", payload={"reservation_id": reservation_id}
    )
    await entries.append_entry(session, row, spec)


async def _set_state(
    session: AsyncSession, row: OrderRow, target: State, *, actor: str, reason: str = ""
) -> None:
    """Moves the order to `target` with its order.transitioned event and
    `order:<state>` entry (the event written by the entry's statement)."""
    previous = row.state
    # A cancelled order needs no stock, so nothing is at risk any more.
    risk = {"inventory_risk": False} if target is State.CANCELLED else {}
    await orders.update_order(session, row, state=target.value, **risk)
    transitioned = Event(
        TRANSITIONED,
        "order",
        str(row.id),
        {"order_id": str(row.id), "from": previous, "to": target.value},
        row.channel,
    )
    payload: dict[str, Any] = {"from": previous}
    if reason:
        payload["reason"] = reason
    await entries.append_entry(
        session,
        row,
        entries.EntrySpec(f"order:{target.value}", actor, payload=payload),
        events_before=[transitioned],
    )


async def ship_items(
    session: AsyncSession,
    order_id: str,
    lines: Sequence[tuple[str, int]],
    *,
    channel: str,
    actor: str,
    tracking_number: str = "",
    carrier: str = "",
    inventory: InventoryPort = DEFAULT_INVENTORY,
) -> tuple[Order, Shipment]:
    validate_shipment(lines, tracking_number, carrier)
    row = await orders.order_row(session, order_id, channel, lock=True)
    current = State(row.state)
    if current not in (State.PROCESSING, State.PARTIALLY_SHIPPED):
        raise FailedPrecondition(
            "INVALID_STATE_TRANSITION",
            f"order {order_id} is {current.value}; only processing or partially shipped orders ship",
            metadata={"order_id": order_id, "state": current.value},
        )
    order_lines = await orders.order_lines(session, row.id)
    shipment = await _ship(
        session, row, order_lines, list(lines), tracking_number, carrier, actor=actor, inventory=inventory
    )
    return await orders.load(session, row), shipment


async def _ship(
    session: AsyncSession,
    row: OrderRow,
    order_lines: list[OrderLineRow],
    wanted: list[tuple[str, int]],
    tracking_number: str,
    carrier: str,
    *,
    actor: str,
    inventory: InventoryPort,
) -> Shipment:
    """Ships (line_id, quantity) pairs of a locked order from its reservation:
    counters, stock, the shipment record and its entry, then the new state."""
    order_id = str(row.id)
    await _check_not_blocked(session, row)
    if row.reservation_id is None:
        raise FailedPrecondition(
            "NO_RESERVATION",
            f"order {order_id} holds no reservation to ship from",
            metadata={"order_id": order_id},
        )
    by_id = {li.line_id: li for li in order_lines}
    check_shippable(order_id, {li.line_id: li.quantity - li.shipped_quantity for li in order_lines}, wanted)
    for line_id, qty in wanted:
        # Conditional, so the counter can never pass the ordered quantity.
        if not await shipments.add_shipped(session, row.id, line_id, qty):
            raise FailedPrecondition(
                "QUANTITY_EXCEEDS_REMAINING",
                f"line {line_id} would ship more than ordered",
                metadata={"order_id": order_id},
            )
    shipment_id = new_id()
    await inventory.fulfil(
        session,
        row.reservation_id,
        sum_by_sku([(by_id[lid].sku, q) for lid, q in wanted]),
        reference=f"shipment:{shipment_id}",
        actor=actor,
    )
    # Inventory told the order what its reservation holds now (inventory_risk).
    await orders.refresh_risk(session, row)
    shipment = await shipments.insert_shipment(
        session,
        shipment_id,
        row.id,
        wanted,
        tracking_number=tracking_number,
        carrier=carrier,
        created_by=actor,
    )
    await entries.append_entry(session, row, _shipped_entry(shipment, actor))
    await _state_after_shipping(session, row, actor=actor)
    return shipment


async def _check_not_blocked(session: AsyncSession, row: OrderRow) -> None:
    """ORDER_BLOCKED while any BLOCKING status entry is open."""
    blocking = await entries.open_blocking(session, row.id)
    if blocking:
        order_id = str(row.id)
        raise FailedPrecondition(
            "ORDER_BLOCKED",
            f"order {order_id} has open blocking status entries: " + ", ".join(e.code for e in blocking),
            metadata={"order_id": order_id, "codes": ",".join(e.code for e in blocking)},
            precondition_violations=[
                PreconditionViolation(
                    "BLOCKING_STATUS", f"orders/{order_id}/status/{e.id}", f"{e.code} is open"
                )
                for e in blocking
            ],
        )


def _shipped_entry(shipment: Shipment, actor: str) -> entries.EntrySpec:
    return entries.EntrySpec(
        "order:items_shipped", actor, category="fulfilment",
        payload={"shipment_id": shipment.id, "tracking_number": shipment.tracking_number,
                 "carrier": shipment.carrier,
                 "lines": [{"line_id": lid, "quantity": q} for lid, q in shipment.lines]},
    )  # fmt: skip


async def _state_after_shipping(session: AsyncSession, row: OrderRow, *, actor: str) -> None:
    """SHIPPED when nothing is left to ship, PARTIALLY_SHIPPED otherwise."""
    left = await orders.quantity_left_to_ship(session, row.id)
    target = State.SHIPPED if left == 0 else State.PARTIALLY_SHIPPED
    if target.value != row.state:
        check_transition(str(row.id), State(row.state), target)
        await _set_state(session, row, target, actor=actor)
    else:
        await orders.update_order(session, row)


async def shipment_status(session: AsyncSession, order_id: str, *, channel: str) -> ShipmentStatus:
    row = await orders.order_row(session, order_id, channel)
    order = await orders.load(session, row)
    return ShipmentStatus(
        order.id, order.state, order.lines, tuple(await shipments.shipments_of(session, row.id))
    )
