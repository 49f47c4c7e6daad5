"""Kits and bundles through real gRPC (in-process server on loopback, real
PostgreSQL): defining a kit, its availability in the stock reads, reserving,
releasing and fulfilling it as its components (all or nothing, with real
concurrency), the ledger naming the kit line, FIFO cost, definition changes
leaving reservations alone, what a kit's watcher sees, and a cart holding a kit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from entrepot.cart.v1 import cart_pb2
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.order.v1 import order_pb2
from entrepot.platform.v1 import types_pb2
from entrepot_client import (
    Entrepot,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from entrepot_client.order import build_intent
from entrepot_client.streams import StockEvent, sync_stock
from tests.conftest import unique
from tests.integration.test_allocation_channels import allocate, make_channel
from tests.integration.test_inventory_api import make_item, make_warehouse
from tests.inventory_support import check_invariants

Factory = Callable[..., Entrepot]


def parts(**components: int) -> list[pb.KitComponent]:
    return [pb.KitComponent(sku=sku, quantity=q) for sku, q in components.items()]


async def define(ep: Entrepot, sku: str, components: dict[str, int]) -> pb.InventoryItem:
    return await ep.inventory.set_kit_components(
        pb.SetKitComponentsRequest(
            sku=sku,
            components=[pb.KitComponent(sku=c, quantity=q) for c, q in components.items()],
            request_id=uuid.uuid4().hex,
        )
    )


async def make_kit(ep: Entrepot, components: dict[str, int]) -> str:
    sku = await make_item(ep)
    await define(ep, sku, components)
    return sku


def lines(*pairs: tuple[str, int]) -> pb.ReserveStockRequest:
    return pb.ReserveStockRequest(
        lines=[pb.ReservationLineRequest(sku=s, quantity=q) for s, q in pairs], request_id=uuid.uuid4().hex
    )


def held(res: pb.Reservation) -> list[tuple[str, str, int, int]]:
    """(sku, kit_sku, quantity per kit, open) per line, sorted."""
    return sorted((x.sku, x.kit_sku, x.quantity_per_kit, x.open_quantity) for x in res.lines)


async def receive(ep: Entrepot, sku: str, wh: str, quantity: int, unit_cost: int) -> None:
    await ep.inventory.receive_stock(
        pb.ReceiveStockRequest(
            sku=sku,
            warehouse_code=wh,
            quantity=quantity,
            unit_cost=types_pb2.Money(currency_code="EUR", amount_minor=unit_cost),
            request_id=uuid.uuid4().hex,
        )
    )


async def test_a_bicycle_is_a_frame_and_two_wheels_and_its_availability_is_derived(
    admin: Entrepot,
) -> None:
    w1, w2 = await make_warehouse(admin, priority=-300), await make_warehouse(admin, priority=-299)
    frame = await make_item(admin, {w1: 3, w2: 1})
    wheel = await make_item(admin, {w1: 5, w2: 4})
    bike = await make_item(admin, low_stock_threshold=2)
    item = await define(admin, bike, {frame: 1, wheel: 2})
    # Components come in SKU order.
    assert [(c.sku, c.quantity) for c in item.components] == sorted([(frame, 1), (wheel, 2)])
    got = await admin.inventory.get_inventory_item(pb.GetInventoryItemRequest(sku=bike))
    assert [(c.sku, c.quantity) for c in got.components] == sorted([(frame, 1), (wheel, 2)])

    st = await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=bike))
    # w1: min(3/1, 5/2) = 2; w2: min(1/1, 4/2) = 1; in total min(4/1, 9/2) = 4 (components
    # may come from different warehouses, so the total exceeds the warehouses' sum).
    assert [(x.warehouse_code, x.available) for x in st.warehouses] == sorted([(w1, 2), (w2, 1)])
    assert (st.on_hand, st.reserved, st.available, st.backordered) == (4, 0, 4, 0)
    assert [(c.sku, c.quantity) for c in st.components] == sorted([(frame, 1), (wheel, 2)])
    assert not st.below_threshold
    listed = await admin.inventory.list_stock_levels(pb.ListStockLevelsRequest(sku_prefix=bike))
    assert [(x.sku, x.warehouse_code, x.available) for x in listed.levels] == sorted(
        [(bike, w1, 2), (bike, w2, 1)]
    )
    # Pages of one level each walk the kit's levels in key order too.
    first = await admin.inventory.list_stock_levels(pb.ListStockLevelsRequest(sku_prefix=bike, page_size=1))
    second = await admin.inventory.list_stock_levels(
        pb.ListStockLevelsRequest(sku_prefix=bike, page_size=1, page_token=first.next_page_token)
    )
    assert [x.warehouse_code for x in [*first.levels, *second.levels]] == sorted([w1, w2])
    assert not second.next_page_token
    only_w2 = await admin.inventory.list_stock_levels(
        pb.ListStockLevelsRequest(sku_prefix=bike, warehouse_code=w2)
    )
    assert [(x.warehouse_code, x.available) for x in only_w2.levels] == [(w2, 1)]
    one = await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=bike, warehouse_code=w2))
    assert [(x.warehouse_code, x.available) for x in one.warehouses] == [(w2, 1)] and one.available == 1

    # Units reserved by anyone count: 3 wheels held leave min(4, 6/2) = 3 bicycles.
    await admin.inventory.reserve_stock(lines((wheel, 3)))
    batch = await admin.inventory.batch_get_stock_levels(
        pb.BatchGetStockLevelsRequest(skus=[bike, wheel, "no-such-sku"])
    )
    by_sku = {s.sku: s for s in batch.stocks}
    assert (by_sku[bike].on_hand, by_sku[bike].reserved, by_sku[bike].available) == (4, 1, 3)
    assert by_sku[wheel].available == 6 and list(by_sku[wheel].components) == []
    assert list(batch.missing_skus) == ["no-such-sku"]

    # Per channel: only the channel's warehouses count.
    ch = await make_channel(admin)
    await allocate(admin, ch, [w2])
    on_ch = await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=bike, channel=ch))
    assert [(x.warehouse_code, x.available) for x in on_ch.warehouses] == [(w2, 1)] and on_ch.available == 1
    batch_ch = await admin.inventory.batch_get_stock_levels(
        pb.BatchGetStockLevelsRequest(skus=[bike], channel=ch)
    )
    assert batch_ch.stocks[0].available == 1

    # Low stock: the kit's own threshold applies to its availability.
    await admin.inventory.reserve_stock(lines((frame, 2)))
    low = await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=bike))
    assert low.available == 2 and low.below_threshold


async def test_kit_definitions_are_validated(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    a, b = await make_item(admin), await make_item(admin, {wh: 1})
    kit = await make_item(admin)

    with pytest.raises(InvalidArgumentError) as bad:
        await define(admin, kit, {kit: 1, a: 0})
    assert sorted(v.field for v in bad.value.field_violations) == [
        "components[0].sku",
        "components[1].quantity",
    ]
    with pytest.raises(InvalidArgumentError) as dup:
        await admin.inventory.set_kit_components(
            pb.SetKitComponentsRequest(sku=kit, components=parts(**{a: 1}) + parts(**{a: 2}))
        )
    assert [v.field for v in dup.value.field_violations] == ["components[1].sku"]
    with pytest.raises(NotFoundError) as nf:
        await define(admin, unique("NOPE"), {a: 1})
    assert nf.value.reason == "ITEM_NOT_FOUND"
    missing = unique("NOPE")
    with pytest.raises(FailedPreconditionError) as gone:
        await define(admin, kit, {a: 1, missing: 1})
    assert gone.value.reason == "COMPONENT_NOT_FOUND"
    assert [(v.subject, v.type) for v in gone.value.precondition_violations] == [
        ("components[1]", "COMPONENT_NOT_FOUND")
    ]
    # An item with stock levels cannot become a kit.
    with pytest.raises(FailedPreconditionError) as stocked:
        await define(admin, b, {a: 1})
    assert stocked.value.reason == "ITEM_HAS_STOCK"

    await define(admin, kit, {a: 1, b: 2})
    # No kit inside a kit, either way round.
    outer = await make_item(admin)
    with pytest.raises(FailedPreconditionError) as nested:
        await define(admin, outer, {kit: 1})
    assert nested.value.reason == "KIT_NESTING"
    with pytest.raises(FailedPreconditionError) as inner:
        await define(admin, a, {outer: 1})
    assert inner.value.reason == "KIT_NESTING" and a in inner.value.precondition_violations[0].description

    # A kit has no stock of its own: every stock change of it is refused, nothing written.
    for call in (
        admin.inventory.adjust_stock(pb.AdjustStockRequest(sku=kit, warehouse_code=wh, delta=1)),
        admin.inventory.set_stock(pb.SetStockRequest(sku=kit, warehouse_code=wh, quantity=3)),
        receive(admin, kit, wh, 2, 100),
        admin.inventory.return_stock(pb.ReturnStockRequest(sku=kit, warehouse_code=wh, quantity=1)),
        admin.inventory.bulk_adjust_stock(
            pb.BulkAdjustStockRequest(adjustments=[pb.StockAdjustment(sku=kit, warehouse_code=wh, delta=1)])
        ),
    ):
        with pytest.raises(FailedPreconditionError) as refused:
            await call
        assert refused.value.reason == "KIT_HAS_NO_STOCK"
    # A sync event on a kit is rejected with the same reason; the component's event applies.
    sync = await sync_stock(
        admin,
        unique("wms"),
        [
            StockEvent("1", kit, wh, "set", 5, datetime(2026, 11, 1, tzinfo=UTC)),
            StockEvent("2", a, wh, "set", 5, datetime(2026, 11, 1, tzinfo=UTC)),
        ],
    )
    assert (sync.applied, sync.rejected) == (1, 1)
    assert [(e.event_id, e.reason) for e in sync.errors] == [("1", "KIT_HAS_NO_STOCK")]
    moves = await admin.inventory.list_stock_movements(pb.ListStockMovementsRequest(sku=kit))
    assert list(moves.movements) == []

    # Upserting the kit's policy keeps its definition; no components make it a simple item again.
    up = await admin.inventory.upsert_inventory_item(
        pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=kit, low_stock_threshold=4))
    )
    assert [c.sku for c in up.components] == sorted([a, b])
    plain = await define(admin, kit, {})
    assert list(plain.components) == []
    await admin.inventory.adjust_stock(pb.AdjustStockRequest(sku=kit, warehouse_code=wh, delta=1))


async def test_reserve_release_and_fulfil_move_the_components_with_the_kit_line(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await make_warehouse(admin)
    frame, wheel = await make_item(admin), await make_item(admin)
    await receive(admin, frame, wh, 2, 10_000)
    await receive(admin, frame, wh, 2, 12_000)
    await receive(admin, wheel, wh, 10, 3_000)
    bike = await make_kit(admin, {frame: 1, wheel: 2})
    ref = unique("order:")

    req = lines((bike, 3))
    req.reference = ref
    res = await admin.inventory.reserve_stock(req)
    assert held(res) == sorted([(frame, bike, 1, 3), (wheel, bike, 2, 6)])
    assert [(k.sku, k.quantity, k.open_quantity) for k in res.kits] == [(bike, 3, 3)]
    levels = await admin.inventory.batch_get_stock_levels(
        pb.BatchGetStockLevelsRequest(skus=[frame, wheel, bike])
    )
    assert [(s.sku, s.reserved) for s in levels.stocks] == [(frame, 3), (wheel, 6), (bike, 3)]
    # One ledger row per component movement, each naming the kit line.
    moves = await admin.inventory.list_stock_movements(pb.ListStockMovementsRequest(reference=ref))
    assert sorted((m.sku, m.kit_sku, m.reserved_delta) for m in moves.movements) == sorted(
        [(frame, bike, 3), (wheel, bike, 6)]
    )

    # A component's own SKU does not move the units held for the kit.
    with pytest.raises(FailedPreconditionError) as not_held:
        await admin.inventory.release_reservation(
            pb.ReleaseReservationRequest(id=res.id, lines=[pb.ReservationQuantity(sku=wheel, quantity=1)])
        )
    assert not_held.value.reason == "QUANTITY_NOT_HELD"
    with pytest.raises(FailedPreconditionError) as too_many:
        await admin.inventory.release_reservation(
            pb.ReleaseReservationRequest(id=res.id, lines=[pb.ReservationQuantity(sku=bike, quantity=4)])
        )
    assert too_many.value.precondition_violations[0].description == "requested 4 kits, held 3"

    released = await admin.inventory.release_reservation(
        pb.ReleaseReservationRequest(id=res.id, lines=[pb.ReservationQuantity(sku=bike, quantity=1)])
    )
    assert held(released) == sorted([(frame, bike, 1, 2), (wheel, bike, 2, 4)])
    assert [(k.released_quantity, k.open_quantity) for k in released.kits] == [(1, 2)]

    # Fulfilling 2 bicycles: frames FIFO 2 x 100.00, wheels 4 x 30.00 -> 320.00.
    done = await admin.inventory.fulfill_reservation(
        pb.FulfillReservationRequest(
            id=res.id, lines=[pb.ReservationQuantity(sku=bike, quantity=2)], request_id=uuid.uuid4().hex
        )
    )
    assert sorted((m.sku, m.kit_sku, m.on_hand_delta, m.cost.amount_minor) for m in done.movements) == sorted(
        [(frame, bike, -2, 20_000), (wheel, bike, -4, 12_000)]
    )
    (kc,) = done.kit_costs
    assert (kc.kit_sku, kc.quantity, kc.cost.currency_code, kc.cost.amount_minor) == (bike, 2, "EUR", 32_000)
    assert kc.cost.amount_minor == sum(m.cost.amount_minor for m in done.movements)
    assert done.reservation.state == pb.Reservation.STATE_RELEASED
    assert [
        (k.quantity, k.fulfilled_quantity, k.released_quantity, k.open_quantity)
        for k in done.reservation.kits
    ] == [(3, 2, 1, 0)]
    # The next bicycle costs the younger frame lot: 120.00 + 2 x 30.00.
    again = await admin.inventory.reserve_stock(lines((bike, 1)))
    shipped = await admin.inventory.fulfill_reservation(pb.FulfillReservationRequest(id=again.id))
    assert shipped.kit_costs[0].cost.amount_minor == 18_000
    all_moves = await admin.inventory.list_stock_movements(pb.ListStockMovementsRequest(sku=wheel))
    assert {m.kit_sku for m in all_moves.movements if m.type != pb.MOVEMENT_TYPE_RECEIVE} == {bike}
    async with sessions() as s:
        await check_invariants(s)


async def test_a_kits_demand_adds_to_the_requests_other_demand_for_its_components(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    frame, wheel = await make_item(admin, {wh: 3}), await make_item(admin, {wh: 5})
    bike = await make_kit(admin, {frame: 1, wheel: 2})
    # 2 bicycles need 4 wheels; two more on their own make 6 > 5: nothing is held.
    with pytest.raises(FailedPreconditionError) as short:
        await admin.inventory.reserve_stock(lines((bike, 2), (wheel, 2)))
    assert short.value.reason == "INSUFFICIENT_STOCK"
    assert [(v.subject, v.description) for v in short.value.precondition_violations] == [
        (wheel, "requested 6, available 5")
    ]
    st = await admin.inventory.batch_get_stock_levels(pb.BatchGetStockLevelsRequest(skus=[frame, wheel]))
    assert [s.reserved for s in st.stocks] == [0, 0]
    # The same kit named twice is summed; plain and kit lines of a component stay apart.
    res = await admin.inventory.reserve_stock(lines((bike, 1), (wheel, 1), (bike, 1)))
    assert held(res) == sorted([(frame, bike, 1, 2), (wheel, "", 0, 1), (wheel, bike, 2, 4)])
    assert [(k.sku, k.quantity) for k in res.kits] == [(bike, 2)]
    # Releasing the plain wheel leaves the kit whole.
    after = await admin.inventory.release_reservation(
        pb.ReleaseReservationRequest(id=res.id, lines=[pb.ReservationQuantity(sku=wheel, quantity=1)])
    )
    assert held(after) == sorted([(frame, bike, 1, 2), (wheel, "", 0, 0), (wheel, bike, 2, 4)])


async def test_changing_a_kit_never_changes_reservations_already_made(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await make_warehouse(admin)
    frame, wheel, bell = (
        await make_item(admin, {wh: 10}),
        await make_item(admin, {wh: 10}),
        await make_item(admin, {wh: 10}),
    )
    bike = await make_kit(admin, {frame: 1, wheel: 2})
    first = await admin.inventory.reserve_stock(lines((bike, 2)))
    second = await admin.inventory.reserve_stock(lines((bike, 1)))
    await define(admin, bike, {frame: 1, wheel: 3, bell: 1})
    assert held(await admin.inventory.get_reservation(pb.GetReservationRequest(id=first.id))) == held(first)

    # Release and fulfil use the expansion each reservation was made with.
    rel = await admin.inventory.release_reservation(
        pb.ReleaseReservationRequest(id=first.id, lines=[pb.ReservationQuantity(sku=bike, quantity=1)])
    )
    assert held(rel) == sorted([(frame, bike, 1, 1), (wheel, bike, 2, 2)])
    done = await admin.inventory.fulfill_reservation(pb.FulfillReservationRequest(id=second.id))
    assert sorted((m.sku, m.on_hand_delta) for m in done.movements) == sorted([(frame, -1), (wheel, -2)])
    # A new reservation uses the new definition.
    new = await admin.inventory.reserve_stock(lines((bike, 1)))
    assert held(new) == sorted([(frame, bike, 1, 1), (wheel, bike, 3, 3), (bell, bike, 1, 1)])
    st = await admin.inventory.batch_get_stock_levels(
        pb.BatchGetStockLevelsRequest(skus=[frame, wheel, bell])
    )
    # frame: 10 - 1 shipped, held 1 (first) + 1 (new); wheel: 10 - 2, held 2 + 3; bell: held 1.
    assert [(s.on_hand, s.reserved) for s in st.stocks] == [(9, 2), (8, 5), (10, 1)]
    # Whole reservations released: the old expansion again.
    await admin.inventory.release_reservation(pb.ReleaseReservationRequest(id=first.id))
    st = await admin.inventory.batch_get_stock_levels(
        pb.BatchGetStockLevelsRequest(skus=[frame, wheel, bell])
    )
    assert [s.reserved for s in st.stocks] == [1, 3, 1]
    async with sessions() as s:
        await check_invariants(s)


async def test_200_concurrent_kit_reservations_grant_exactly_the_scarcest_components_worth(
    admin: Entrepot, target: str, make_token: Callable[..., str], sessions: async_sessionmaker[AsyncSession]
) -> None:
    w1, w2 = await make_warehouse(admin), await make_warehouse(admin)
    frame = await make_item(admin, {w1: 6, w2: 4})  # 10 bicycles' worth, over two warehouses
    wheel = await make_item(admin, {w1: 17, w2: 8})  # 12 bicycles' worth
    bike = await make_kit(admin, {frame: 1, wheel: 2})
    callers = [
        Entrepot(target, make_token(sub=f"buyer-{n}"), None, options=[("grpc.use_local_subchannel_pool", 1)])
        for n in range(4)
    ]

    async def one(i: int) -> bool:
        try:
            res = await callers[i % 4].inventory.reserve_stock(lines((bike, 1)))
        except FailedPreconditionError as err:
            assert err.reason == "INSUFFICIENT_STOCK"
            assert [v.subject for v in err.precondition_violations] == [frame]
            return False
        assert sum(x.quantity for x in res.lines if x.sku == frame) == 1
        assert sum(x.quantity for x in res.lines if x.sku == wheel) == 2
        return True

    try:
        results = await asyncio.gather(*(one(i) for i in range(200)))
    finally:
        for c in callers:
            await c.close()
    assert sum(results) == 10
    st = await admin.inventory.batch_get_stock_levels(
        pb.BatchGetStockLevelsRequest(skus=[frame, wheel, bike])
    )
    assert [(s.sku, s.on_hand, s.reserved, s.available) for s in st.stocks] == [
        (frame, 10, 10, 0),
        (wheel, 25, 20, 5),
        (bike, 10, 10, 0),
    ]
    async with sessions() as s:
        await check_invariants(s)
        rows = (
            await s.execute(
                text(
                    """SELECT sku, count(*), sum(reserved_delta) FROM inventory.ledger
                       WHERE kit_sku = :kit GROUP BY sku ORDER BY sku"""
                ),
                {"kit": bike},
            )
        ).all()
    assert sorted((r[0], int(r[2])) for r in rows) == sorted([(frame, 10), (wheel, 20)])


async def test_a_kit_and_its_component_sold_at_once_never_oversell_the_component(
    admin: Entrepot, target: str, make_token: Callable[..., str], sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await make_warehouse(admin)
    frame, wheel = await make_item(admin, {wh: 40}), await make_item(admin, {wh: 30})
    bike = await make_kit(admin, {frame: 1, wheel: 2})
    callers = [
        Entrepot(target, make_token(sub=f"buyer-{n}"), None, options=[("grpc.use_local_subchannel_pool", 1)])
        for n in range(4)
    ]

    async def one(i: int) -> str:
        sku = bike if (i // 4) % 2 else wheel  # every connection carries both
        try:
            await callers[i % 4].inventory.reserve_stock(lines((sku, 1)))
        except FailedPreconditionError as err:
            assert err.reason == "INSUFFICIENT_STOCK"
            return ""
        return sku

    try:
        # Connected first, so no connection's calls all arrive before another's.
        for c in callers:
            await c.inventory.get_stock_level(pb.GetStockLevelRequest(sku=bike))
        sold = await asyncio.gather(*(one(i) for i in range(120)))
    finally:
        for c in callers:
            await c.close()
    bikes, wheels = sold.count(bike), sold.count(wheel)
    # Every wheel sold (one may be left when only bicycles still asked), none twice.
    assert 29 <= 2 * bikes + wheels <= 30 and bikes > 0 and wheels > 0
    st = await admin.inventory.batch_get_stock_levels(
        pb.BatchGetStockLevelsRequest(skus=[frame, wheel, bike])
    )
    assert [(s.on_hand, s.reserved) for s in st.stocks[:2]] == [(40, bikes), (30, 2 * bikes + wheels)]
    assert st.stocks[2].available == 0
    async with sessions() as s:
        await check_invariants(s)


async def test_a_kits_watcher_sees_its_components_changes(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    frame, wheel, other = (
        await make_item(admin, {wh: 3}),
        await make_item(admin, {wh: 4}),
        await make_item(admin),
    )
    bike = await make_kit(admin, {frame: 1, wheel: 2})
    stream = admin.inventory.watch_stock_changes(pb.WatchStockChangesRequest(skus=[bike]))
    it = aiter(stream)
    first = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0.5)  # the watch is registered (its start position is "now")
    await admin.inventory.adjust_stock(pb.AdjustStockRequest(sku=other, warehouse_code=wh, delta=1))
    await admin.inventory.adjust_stock(pb.AdjustStockRequest(sku=frame, warehouse_code=wh, delta=2))
    await admin.inventory.reserve_stock(lines((bike, 1)))
    seen: list[pb.StockChangeEvent] = []

    def reserves() -> int:
        return sum(e.type == pb.MOVEMENT_TYPE_RESERVE for e in seen)

    async def until_reserved() -> None:
        msg = await first
        seen.extend(msg.events)
        while reserves() < 2:
            seen.extend((await anext(it)).events)

    try:
        await asyncio.wait_for(until_reserved(), 20)
    finally:
        await stream.aclose()
    got = [(e.sku, e.type, e.kit_sku) for e in seen]
    # The components' changes, never another SKU's. A change committed just before the
    # watch started can come first (seen once: the frame's initial SET).
    assert {e.sku for e in seen} <= {frame, wheel}
    assert (frame, pb.MOVEMENT_TYPE_ADJUST, "") in got
    assert sorted(g for g in got if g[1] == pb.MOVEMENT_TYPE_RESERVE) == sorted(
        [(frame, pb.MOVEMENT_TYPE_RESERVE, bike), (wheel, pb.MOVEMENT_TYPE_RESERVE, bike)]
    )


async def test_a_cart_holds_and_checks_out_a_kit(admin: Entrepot, client_factory: Factory) -> None:
    wh = await make_warehouse(admin)
    frame, wheel = await make_item(admin, {wh: 2}), await make_item(admin, {wh: 4})
    bike = await make_kit(admin, {frame: 1, wheel: 2})
    ep = client_factory()
    price = types_pb2.Money(currency_code="EUR", amount_minor=50_000)
    cart = await ep.cart.create_cart(
        cart_pb2.CreateCartRequest(
            cart=cart_pb2.Cart(
                customer_ref=unique("c"),
                lines=[
                    cart_pb2.CartLine(sku=bike, quantity=1, unit_price=price),
                    cart_pb2.CartLine(sku=wheel, quantity=1, unit_price=price),
                ],
            )
        )
    )
    cart = await ep.cart.hold_cart_stock(cart_pb2.HoldCartStockRequest(cart_id=cart.id, version=cart.version))
    hold = await admin.inventory.get_reservation(pb.GetReservationRequest(id=cart.hold.reservation_id))
    assert held(hold) == sorted([(frame, bike, 1, 1), (wheel, "", 0, 1), (wheel, bike, 2, 2)])
    # A second cart wanting 2 bicycles: only 1 frame and 1 wheel are left.
    other = await ep.cart.create_cart(
        cart_pb2.CreateCartRequest(
            cart=cart_pb2.Cart(
                customer_ref=unique("c"), lines=[cart_pb2.CartLine(sku=bike, quantity=1, unit_price=price)]
            )
        )
    )
    with pytest.raises(FailedPreconditionError) as short:
        await ep.cart.hold_cart_stock(cart_pb2.HoldCartStockRequest(cart_id=other.id, version=other.version))
    assert short.value.reason == "INSUFFICIENT_STOCK"
    # Checkout hands the kit's hold over as it is (the hold holds what the lines ask, in kits).
    done = await ep.cart.checkout_cart(
        cart_pb2.CheckoutCartRequest(
            cart_id=cart.id,
            version=cart.version,
            request_id=unique("rid"),
            payments=[
                cart_pb2.CheckoutPayment(
                    tender_id="t1",
                    method="card",
                    captured=types_pb2.Money(currency_code="EUR", amount_minor=100_000),
                )
            ],
        )
    )
    assert done.reservation_id == cart.hold.reservation_id
    order_res = await admin.inventory.get_reservation(pb.GetReservationRequest(id=done.reservation_id))
    assert held(order_res) == held(hold) and [(k.sku, k.open_quantity) for k in order_res.kits] == [(bike, 1)]


async def test_an_order_reserves_ships_and_cancels_a_kit(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    frame, wheel = await make_item(admin, {wh: 5}), await make_item(admin, {wh: 10})
    bike = await make_kit(admin, {frame: 1, wheel: 2})
    intent = build_intent(
        unique("intent"), "webshop", "EUR", lines=[("1", bike, 3, 50_000)], payments=[("t1", "card", 150_000)]
    )
    o = (
        await admin.order.submit_order_intent(
            order_pb2.SubmitOrderIntentRequest(
                intent=intent, reserve_inventory=True, request_id=uuid.uuid4().hex
            )
        )
    ).order
    res = await admin.inventory.get_reservation(pb.GetReservationRequest(id=o.reservation_id))
    assert held(res) == sorted([(frame, bike, 1, 3), (wheel, bike, 2, 6)])
    await admin.order.transition_order(
        order_pb2.TransitionOrderRequest(
            order_id=o.id, target_state=order_pb2.Order.STATE_PROCESSING, request_id=uuid.uuid4().hex
        )
    )
    # Shipping 1 of the order's 3 bicycles fulfils 1 frame and 2 wheels.
    await admin.order.ship_order_items(
        order_pb2.ShipOrderItemsRequest(
            order_id=o.id,
            lines=[order_pb2.LineQuantity(line_id="1", quantity=1)],
            request_id=uuid.uuid4().hex,
        )
    )
    st = await admin.inventory.batch_get_stock_levels(pb.BatchGetStockLevelsRequest(skus=[frame, wheel]))
    assert [(s.on_hand, s.reserved) for s in st.stocks] == [(4, 2), (8, 4)]
    await admin.order.ship_order_items(
        order_pb2.ShipOrderItemsRequest(
            order_id=o.id,
            lines=[order_pb2.LineQuantity(line_id="1", quantity=2)],
            request_id=uuid.uuid4().hex,
        )
    )
    done = await admin.inventory.get_reservation(pb.GetReservationRequest(id=o.reservation_id))
    assert [(k.quantity, k.fulfilled_quantity, k.open_quantity) for k in done.kits] == [(3, 3, 0)]
    # Another order's bicycles go back whole when it is cancelled.
    other = (
        await admin.order.submit_order_intent(
            order_pb2.SubmitOrderIntentRequest(
                intent=build_intent(
                    unique("intent"),
                    "webshop",
                    "EUR",
                    lines=[("1", bike, 1, 50_000)],
                    payments=[("t1", "card", 50_000)],
                ),
                reserve_inventory=True,
                request_id=uuid.uuid4().hex,
            )
        )
    ).order
    st = await admin.inventory.batch_get_stock_levels(pb.BatchGetStockLevelsRequest(skus=[frame, wheel]))
    assert [(s.on_hand, s.reserved) for s in st.stocks] == [(2, 1), (4, 2)]
    await admin.order.transition_order(
        order_pb2.TransitionOrderRequest(
            order_id=other.id, target_state=order_pb2.Order.STATE_CANCELLED, request_id=uuid.uuid4().hex
        )
    )
    st = await admin.inventory.batch_get_stock_levels(pb.BatchGetStockLevelsRequest(skus=[frame, wheel]))
    assert [(s.on_hand, s.reserved) for s in st.stocks] == [(2, 0), (4, 0)]
