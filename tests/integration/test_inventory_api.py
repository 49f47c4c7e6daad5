"""InventoryService through real gRPC (in-process server on loopback, real
PostgreSQL): what a caller sees, including error details, plus the
concurrency guarantees (no oversell, ledger == counters)."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Callable

import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.platform.v1 import types_pb2
from entrepot_client import (
    AlreadyExistsError,
    Entrepot,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from entrepot_client.inventory import shortages
from tests.conftest import unique
from tests.inventory_support import check_invariants, settle_and_check


async def make_warehouse(ep: Entrepot, priority: int = 0) -> str:
    code = unique("WH")
    await ep.inventory.create_warehouse(
        pb.CreateWarehouseRequest(
            warehouse=pb.Warehouse(
                code=code,
                name=f"Warehouse {code}",
                priority=priority,
                address=types_pb2.PostalAddress(line1="1 rue du Port", city="Lyon", country_code="FR"),
                contact=types_pb2.Contact(name="Dock", email="dock@example.com"),
            ),
            request_id=uuid.uuid4().hex,
        )
    )
    return code


async def make_item(ep: Entrepot, stock: dict[str, int] | None = None, **policy: object) -> str:
    sku = unique("SKU")
    await ep.inventory.upsert_inventory_item(
        pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=sku, track_inventory=True, **policy))  # type: ignore[arg-type]
    )
    for wh, q in (stock or {}).items():
        await ep.inventory.set_stock(
            pb.SetStockRequest(sku=sku, warehouse_code=wh, quantity=q, reason="initial")
        )
    return sku


def reserve(
    sku: str, q: int, *, ttl: float = 0, ref: str = "", rid: str = "", wh: str = ""
) -> pb.ReserveStockRequest:
    req = pb.ReserveStockRequest(
        lines=[pb.ReservationLineRequest(sku=sku, quantity=q, warehouse_code=wh)],
        reference=ref,
        request_id=rid,
    )
    if ttl:
        req.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl), nanos=int((ttl % 1) * 1e9)))
    return req


async def test_warehouse_pages_keep_every_warehouse_that_shares_a_priority(admin: Entrepot) -> None:
    # Three warehouses share a priority no other test uses: with two per page, a page boundary
    # falls inside the group, and the next page must start after (priority, code), not after priority.
    priority = random.randint(900_000, 1_000_000)
    group = sorted([await make_warehouse(admin, priority=priority) for _ in range(3)])
    listed: list[str] = []
    token = ""
    while True:
        page = await admin.inventory.list_warehouses(pb.ListWarehousesRequest(page_size=2, page_token=token))
        listed += [w.code for w in page.warehouses if w.priority == priority]
        token = page.next_page_token
        if not token:
            break
    assert listed == group


async def test_warehouses_create_update_mask_deactivate_and_list(admin: Entrepot) -> None:
    code = await make_warehouse(admin, priority=5)
    got = await admin.inventory.get_warehouse(pb.GetWarehouseRequest(code=code))
    assert got.address.city == "Lyon" and got.contact.email == "dock@example.com" and got.active
    updated = await admin.inventory.update_warehouse(
        pb.UpdateWarehouseRequest(
            warehouse=pb.Warehouse(
                code=code, name="ignored", priority=1, address=types_pb2.PostalAddress(city="Paris")
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["priority", "address.city"]),
        )
    )
    assert (updated.name, updated.priority, updated.address.city, updated.address.line1) == (
        got.name,
        1,
        "Paris",
        "1 rue du Port",
    )
    with pytest.raises(InvalidArgumentError) as err:
        await admin.inventory.update_warehouse(
            pb.UpdateWarehouseRequest(
                warehouse=pb.Warehouse(code=code), update_mask=field_mask_pb2.FieldMask(paths=["code"])
            )
        )
    assert err.value.field_violations[0].field == "update_mask"
    with pytest.raises(AlreadyExistsError) as dup:
        await admin.inventory.create_warehouse(
            pb.CreateWarehouseRequest(warehouse=pb.Warehouse(code=code, name="x"))
        )
    assert dup.value.reason == "WAREHOUSE_EXISTS"
    off = await admin.inventory.deactivate_warehouse(pb.DeactivateWarehouseRequest(code=code))
    assert not off.active
    codes: list[str] = []
    token = ""
    while True:
        page = await admin.inventory.list_warehouses(
            pb.ListWarehousesRequest(page_size=2, page_token=token, include_inactive=True)
        )
        codes += [w.code for w in page.warehouses]
        token = page.next_page_token
        if not token:
            break
    assert code in codes and len(codes) == len(set(codes))
    active = await admin.inventory.list_warehouses(pb.ListWarehousesRequest(page_size=500))
    assert code not in [w.code for w in active.warehouses]
    with pytest.raises(NotFoundError) as nf:
        await admin.inventory.get_warehouse(pb.GetWarehouseRequest(code="missing-wh"))
    assert nf.value.reason == "WAREHOUSE_NOT_FOUND"


async def test_levels_filters_pagination_and_batch_get(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    prefix = unique("LV") + "-"
    for i in range(6):
        await admin.inventory.upsert_inventory_item(
            pb.UpsertInventoryItemRequest(
                item=pb.InventoryItem(sku=f"{prefix}{i}", low_stock_threshold=2, allow_backorder=True)
            )
        )
        await admin.inventory.set_stock(pb.SetStockRequest(sku=f"{prefix}{i}", warehouse_code=wh, quantity=i))
    await admin.inventory.reserve_stock(reserve(f"{prefix}0", 2, wh=wh))
    seen, token = [], ""
    while True:
        page = await admin.inventory.list_stock_levels(
            pb.ListStockLevelsRequest(page_size=4, page_token=token, sku_prefix=prefix, warehouse_code=wh)
        )
        seen += [(lv.sku, lv.available) for lv in page.levels]
        token = page.next_page_token
        if not token:
            break
    assert seen == [(f"{prefix}0", -2)] + [(f"{prefix}{i}", i) for i in range(1, 6)]
    below = await admin.inventory.list_stock_levels(
        pb.ListStockLevelsRequest(sku_prefix=prefix, below_threshold_only=True)
    )
    assert [lv.sku for lv in below.levels] == [f"{prefix}{i}" for i in range(3)]
    bo = await admin.inventory.list_stock_levels(
        pb.ListStockLevelsRequest(sku_prefix=prefix, backordered_only=True)
    )
    assert [(lv.sku, lv.backordered) for lv in bo.levels] == [(f"{prefix}0", 2)]
    batch = await admin.inventory.batch_get_stock_levels(
        pb.BatchGetStockLevelsRequest(skus=[f"{prefix}3", "nope-1", f"{prefix}3", f"{prefix}1"])
    )
    assert [s.sku for s in batch.stocks] == [f"{prefix}3", f"{prefix}1"] and list(batch.missing_skus) == [
        "nope-1"
    ]
    with pytest.raises(InvalidArgumentError) as err:
        await admin.inventory.batch_get_stock_levels(pb.BatchGetStockLevelsRequest(skus=["a"] * 1001))
    assert err.value.field_violations[0].field == "skus"
    with pytest.raises(InvalidArgumentError) as bad_token:
        await admin.inventory.list_stock_levels(pb.ListStockLevelsRequest(page_token="not-a-token"))
    assert bad_token.value.reason == "INVALID_PAGE_TOKEN"


async def test_concurrent_adjustments_equal_the_ledger(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 20})
    deltas = [random.choice([-2, -1, 1, 3]) for _ in range(80)]

    async def one(d: int) -> int:
        try:
            await admin.inventory.adjust_stock(
                pb.AdjustStockRequest(
                    sku=sku, warehouse_code=wh, delta=d, reason="cycle count", request_id=uuid.uuid4().hex
                )
            )
            return d
        except FailedPreconditionError as err:
            assert err.reason in ("INSUFFICIENT_STOCK", "STOCK_RESERVED")
            return 0

    applied = sum(await asyncio.gather(*(one(d) for d in deltas)))
    level = await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku))
    assert level.on_hand == 20 + applied
    total, token = 0, ""
    while True:
        page = await admin.inventory.list_stock_movements(
            pb.ListStockMovementsRequest(sku=sku, page_size=25, page_token=token)
        )
        total += sum(m.on_hand_delta for m in page.movements)
        token = page.next_page_token
        if not token:
            break
    assert total == level.on_hand
    async with sessions() as s:
        await check_invariants(s)


async def test_set_stock_stale_expected_value_is_refused_with_details(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 5})
    await admin.inventory.set_stock(
        pb.SetStockRequest(sku=sku, warehouse_code=wh, quantity=8, expected_on_hand=5)
    )
    with pytest.raises(FailedPreconditionError) as err:
        await admin.inventory.set_stock(
            pb.SetStockRequest(sku=sku, warehouse_code=wh, quantity=1, expected_on_hand=5)
        )
    assert err.value.reason == "STOCK_CHANGED"
    assert err.value.precondition_violations[0].subject == sku
    assert err.value.metadata["on_hand"] == "8"
    with pytest.raises(InvalidArgumentError) as bad:
        await admin.inventory.set_stock(pb.SetStockRequest(sku=" bad", warehouse_code=wh, quantity=-1))
    assert {v.field for v in bad.value.field_violations} == {"sku", "quantity"}


async def test_bulk_adjust_is_all_or_nothing(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    a = await make_item(admin, {wh: 5})
    b = await make_item(admin, {wh: 1})
    req = pb.BulkAdjustStockRequest(
        adjustments=[
            pb.StockAdjustment(sku=a, warehouse_code=wh, delta=-1),
            pb.StockAdjustment(sku=b, warehouse_code=wh, delta=-3),
            pb.StockAdjustment(sku=a, warehouse_code="nowhere", delta=2),
        ],
        request_id=uuid.uuid4().hex,
    )
    with pytest.raises(FailedPreconditionError) as err:
        await admin.inventory.bulk_adjust_stock(req)
    assert [v.subject for v in err.value.precondition_violations] == ["adjustments[1]", "adjustments[2]"]
    # The refusal is the stored answer for that request_id.
    with pytest.raises(FailedPreconditionError):
        await admin.inventory.bulk_adjust_stock(req)
    assert (await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=a))).on_hand == 5
    ok = await admin.inventory.bulk_adjust_stock(
        pb.BulkAdjustStockRequest(
            adjustments=[req.adjustments[0], pb.StockAdjustment(sku=b, warehouse_code=wh, delta=4)]
        )
    )
    assert [c.level.on_hand for c in ok.changes] == [4, 5]


async def test_200_concurrent_reservations_on_10_units_grant_exactly_10(
    admin: Entrepot, target: str, make_token: Callable[..., str], sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 10})
    # Four separate connections (own subchannel pools): one HTTP/2 connection
    # carries at most max_concurrent_streams (100) calls at once.
    callers = [
        Entrepot(target, make_token(sub=f"buyer-{n}"), None, options=[("grpc.use_local_subchannel_pool", 1)])
        for n in range(4)
    ]

    async def one(i: int) -> bool:
        try:
            await callers[i % 4].inventory.reserve_stock(
                reserve(sku, 1, ref=f"order:{i}", rid=uuid.uuid4().hex)
            )
            return True
        except FailedPreconditionError as err:
            assert err.reason == "INSUFFICIENT_STOCK"
            (v,) = err.precondition_violations
            assert v.subject == sku and "requested 1" in v.description
            return False

    try:
        results = await asyncio.gather(*(one(i) for i in range(200)))
    finally:
        for c in callers:
            await c.close()
    assert sum(results) == 10
    level = await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku))
    assert (level.on_hand, level.reserved, level.available) == (10, 10, 0)
    async with sessions() as s:
        await check_invariants(s)


async def test_reserve_idempotency_replays_and_detects_reuse(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 100})
    rid = uuid.uuid4().hex
    answers = await asyncio.gather(
        *(admin.inventory.reserve_stock(reserve(sku, 2, rid=rid)) for _ in range(20))
    )
    assert len({a.id for a in answers}) == 1
    assert (await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku))).reserved == 2
    with pytest.raises(AlreadyExistsError) as err:
        await admin.inventory.reserve_stock(reserve(sku, 3, rid=rid))
    assert err.value.reason == "REQUEST_ID_REUSED"
    # A refusal is stored too: retrying it gives the same refusal even after stock arrives.
    short = reserve(sku, 1000, rid=uuid.uuid4().hex)
    with pytest.raises(FailedPreconditionError):
        await admin.inventory.reserve_stock(short)
    await admin.inventory.adjust_stock(pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=2000))
    with pytest.raises(FailedPreconditionError) as again:
        await admin.inventory.reserve_stock(short)
    assert again.value.reason == "INSUFFICIENT_STOCK"


async def test_two_lines_of_one_sku_and_failed_request_leaves_nothing(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    a = await make_item(admin, {wh: 3})
    b = await make_item(admin, {wh: 10})
    req = pb.ReserveStockRequest(
        lines=[
            pb.ReservationLineRequest(sku=b, quantity=4),
            pb.ReservationLineRequest(sku=a, quantity=2),
            pb.ReservationLineRequest(sku=a, quantity=2),
        ],
        reference="order:two-lines",
    )
    with pytest.raises(FailedPreconditionError) as err:
        await admin.inventory.reserve_stock(req)
    (v,) = err.value.precondition_violations
    assert v.subject == a and "requested 4" in v.description and "available 3" in v.description
    assert shortages(err.value) == {a: "requested 4, available 3"}
    for sku in (a, b):
        assert (await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku))).reserved == 0
    listed = await admin.inventory.list_reservations(pb.ListReservationsRequest(reference="order:two-lines"))
    assert list(listed.reservations) == []


async def test_allocation_splits_by_priority(admin: Entrepot) -> None:
    first = await make_warehouse(admin, priority=-1000)
    second = await make_warehouse(admin, priority=-999)
    sku = await make_item(admin, {first: 2, second: 5})
    res = await admin.inventory.reserve_stock(reserve(sku, 4, ref="order:split"))
    assert [(x.warehouse_code, x.quantity) for x in res.lines] == [(first, 2), (second, 2)]
    got = await admin.inventory.get_reservation(pb.GetReservationRequest(id=res.id))
    assert got == res
    listed = await admin.inventory.list_reservations(
        pb.ListReservationsRequest(reference="order:split", state=pb.Reservation.STATE_ACTIVE)
    )
    assert res.id in [r.id for r in listed.reservations]


async def test_expired_holds_are_released(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 5})
    res = await admin.inventory.reserve_stock(reserve(sku, 3, ttl=0.5, ref="cart:exp"))
    assert res.HasField("expire_time")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        got = await admin.inventory.get_reservation(pb.GetReservationRequest(id=res.id))
        if got.state == pb.Reservation.STATE_EXPIRED:
            break
        await asyncio.sleep(0.2)
    assert got.state == pb.Reservation.STATE_EXPIRED and got.lines[0].released_quantity == 3
    assert (await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku))).reserved == 0
    moves = await admin.inventory.list_stock_movements(
        pb.ListStockMovementsRequest(sku=sku, types=[pb.MOVEMENT_TYPE_RELEASE])
    )
    assert [(m.reserved_delta, m.source, m.reason) for m in moves.movements] == [(-3, "sweeper", "expired")]
    with pytest.raises(FailedPreconditionError):
        await admin.inventory.extend_reservation(
            pb.ExtendReservationRequest(id=res.id, ttl=duration_pb2.Duration(seconds=60))
        )


async def test_partial_fulfilment_then_release_and_reserved_never_negative(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    sku = await make_item(admin)
    await admin.inventory.receive_stock(
        pb.ReceiveStockRequest(
            sku=sku,
            warehouse_code=wh,
            quantity=2,
            unit_cost=types_pb2.Money(currency_code="EUR", amount_minor=100),
        )
    )
    await admin.inventory.receive_stock(
        pb.ReceiveStockRequest(
            sku=sku,
            warehouse_code=wh,
            quantity=5,
            unit_cost=types_pb2.Money(currency_code="EUR", amount_minor=130),
        )
    )
    res = await admin.inventory.reserve_stock(reserve(sku, 5, ref="order:partial", wh=wh))
    ext = await admin.inventory.extend_reservation(
        pb.ExtendReservationRequest(id=res.id, ttl=duration_pb2.Duration(seconds=3600))
    )
    assert ext.HasField("expire_time")
    done = await admin.inventory.fulfill_reservation(
        pb.FulfillReservationRequest(
            id=res.id, lines=[pb.ReservationQuantity(sku=sku, quantity=3)], reference="shipment-1"
        )
    )
    (m,) = done.movements
    assert (m.on_hand_delta, m.reserved_delta, m.cost.amount_minor, m.cost.currency_code) == (
        -3,
        -3,
        330,
        "EUR",
    )
    assert (
        done.reservation.state == pb.Reservation.STATE_ACTIVE and done.reservation.lines[0].open_quantity == 2
    )
    rest = await admin.inventory.release_reservation(
        pb.ReleaseReservationRequest(id=res.id, reason="cancelled")
    )
    assert rest.state == pb.Reservation.STATE_RELEASED and rest.lines[0].released_quantity == 2
    with pytest.raises(FailedPreconditionError) as err:
        await admin.inventory.release_reservation(
            pb.ReleaseReservationRequest(id=res.id, lines=[pb.ReservationQuantity(sku=sku, quantity=1)])
        )
    assert err.value.reason == "RESERVATION_NOT_ACTIVE"
    level = await admin.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku))
    assert (level.on_hand, level.reserved) == (4, 0)
    ret = await admin.inventory.return_stock(
        pb.ReturnStockRequest(sku=sku, warehouse_code=wh, quantity=1, reference="order:partial")
    )
    assert ret.movement.type == pb.MOVEMENT_TYPE_RETURN and ret.level.on_hand == 5
    with pytest.raises(NotFoundError):
        await admin.inventory.get_reservation(pb.GetReservationRequest(id=str(uuid.uuid4())))


async def test_random_soak_keeps_the_invariants(
    admin: Entrepot, client_factory: Callable[..., Entrepot], sessions: async_sessionmaker[AsyncSession]
) -> None:
    seconds = float(os.environ.get("ENTREPOT_SOAK_SECONDS", "3"))
    whs = [await make_warehouse(admin, priority=p) for p in (-500, -499)]
    skus = [
        await make_item(admin, {whs[0]: 6, whs[1]: 4}, allow_backorder=(i % 5 == 0), max_backorder_quantity=3)
        for i in range(20)
    ]
    held: list[str] = []
    counts = {"ok": 0, "refused": 0}
    deadline = time.monotonic() + seconds

    async def worker(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < deadline:
            op = rnd.random()
            try:
                if op < 0.4:
                    lines = [
                        pb.ReservationLineRequest(sku=rnd.choice(skus), quantity=rnd.randint(1, 3))
                        for _ in range(rnd.randint(1, 3))
                    ]
                    req = pb.ReserveStockRequest(lines=lines, request_id=uuid.uuid4().hex)
                    if rnd.random() < 0.3:
                        req.ttl.CopyFrom(duration_pb2.Duration(nanos=rnd.randint(2, 8) * 100_000_000))
                    held.append((await admin.inventory.reserve_stock(req)).id)
                elif op < 0.55 and held:
                    await admin.inventory.release_reservation(
                        pb.ReleaseReservationRequest(id=rnd.choice(held))
                    )
                elif op < 0.7 and held:
                    await admin.inventory.fulfill_reservation(
                        pb.FulfillReservationRequest(id=rnd.choice(held))
                    )
                else:
                    await admin.inventory.adjust_stock(
                        pb.AdjustStockRequest(
                            sku=rnd.choice(skus),
                            warehouse_code=rnd.choice(whs),
                            delta=rnd.choice([-2, -1, 1, 2, 4]),
                        )
                    )
                counts["ok"] += 1
            except FailedPreconditionError:
                counts["refused"] += 1

    await asyncio.gather(*(worker(i) for i in range(16)))
    assert await settle_and_check(sessions) >= 40
    assert counts["ok"] > 50


async def test_hostile_input_is_invalid_argument_never_internal(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 1})
    bad_calls = [
        admin.inventory.adjust_stock(
            pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=1, reason="a\x00b")
        ),
        admin.inventory.adjust_stock(pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=2**62)),
        admin.inventory.get_reservation(pb.GetReservationRequest(id="not-a-uuid")),
        admin.inventory.list_stock_levels(pb.ListStockLevelsRequest(sku_prefix="x\x00")),
        admin.inventory.list_reservations(pb.ListReservationsRequest(reference="\x00")),
        admin.inventory.get_warehouse(pb.GetWarehouseRequest(code="\x00")),
        admin.inventory.receive_stock(
            pb.ReceiveStockRequest(
                sku=sku,
                warehouse_code=wh,
                quantity=10**12,
                unit_cost=types_pb2.Money(currency_code="EUR", amount_minor=10**12),
            )
        ),
        admin.inventory.reserve_stock(reserve(sku, 0)),
        admin.inventory.reserve_stock(pb.ReserveStockRequest()),
        admin.inventory.list_stock_movements(pb.ListStockMovementsRequest(types=[99])),
    ]
    for call in bad_calls:
        with pytest.raises(InvalidArgumentError):
            await call
    # Large but valid: refused by the rules (a ceiling), not by an int64 overflow.
    await admin.inventory.set_stock(pb.SetStockRequest(sku=sku, warehouse_code=wh, quantity=10**12))
    with pytest.raises(FailedPreconditionError) as err:
        await admin.inventory.bulk_adjust_stock(
            pb.BulkAdjustStockRequest(
                adjustments=[
                    pb.StockAdjustment(sku=sku, warehouse_code=wh, delta=10**12) for _ in range(1000)
                ]
            )
        )
    assert err.value.reason == "STOCK_LIMIT"
    assert [v.subject for v in err.value.precondition_violations] == ["adjustments[999]"]
