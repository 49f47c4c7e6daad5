"""Order details from a client's side (issue 24): the reissue chain, external
handoff acknowledgements, the inventory risk flag, the intent counters and
the `entrepot orders verify` audit. Real gRPC on loopback, real PostgreSQL,
real concurrency."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from google.protobuf import duration_pb2
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from entrepot.inventory.v1 import inventory_pb2 as inv
from entrepot.order.v1 import order_pb2 as pb
from entrepot.platform.v1 import channel_pb2
from entrepot_client import (
    AlreadyExistsError,
    Entrepot,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
)
from entrepot_client.order import acknowledge_handoff, reissue_order, stuck_handoffs
from tests.conftest import unique
from tests.integration.test_order_lifecycle import (
    codes,
    item,
    level,
    move,
    order_intent,
    ship,
    submit,
    warehouse,
)

ROOT = Path(__file__).resolve().parents[2]
Sessions = async_sessionmaker[AsyncSession]


async def get(ep: Entrepot, order_id: str) -> pb.Order:
    return await ep.order.get_order(pb.GetOrderRequest(id=order_id))


# ---------------------------------------------------------------- reissues


async def test_reissue_chain_reserves_links_both_ways_and_leaves_the_original(admin: Entrepot) -> None:
    wh = await warehouse(admin)
    a, b = await item(admin, wh, 10), await item(admin, wh, 10)
    original = await submit(
        admin,
        order_intent(
            [("1", a, 3, 1000), ("2", b, 2, 500)], shipping_minor=490, payments=[("t1", "card", 4490)]
        ),
        reserve=True,
    )
    assert await level(admin, a) == (10, 3)

    re1 = await reissue_order(admin.order, original.id, "parcel lost in transit", lines=[("1", 2)])
    assert re1.reissue and re1.reissued_from_order_id == original.id
    assert re1.reissue_reason == "parcel lost in transit"
    assert re1.state == pb.Order.STATE_PENDING and re1.reservation_id
    assert [(li.line_id, li.sku, li.quantity, li.unit_price.amount_minor) for li in re1.lines] == [
        ("1", a, 2, 0)
    ]
    assert re1.totals.grand_total.amount_minor == 0 and not re1.payments, "zero-priced by default"
    assert re1.source_system == "entrepot-reissue" and re1.intent_id == f"{original.id}:1"
    assert await level(admin, a) == (10, 5), "the reissue reserved in its own transaction"
    res = await admin.inventory.get_reservation(inv.GetReservationRequest(id=re1.reservation_id))
    assert res.reference == f"order:{re1.id}"

    after = await get(admin, original.id)
    assert list(after.reissue_order_ids) == [re1.id] and not after.reissue
    assert after.totals == original.totals and after.lines == original.lines
    assert after.payments == original.payments
    assert "order:reissued" in await codes(admin, original.id)
    assert await codes(admin, re1.id) == ["order:reissue_of", "inventory:reservation_confirmed"]

    # A reissue of the reissue: the chain stays walkable both ways.
    re2 = await reissue_order(admin.order, re1.id, "second replacement")
    assert re2.reissued_from_order_id == re1.id and re2.intent_id == f"{re1.id}:1"
    middle = await get(admin, re1.id)
    assert list(middle.reissue_order_ids) == [re2.id] and middle.reissued_from_order_id == original.id

    # Every line at the reissued order's unit prices; no tax, shipping, discount or payments.
    re3 = await reissue_order(admin.order, original.id, "wrong colour", keep_unit_prices=True)
    assert re3.intent_id == f"{original.id}:2"
    assert [li.unit_price.amount_minor for li in re3.lines] == [1000, 500]
    assert re3.totals.grand_total.amount_minor == re3.totals.subtotal.amount_minor == 4000
    assert not re3.payments and re3.totals.shipping.amount_minor == 0
    assert list((await get(admin, original.id)).reissue_order_ids) == [re1.id, re3.id]


async def test_reissue_refusals_create_nothing(admin: Entrepot) -> None:
    wh = await warehouse(admin)
    a = await item(admin, wh, 3)
    original = await submit(admin, order_intent([("1", a, 3, 1000)]), reserve=True)
    with pytest.raises(InvalidArgumentError) as bad:
        await reissue_order(admin.order, original.id, "  ")
    assert [v.field for v in bad.value.field_violations] == ["reason"]
    with pytest.raises(InvalidArgumentError) as bad:
        await reissue_order(admin.order, original.id, "damaged", lines=[("9", 1), ("1", 4)])
    assert [v.field for v in bad.value.field_violations] == ["lines[0].line_id", "lines[1].quantity"]
    with pytest.raises(FailedPreconditionError) as short:
        await reissue_order(admin.order, original.id, "damaged")  # no stock left for a replacement
    assert short.value.reason == "INSUFFICIENT_STOCK"
    after = await get(admin, original.id)
    assert not after.reissue_order_ids and await level(admin, a) == (3, 3)


async def test_concurrent_reissues_with_one_request_id_make_one_reissue(admin: Entrepot) -> None:
    wh = await warehouse(admin)
    a = await item(admin, wh, 100)
    original = await submit(admin, order_intent([("1", a, 2, 1000)]))
    key = uuid.uuid4().hex
    made = await asyncio.gather(
        *(reissue_order(admin.order, original.id, "lost", request_id=key) for _ in range(8))
    )
    assert len({o.id for o in made}) == 1
    assert len((await get(admin, original.id)).reissue_order_ids) == 1
    assert await level(admin, a) == (100, 2), "reserved once"
    assert (await codes(admin, original.id)).count("order:reissued") == 1


# ---------------------------------------------------------------- handoffs


async def test_handoff_is_acknowledged_once_in_the_callers_namespace(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    erp = client_factory(
        sub="erp-bridge", permissions=["order.read", "order.status.write"], status_namespaces=["erp"]
    )
    customer = unique("cust")
    waiting = await submit(admin, order_intent([("1", unique("SKU"), 1, 100)], customer_ref=customer))
    taken = await submit(admin, order_intent([("1", unique("SKU"), 1, 100)], customer_ref=customer))

    acked = await acknowledge_handoff(erp.order, taken.id, "ERP-4711")
    assert acked.external_handoff_reference == "ERP-4711" and acked.HasField(
        "external_handoff_acknowledge_time"
    )
    again = await acknowledge_handoff(erp.order, taken.id, "ERP-4711")
    assert again.external_handoff_acknowledge_time == acked.external_handoff_acknowledge_time
    assert (await codes(admin, taken.id, "erp")) == ["erp:handoff_acknowledged"], "a repeat writes nothing"
    with pytest.raises(FailedPreconditionError) as other:
        await acknowledge_handoff(erp.order, taken.id, "ERP-9999")
    assert other.value.reason == "HANDOFF_ALREADY_ACKNOWLEDGED"
    with pytest.raises(PermissionDeniedError) as ns:
        await acknowledge_handoff(erp.order, waiting.id, "WMS-1", module="wms")
    assert ns.value.reason == "STATUS_NAMESPACE_FORBIDDEN"
    with pytest.raises(InvalidArgumentError):
        await acknowledge_handoff(erp.order, waiting.id, "has space")

    # The stuck-handoffs view: old enough and not acknowledged.
    await asyncio.sleep(0.05)
    request = pb.ListOrdersRequest(customer_ref=customer)
    request.handoff_unacknowledged_for.FromTimedelta(timedelta(milliseconds=10))
    assert [o.id for o in (await admin.order.list_orders(request)).orders] == [waiting.id]
    request.handoff_unacknowledged_for.FromTimedelta(timedelta(hours=1))
    assert not (await admin.order.list_orders(request)).orders
    stuck = [o.id async for o in stuck_handoffs(admin.order, timedelta(milliseconds=10))]
    assert waiting.id in stuck and taken.id not in stuck


async def test_concurrent_acknowledgements_with_different_references_one_wins(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    wms = client_factory(sub="wms", permissions=["order.status.write"], status_namespaces=["wms"])
    o = await submit(admin, order_intent([("1", unique("SKU"), 1, 100)]))
    results = await asyncio.gather(
        *(acknowledge_handoff(wms.order, o.id, f"WMS-{i}", request_id=uuid.uuid4().hex) for i in range(8)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, pb.Order)]
    lost = [r for r in results if not isinstance(r, pb.Order)]
    assert len(won) == 1 and len(lost) == 7
    assert all(
        isinstance(e, FailedPreconditionError) and e.reason == "HANDOFF_ALREADY_ACKNOWLEDGED" for e in lost
    )
    final = await get(admin, o.id)
    assert final.external_handoff_reference == won[0].external_handoff_reference
    assert await codes(admin, o.id, "wms") == ["wms:handoff_acknowledged"]


# ---------------------------------------------------------------- inventory risk


async def risk(ep: Entrepot, order_id: str) -> bool:
    summary = await ep.order.get_order_status_summary(pb.GetOrderStatusSummaryRequest(order_id=order_id))
    order = await get(ep, order_id)
    assert summary.inventory_risk == order.inventory_risk
    return order.inventory_risk


async def at_risk_ids(ep: Entrepot, customer: str) -> list[str]:
    page = await ep.order.list_orders(pb.ListOrdersRequest(customer_ref=customer, inventory_risk_only=True))
    return [o.id for o in page.orders]


async def test_backordered_order_is_at_risk_until_shipped(admin: Entrepot) -> None:
    wh = await warehouse(admin)
    a = await item(admin, wh, 1, allow_backorder=True)
    customer = unique("cust")
    o = await submit(admin, order_intent([("1", a, 3, 100)], customer_ref=customer), reserve=True)
    assert o.inventory_risk and await risk(admin, o.id)
    assert await at_risk_ids(admin, customer) == [o.id]
    # Stock arrives; the backordered units only stop being a risk once they ship.
    res = await admin.inventory.get_reservation(inv.GetReservationRequest(id=o.reservation_id))
    for held in res.lines:  # where inventory allocated them
        await admin.inventory.adjust_stock(
            inv.AdjustStockRequest(
                sku=a, warehouse_code=held.warehouse_code, delta=5, reason="po", request_id=uuid.uuid4().hex
            )
        )
    assert await risk(admin, o.id)
    await move(admin, o.id, pb.Order.STATE_PROCESSING)
    shipped = await ship(admin, o.id, {"1": 3})
    assert not shipped.order.inventory_risk and not await risk(admin, o.id)
    assert await at_risk_ids(admin, customer) == []


async def test_risk_follows_releases_by_inventory_and_clears_on_cancel(admin: Entrepot) -> None:
    wh = await warehouse(admin)
    a = await item(admin, wh, 10)
    o = await submit(admin, order_intent([("1", a, 4, 100)]), reserve=True)
    assert not await risk(admin, o.id)
    # Inventory gives back one unit of the order's hold: the reservation is short.
    await admin.inventory.release_reservation(
        inv.ReleaseReservationRequest(
            id=o.reservation_id, lines=[inv.ReservationQuantity(sku=a, quantity=1)], reason="recount"
        )
    )
    assert await risk(admin, o.id)
    await admin.inventory.release_reservation(
        inv.ReleaseReservationRequest(id=o.reservation_id, reason="ops")
    )
    assert await risk(admin, o.id)
    cancelled = await move(admin, o.id, pb.Order.STATE_CANCELLED)
    assert not cancelled.inventory_risk and not await risk(admin, o.id)


async def test_risk_is_set_when_the_reservation_expires_and_cleared_when_fulfilled(admin: Entrepot) -> None:
    wh = await warehouse(admin)
    a = await item(admin, wh, 10)
    kept = await submit(admin, order_intent([("1", a, 2, 100)]), reserve=True)
    await move(admin, kept.id, pb.Order.STATE_PROCESSING)
    partly = await ship(admin, kept.id, {"1": 1})
    assert not partly.order.inventory_risk
    assert not (await ship(admin, kept.id, {"1": 1})).order.inventory_risk

    expiring = await submit(admin, order_intent([("1", a, 2, 100)]), reserve=True)
    await admin.inventory.extend_reservation(
        inv.ExtendReservationRequest(id=expiring.reservation_id, ttl=duration_pb2.Duration(seconds=1))
    )
    deadline = time.monotonic() + 15
    while not await risk(admin, expiring.id):  # the server's sweeper releases expired holds
        assert time.monotonic() < deadline, "the expired reservation never flagged the order"
        await asyncio.sleep(0.2)
    res = await admin.inventory.get_reservation(inv.GetReservationRequest(id=expiring.reservation_id))
    assert res.state == inv.Reservation.STATE_EXPIRED


# ---------------------------------------------------------------- intent counters


def counted(source: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "entrepot_order_intents_total", {"source_system": source, "outcome": outcome}
    )
    return value or 0.0


async def test_intent_counters_by_source_system(admin: Entrepot) -> None:
    source = unique("src")
    intent = pb.OrderIntent()
    intent.CopyFrom(order_intent([("1", unique("SKU"), 1, 100)]))
    intent.source_system = source
    for _ in range(3):  # the first creates, the resends are duplicates
        await admin.order.submit_order_intent(pb.SubmitOrderIntentRequest(intent=intent))
    intent.lines[0].quantity = 2
    intent.totals.subtotal.amount_minor = intent.totals.grand_total.amount_minor = 200
    with pytest.raises(AlreadyExistsError):
        await admin.order.submit_order_intent(pb.SubmitOrderIntentRequest(intent=intent))
    assert (counted(source, "created"), counted(source, "duplicate"), counted(source, "conflict")) == (
        1,
        2,
        1,
    )


# ---------------------------------------------------------------- audit CLI


def verify(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "orders", "verify", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_orders_verify_reports_each_difference_as_one_line(
    client_factory: Callable[..., Entrepot], database_url: str, sessions: Sessions
) -> None:
    slug = unique("audit")
    await client_factory(channel=None).channel.create_channel(
        channel_pb2.CreateChannelRequest(channel=channel_pb2.Channel(slug=slug, name="Audit", currency="EUR"))
    )
    ep = client_factory(channel=slug)
    stocked = await item(ep, await warehouse(ep), 10)
    sound = await submit(ep, order_intent([("1", stocked, 2, 150)], payments=[("t", "card", 300)]))
    tampered = await submit(ep, order_intent([("1", unique("SKU"), 1, 100), ("2", unique("SKU"), 1, 50)]))
    await ep.order.reissue_order(pb.ReissueOrderRequest(order_id=sound.id, reason="lost"))

    ok = await asyncio.to_thread(verify, database_url, "--channel", slug)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "" and ok.stderr.strip() == f"verified 3 orders of channel {slug}: 0 differences"

    # The stored intent says 5 units where the order row says 1; the row's price drifted too.
    async with sessions() as s, s.begin():
        await s.execute(
            text(
                "UPDATE orders.orders SET content = jsonb_set(content, '{lines,0,quantity}', '5') "
                "WHERE id = CAST(:id AS uuid)"
            ),
            {"id": tampered.id},
        )
        await s.execute(text("SET LOCAL session_replication_role = replica"))  # past the immutability trigger
        await s.execute(
            text(
                "UPDATE orders.order_lines SET unit_price_minor = 60 WHERE order_id = CAST(:id AS uuid) AND line_id = '2'"
            ),
            {"id": tampered.id},
        )
    bad = await asyncio.to_thread(verify, database_url, "--channel", slug)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    lines = bad.stdout.splitlines()
    assert all(line.startswith(f"order {tampered.id}: ") for line in lines), lines
    fields = [line.split(": ")[1] for line in lines]
    assert fields == ["content_hash", "lines[0].quantity", "lines[1].unit_price"], lines
    assert "stored 1, intent says 5" in lines[1]
    assert bad.stderr.strip() == f"verified 3 orders of channel {slug}: 3 differences"

    later = await asyncio.to_thread(
        verify, database_url, "--channel", slug, "--since", "2999-01-01T00:00:00Z"
    )
    assert later.returncode == 0 and "verified 0 orders" in later.stderr
    wrong = await asyncio.to_thread(verify, database_url, "--since", "yesterday")
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and "--since" in wrong.stderr
