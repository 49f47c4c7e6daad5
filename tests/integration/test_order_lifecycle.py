"""Order lifecycle against real inventory, through real gRPC: reserve, ship, deliver, cancel."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from entrepot.inventory.v1 import inventory_pb2 as inv
from entrepot.order.v1 import order_pb2 as pb
from entrepot.platform.v1 import types_pb2
from entrepot_client import Entrepot, FailedPreconditionError, NotFoundError, PermissionDeniedError
from entrepot_client.order import build_intent
from tests.conftest import unique
from tests.inventory_support import check_invariants


async def warehouse(ep: Entrepot) -> str:
    code = unique("WH")
    await ep.inventory.create_warehouse(
        inv.CreateWarehouseRequest(
            warehouse=inv.Warehouse(
                code=code, name=code, address=types_pb2.PostalAddress(city="Lyon", country_code="FR")
            ),
            request_id=uuid.uuid4().hex,
        )
    )
    return code


async def item(ep: Entrepot, wh: str, on_hand: int, **policy: object) -> str:
    sku = unique("SKU")
    await ep.inventory.upsert_inventory_item(
        inv.UpsertInventoryItemRequest(item=inv.InventoryItem(sku=sku, track_inventory=True, **policy))  # type: ignore[arg-type]
    )
    if on_hand:
        await ep.inventory.set_stock(
            inv.SetStockRequest(sku=sku, warehouse_code=wh, quantity=on_hand, reason="initial")
        )
    return sku


async def level(ep: Entrepot, sku: str) -> tuple[int, int]:
    s = await ep.inventory.get_stock_level(inv.GetStockLevelRequest(sku=sku))
    return s.on_hand, s.reserved


def order_intent(lines: list[tuple[str, str, int, int]], **kw: object) -> pb.OrderIntent:
    return build_intent(unique("intent"), "webshop", "EUR", lines=lines, **kw)  # type: ignore[arg-type]


async def submit(ep: Entrepot, intent: pb.OrderIntent, reserve: bool = False) -> pb.Order:
    r = await ep.order.submit_order_intent(
        pb.SubmitOrderIntentRequest(intent=intent, reserve_inventory=reserve, request_id=uuid.uuid4().hex)
    )
    return r.order


async def move(ep: Entrepot, order_id: str, state: int, **kw: object) -> pb.Order:
    return await ep.order.transition_order(
        pb.TransitionOrderRequest(order_id=order_id, target_state=state, request_id=uuid.uuid4().hex, **kw)  # type: ignore[arg-type]
    )


async def ship(
    ep: Entrepot, order_id: str, lines: dict[str, int], tracking: str = ""
) -> pb.ShipOrderItemsResponse:
    return await ep.order.ship_order_items(
        pb.ShipOrderItemsRequest(
            order_id=order_id,
            lines=[pb.LineQuantity(line_id=k, quantity=v) for k, v in lines.items()],
            tracking_number=tracking,
            carrier="colissimo" if tracking else "",
            request_id=uuid.uuid4().hex,
        )
    )


async def codes(ep: Entrepot, order_id: str, module: str = "") -> list[str]:
    h = await ep.order.list_order_status_history(
        pb.ListOrderStatusHistoryRequest(order_id=order_id, module=module)
    )
    return [e.code for e in h.entries]


async def test_full_lifecycle_reserve_partial_ship_ship_deliver(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await warehouse(admin)
    a, b = await item(admin, wh, 10), await item(admin, wh, 5)
    o = await submit(admin, order_intent([("1", a, 3, 1000), ("2", b, 2, 500)], shipping_minor=490))
    assert o.state == pb.Order.STATE_PENDING and not o.reservation_id
    assert await level(admin, a) == (10, 0)

    o = await move(admin, o.id, pb.Order.STATE_PROCESSING)
    assert o.state == pb.Order.STATE_PROCESSING and o.reservation_id
    assert await level(admin, a) == (10, 3) and await level(admin, b) == (5, 2)
    res = await admin.inventory.get_reservation(inv.GetReservationRequest(id=o.reservation_id))
    assert res.reference == f"order:{o.id}"

    r = await ship(admin, o.id, {"1": 1}, tracking="TRK-1")
    assert r.order.state == pb.Order.STATE_PARTIALLY_SHIPPED and r.shipment.tracking_number == "TRK-1"
    assert await level(admin, a) == (9, 2)
    st = await admin.order.get_shipment_status(pb.GetShipmentStatusRequest(order_id=o.id))
    assert [(x.line_id, x.shipped_quantity, x.remaining_quantity) for x in st.lines] == [
        ("1", 1, 2),
        ("2", 0, 2),
    ]

    with pytest.raises(FailedPreconditionError) as exc:
        await ship(admin, o.id, {"1": 3})
    assert exc.value.reason == "QUANTITY_EXCEEDS_REMAINING"
    assert exc.value.precondition_violations[0].subject == f"orders/{o.id}/lines/1"
    assert await level(admin, a) == (9, 2)  # the refused shipment changed nothing

    r = await ship(admin, o.id, {"1": 2, "2": 2}, tracking="TRK-2")
    assert r.order.state == pb.Order.STATE_SHIPPED
    assert await level(admin, a) == (7, 0) and await level(admin, b) == (3, 0)
    o = await move(admin, o.id, pb.Order.STATE_DELIVERED)
    assert o.state == pb.Order.STATE_DELIVERED
    st = await admin.order.get_shipment_status(pb.GetShipmentStatusRequest(order_id=o.id))
    assert [s.tracking_number for s in st.shipments] == ["TRK-1", "TRK-2"]
    assert all(x.remaining_quantity == 0 for x in st.lines)
    assert await codes(admin, o.id) == [
        "order:submitted",
        "inventory:reservation_confirmed",
        "order:processing",
        "order:items_shipped",
        "order:partially_shipped",
        "order:items_shipped",
        "order:shipped",
        "order:delivered",
    ]
    moves = await admin.inventory.list_stock_movements(inv.ListStockMovementsRequest(sku=a))
    kinds = sorted((m.type, m.on_hand_delta, m.reserved_delta) for m in moves.movements)
    assert kinds == sorted(
        [
            (inv.MOVEMENT_TYPE_SET, 10, 0),
            (inv.MOVEMENT_TYPE_RESERVE, 0, 3),
            (inv.MOVEMENT_TYPE_FULFIL, -1, -1),
            (inv.MOVEMENT_TYPE_FULFIL, -2, -2),
        ]
    )
    async with sessions() as s:
        await check_invariants(s)


async def test_cancel_releases_exactly_what_was_reserved(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await warehouse(admin)
    a, b = await item(admin, wh, 4), await item(admin, wh, 9)
    # The same SKU on two lines is summed by inventory: 4 of 4 units.
    o = await submit(
        admin, order_intent([("1", a, 1, 100), ("2", b, 6, 100), ("3", a, 3, 100)]), reserve=True
    )
    assert o.state == pb.Order.STATE_PENDING and o.reservation_id
    assert await level(admin, a) == (4, 4) and await level(admin, b) == (9, 6)
    o = await move(admin, o.id, pb.Order.STATE_PROCESSING)  # already reserved: not again
    assert await level(admin, a) == (4, 4) and await level(admin, b) == (9, 6)
    o = await move(admin, o.id, pb.Order.STATE_CANCELLED, reason="customer asked")
    assert o.state == pb.Order.STATE_CANCELLED
    assert await level(admin, a) == (4, 0) and await level(admin, b) == (9, 0)
    res = await admin.inventory.get_reservation(inv.GetReservationRequest(id=o.reservation_id))
    assert res.state == inv.Reservation.STATE_RELEASED
    for sku, qty in ((a, 4), (b, 6)):
        moves = await admin.inventory.list_stock_movements(inv.ListStockMovementsRequest(sku=sku))
        reserved = sum(m.reserved_delta for m in moves.movements if m.type == inv.MOVEMENT_TYPE_RESERVE)
        released = sum(m.reserved_delta for m in moves.movements if m.type == inv.MOVEMENT_TYPE_RELEASE)
        assert (reserved, released) == (qty, -qty)
    assert await codes(admin, o.id, "inventory") == ["inventory:reservation_confirmed", "inventory:released"]
    async with sessions() as s:
        await check_invariants(s)


async def test_short_stock_refuses_whole_and_leaves_nothing(admin: Entrepot) -> None:
    wh = await warehouse(admin)
    a, b = await item(admin, wh, 5), await item(admin, wh, 1)
    ext = unique("ext")
    with pytest.raises(FailedPreconditionError) as exc:
        await submit(
            admin, order_intent([("1", a, 2, 100), ("2", b, 2, 100)], external_order_id=ext), reserve=True
        )
    assert exc.value.reason == "INSUFFICIENT_STOCK"
    assert [v.subject for v in exc.value.precondition_violations] == [b]
    with pytest.raises(NotFoundError):
        await admin.order.get_order_by_external_id(
            pb.GetOrderByExternalIdRequest(source_system="webshop", external_order_id=ext)
        )
    assert await level(admin, a) == (5, 0)
    o = await submit(admin, order_intent([("1", a, 2, 100), ("2", b, 2, 100)]))
    with pytest.raises(FailedPreconditionError) as exc:
        await move(admin, o.id, pb.Order.STATE_PROCESSING)
    assert exc.value.reason == "INSUFFICIENT_STOCK"
    again = await admin.order.get_order(pb.GetOrderRequest(id=o.id))
    assert again.state == pb.Order.STATE_PENDING and not again.reservation_id
    assert await level(admin, a) == (5, 0)


async def test_backorder_is_recorded_as_a_warning(admin: Entrepot) -> None:
    wh = await warehouse(admin)
    a = await item(admin, wh, 1, allow_backorder=True)
    o = await submit(admin, order_intent([("1", a, 3, 100)]))
    await move(admin, o.id, pb.Order.STATE_PROCESSING)
    h = await admin.order.list_order_status_history(
        pb.ListOrderStatusHistoryRequest(order_id=o.id, module="inventory")
    )
    (e,) = h.entries
    assert e.code == "inventory:reservation_backordered" and e.severity == pb.SEVERITY_WARNING
    assert '"backordered":[{"quantity":2' in e.payload_json
    assert await level(admin, a) == (1, 3)


async def test_blocking_entry_pauses_shipping_until_closed(
    admin: Entrepot, client_factory: Callable[..., Entrepot], sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await warehouse(admin)
    a = await item(admin, wh, 5)
    o = await submit(admin, order_intent([("1", a, 2, 100)]))
    await move(admin, o.id, pb.Order.STATE_PROCESSING)
    procurement = client_factory(
        permissions=["order.status.write", "order.read"],
        sub="procurement-bot",
        status_namespaces=["procurement"],
    )
    blocker = await procurement.order.append_order_status(
        pb.AppendOrderStatusRequest(
            entry=pb.OrderStatusEntry(
                order_id=o.id,
                code="procurement:blocking_exception",
                category="exception",
                severity=pb.SEVERITY_BLOCKING,
                payload_json='{"po": "PO-77", "reason": "supplier late"}',
            ),
            request_id=uuid.uuid4().hex,
        )
    )
    blocked = await admin.order.list_orders(pb.ListOrdersRequest(blocked_only=True))
    assert o.id in [x.id for x in blocked.orders]
    with pytest.raises(FailedPreconditionError) as exc:
        await ship(admin, o.id, {"1": 1})
    assert exc.value.reason == "ORDER_BLOCKED"
    assert exc.value.precondition_violations[0].subject == f"orders/{o.id}/status/{blocker.id}"
    with pytest.raises(FailedPreconditionError):
        await move(admin, o.id, pb.Order.STATE_SHIPPED)
    assert await level(admin, a) == (5, 2)
    summary = await admin.order.get_order_status_summary(pb.GetOrderStatusSummaryRequest(order_id=o.id))
    assert [e.id for e in summary.open_blocking] == [blocker.id]

    # A writer without the procurement namespace can neither write nor close it.
    payments = client_factory(permissions=["order.status.write"], sub="psp", status_namespaces=["payment"])
    with pytest.raises(PermissionDeniedError) as denied:
        await payments.order.append_order_status(
            pb.AppendOrderStatusRequest(
                entry=pb.OrderStatusEntry(
                    order_id=o.id, code="procurement:resolved", severity=pb.SEVERITY_INFO
                )
            )
        )
    assert denied.value.reason == "STATUS_NAMESPACE_FORBIDDEN"
    with pytest.raises(PermissionDeniedError):
        await payments.order.close_order_status(
            pb.CloseOrderStatusRequest(order_id=o.id, entry_id=blocker.id)
        )

    closed = await procurement.order.close_order_status(
        pb.CloseOrderStatusRequest(
            order_id=o.id, entry_id=blocker.id, note="goods arrived", request_id=uuid.uuid4().hex
        )
    )
    assert not closed.open and closed.closed_by == "procurement-bot" and closed.close_note == "goods arrived"
    r = await ship(admin, o.id, {"1": 2}, tracking="TRK-9")
    assert r.order.state == pb.Order.STATE_SHIPPED and not r.order.blocked
    assert await level(admin, a) == (3, 0)
    async with sessions() as s:
        await check_invariants(s)


async def test_fifty_concurrent_duplicates_with_reservation_reserve_once(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await warehouse(admin)
    a = await item(admin, wh, 100)
    intent = order_intent([("1", a, 7, 100)])
    results = await asyncio.gather(
        *(
            admin.order.submit_order_intent(
                pb.SubmitOrderIntentRequest(
                    intent=intent, reserve_inventory=True, request_id=uuid.uuid4().hex
                )
            )
            for _ in range(50)
        )
    )
    assert len({r.order.id for r in results}) == 1 and sum(r.created for r in results) == 1
    assert await level(admin, a) == (100, 7)
    listed = await admin.inventory.list_reservations(
        inv.ListReservationsRequest(reference=f"order:{results[0].order.id}")
    )
    assert len(listed.reservations) == 1
    async with sessions() as s:
        await check_invariants(s)
