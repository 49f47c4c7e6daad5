"""Warehouses per channel, through real gRPC (in-process server on loopback,
real PostgreSQL): a channel reserves and reads stock only in its own
warehouses, in its own order, with real concurrency; carts on a channel hold
from its warehouses; a channel without a setting keeps the default behaviour."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from entrepot.cart.v1 import cart_pb2
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.platform.v1 import channel_pb2, types_pb2
from entrepot_client import Entrepot, FailedPreconditionError, InvalidArgumentError, NotFoundError
from tests.conftest import unique
from tests.integration.test_inventory_api import make_item, make_warehouse, reserve
from tests.inventory_support import check_invariants

Factory = Callable[..., Entrepot]


async def make_channel(admin: Entrepot) -> str:
    slug = unique("ch").lower().replace("_", "-")
    await admin.channel.create_channel(
        channel_pb2.CreateChannelRequest(
            channel=channel_pb2.Channel(slug=slug, name=slug, currency="EUR", timezone="Europe/Paris")
        )
    )
    return slug


async def allocate(
    admin: Entrepot,
    channel: str,
    codes: list[str],
    strategy: int = pb.ALLOCATION_STRATEGY_PRIORITY,
) -> pb.ChannelAllocation:
    return await admin.inventory.set_channel_allocation(
        pb.SetChannelAllocationRequest(
            allocation=pb.ChannelAllocation(channel=channel, warehouse_codes=codes, strategy=strategy),
            request_id=uuid.uuid4().hex,
        )
    )


def taken(res: pb.Reservation) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in res.lines:
        out[line.warehouse_code] = out.get(line.warehouse_code, 0) + line.quantity
    return out


async def test_set_and_get_channel_allocation(admin: Entrepot) -> None:
    ch = await make_channel(admin)
    never = await admin.inventory.get_channel_allocation(pb.GetChannelAllocationRequest(channel=ch))
    assert (list(never.warehouse_codes), never.strategy, never.HasField("update_time")) == (
        [],
        pb.ALLOCATION_STRATEGY_PRIORITY,
        False,
    )
    w1, w2 = await make_warehouse(admin), await make_warehouse(admin)
    done = await allocate(admin, ch, [w2, w1], pb.ALLOCATION_STRATEGY_HIGH_STOCK)
    got = await admin.inventory.get_channel_allocation(pb.GetChannelAllocationRequest(channel=ch))
    assert list(got.warehouse_codes) == [w2, w1] == list(done.warehouse_codes)
    assert got.strategy == pb.ALLOCATION_STRATEGY_HIGH_STOCK and got.HasField("update_time")
    # UNSPECIFIED is PRIORITY.
    again = await allocate(admin, ch, [w1], pb.ALLOCATION_STRATEGY_UNSPECIFIED)
    assert again.strategy == pb.ALLOCATION_STRATEGY_PRIORITY and list(again.warehouse_codes) == [w1]

    with pytest.raises(NotFoundError) as nf:
        await allocate(admin, ch, [w1, "NO-SUCH-WH"])
    assert nf.value.reason == "WAREHOUSE_NOT_FOUND" and "NO-SUCH-WH" in str(nf.value)
    with pytest.raises(NotFoundError) as nc:
        await allocate(admin, "no-such-channel", [w1])
    assert nc.value.reason == "CHANNEL_NOT_FOUND"
    with pytest.raises(NotFoundError):
        await admin.inventory.get_channel_allocation(
            pb.GetChannelAllocationRequest(channel="no-such-channel")
        )
    with pytest.raises(InvalidArgumentError) as dup:
        await allocate(admin, ch, [w1, w1])
    assert [v.field for v in dup.value.field_violations] == ["allocation.warehouse_codes[1]"]
    with pytest.raises(InvalidArgumentError) as bad:
        await allocate(admin, ch, [w1], 99)
    assert bad.value.field_violations[0].field == "allocation.strategy"
    # Refusals changed nothing.
    still = await admin.inventory.get_channel_allocation(pb.GetChannelAllocationRequest(channel=ch))
    assert list(still.warehouse_codes) == [w1]


async def test_a_channel_reserves_only_from_its_warehouses_in_its_order(
    admin: Entrepot, client_factory: Factory
) -> None:
    # Priorities say w3, w1, w2; channel A's list says w2 then w1; B has w3 only.
    w1, w2, w3 = (
        await make_warehouse(admin, priority=5),
        await make_warehouse(admin, priority=9),
        await make_warehouse(admin, priority=-5),
    )
    a, b = await make_channel(admin), await make_channel(admin)
    await allocate(admin, a, [w2, w1])
    await allocate(admin, b, [w3])
    sku = await make_item(admin, {w1: 2, w2: 3, w3: 10})
    ep_a, ep_b = client_factory(channel=a), client_factory(channel=b)

    res = await ep_a.inventory.reserve_stock(reserve(sku, 4))
    assert [(x.warehouse_code, x.quantity) for x in res.lines] == [(w2, 3), (w1, 1)]
    with pytest.raises(FailedPreconditionError) as short:
        await ep_a.inventory.reserve_stock(reserve(sku, 2))  # 1 left for A; w3's 10 are not A's
    assert short.value.reason == "INSUFFICIENT_STOCK"
    assert short.value.precondition_violations[0].description == "requested 2, available 1"
    with pytest.raises(FailedPreconditionError) as other:
        await ep_a.inventory.reserve_stock(reserve(sku, 1, wh=w3))
    assert other.value.reason == "WAREHOUSE_NOT_IN_CHANNEL"
    assert taken(await ep_b.inventory.reserve_stock(reserve(sku, 10))) == {w3: 10}
    # Without a channel (no x-channel-slug): every active warehouse by priority, as before.
    no_channel = client_factory(channel=None)
    assert taken(await no_channel.inventory.reserve_stock(reserve(sku, 1))) == {w1: 1}
    # A channel without a setting behaves like no channel.
    c = await make_channel(admin)
    with pytest.raises(FailedPreconditionError):
        await client_factory(channel=c).inventory.reserve_stock(reserve(sku, 1))  # all taken now


async def test_stock_reads_per_channel(admin: Entrepot) -> None:
    w1, w2, w3 = await make_warehouse(admin), await make_warehouse(admin), await make_warehouse(admin)
    a = await make_channel(admin)
    await allocate(admin, a, [w1, w2])
    sku = await make_item(admin, {w1: 2, w2: 3, w3: 10})
    sku2 = await make_item(admin, {w3: 7})
    await admin.inventory.reserve_stock(reserve(sku, 1, wh=w2))
    whole = await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku))
    assert whole.available == 14
    seen = await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku, channel=a))
    assert (seen.on_hand, seen.reserved, seen.available) == (5, 1, 4)
    assert sorted(lv.warehouse_code for lv in seen.warehouses) == sorted([w1, w2])
    outside = await admin.inventory.get_stock_level(
        pb.GetStockLevelRequest(sku=sku, warehouse_code=w3, channel=a)
    )
    assert (list(outside.warehouses), outside.available) == ([], 0)
    batch = await admin.inventory.batch_get_stock_levels(
        pb.BatchGetStockLevelsRequest(skus=[sku, sku2], channel=a)
    )
    assert [(s.sku, s.available) for s in batch.stocks] == [(sku, 4), (sku2, 0)]
    listed = await admin.inventory.list_stock_levels(
        pb.ListStockLevelsRequest(sku_prefix=sku, channel=a, page_size=1)
    )
    codes = [lv.warehouse_code for lv in listed.levels]
    assert listed.next_page_token
    nxt = await admin.inventory.list_stock_levels(
        pb.ListStockLevelsRequest(sku_prefix=sku, channel=a, page_size=1, page_token=listed.next_page_token)
    )
    codes += [lv.warehouse_code for lv in nxt.levels]
    assert sorted(codes) == sorted([w1, w2]) and not nxt.next_page_token
    # A deactivated warehouse is not sold from any more.
    await admin.inventory.deactivate_warehouse(pb.DeactivateWarehouseRequest(code=w1))
    seen = await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku, channel=a))
    assert [lv.warehouse_code for lv in seen.warehouses] == [w2] and seen.available == 2
    with pytest.raises(NotFoundError) as nf:
        await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku, channel="no-such-channel"))
    assert nf.value.reason == "CHANNEL_NOT_FOUND"


async def test_watch_stock_changes_per_channel(admin: Entrepot) -> None:
    w1, w2 = await make_warehouse(admin), await make_warehouse(admin)
    a = await make_channel(admin)
    await allocate(admin, a, [w1])
    sku = await make_item(admin)
    stream = admin.inventory.watch_stock_changes(pb.WatchStockChangesRequest(skus=[sku], channel=a))
    got: list[str] = []

    async def read() -> None:
        async for msg in stream:
            got.extend(e.warehouse_code for e in msg.events)
            if len(got) >= 1:
                return

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.5)  # the watch starts "from now on"
    for wh in (w2, w1):
        await admin.inventory.set_stock(pb.SetStockRequest(sku=sku, warehouse_code=wh, quantity=3))
    await asyncio.wait_for(reader, 10)
    assert got == [w1]
    await stream.aclose()


async def test_concurrent_channels_never_cross(
    admin: Entrepot, client_factory: Factory, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Two channels with their own warehouses reserve the same SKU at once,
    singly and in the same batches: each gets exactly its own warehouses' units."""
    wa1, wa2, wb = await make_warehouse(admin), await make_warehouse(admin), await make_warehouse(admin)
    a, b = await make_channel(admin), await make_channel(admin)
    await allocate(admin, a, [wa1, wa2])
    await allocate(admin, b, [wb])
    sku = await make_item(admin, {wa1: 7, wa2: 5, wb: 9})
    ep_a, ep_b = client_factory(channel=a), client_factory(channel=b)

    async def one(ep: Entrepot) -> dict[str, int]:
        try:
            return taken(await ep.inventory.reserve_stock(reserve(sku, 1, rid=uuid.uuid4().hex)))
        except FailedPreconditionError as err:
            assert err.reason == "INSUFFICIENT_STOCK"
            return {}

    results = await asyncio.gather(*[one(ep_a if i % 2 else ep_b) for i in range(80)])
    by_channel = {a: dict[str, int](), b: dict[str, int]()}
    for i, r in enumerate(results):
        for wh, q in r.items():
            side = by_channel[a if i % 2 else b]
            side[wh] = side.get(wh, 0) + q
    assert by_channel[a] == {wa1: 7, wa2: 5}
    assert by_channel[b] == {wb: 9}
    async with sessions() as s, s.begin():
        assert await check_invariants(s) > 0


async def test_cart_hold_allocates_from_the_carts_channel(admin: Entrepot, client_factory: Factory) -> None:
    w_mine, w_other = await make_warehouse(admin, priority=9), await make_warehouse(admin, priority=-9)
    ch = await make_channel(admin)
    await allocate(admin, ch, [w_mine])
    sku = await make_item(admin, {w_mine: 2, w_other: 50})
    ep = client_factory(channel=ch)
    price = types_pb2.Money(currency_code="EUR", amount_minor=100)
    cart = await ep.cart.create_cart(
        cart_pb2.CreateCartRequest(
            cart=cart_pb2.Cart(
                customer_ref=unique("c"), lines=[cart_pb2.CartLine(sku=sku, quantity=2, unit_price=price)]
            )
        )
    )
    cart = await ep.cart.hold_cart_stock(cart_pb2.HoldCartStockRequest(cart_id=cart.id, version=cart.version))
    held = await admin.inventory.get_reservation(pb.GetReservationRequest(id=cart.hold.reservation_id))
    assert taken(held) == {w_mine: 2}
    # The channel has nothing left: a second cart's hold is refused although w_other has 50.
    other = await ep.cart.create_cart(
        cart_pb2.CreateCartRequest(
            cart=cart_pb2.Cart(
                customer_ref=unique("c"), lines=[cart_pb2.CartLine(sku=sku, quantity=1, unit_price=price)]
            )
        )
    )
    with pytest.raises(FailedPreconditionError) as short:
        await ep.cart.hold_cart_stock(cart_pb2.HoldCartStockRequest(cart_id=other.id, version=other.version))
    assert short.value.reason == "INSUFFICIENT_STOCK"
