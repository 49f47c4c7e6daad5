"""CartService from a client's side: real gRPC server, real PostgreSQL.

Stock is set up through domain.inventory (the InventoryService servicer is
another engineer's work in progress); everything about carts goes through gRPC.
"""

from __future__ import annotations

import asyncio
import os
import zoneinfo
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from google.protobuf import duration_pb2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import domain.cart as carts
import domain.inventory as inventory
from domain.shared.caller import ChannelRef
from domain.shared.errors import FailedPrecondition
from domain.shared.money import Money
from entrepot.cart.v1 import cart_pb2 as pb
from entrepot.order.v1 import order_pb2
from entrepot.platform.v1 import channel_pb2, types_pb2
from entrepot_client import (
    AbortedError,
    AlreadyExistsError,
    Entrepot,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from entrepot_client.cart import shortages
from tests.conftest import unique
from tests.inventory_support import check_invariants

Sessions = async_sessionmaker[AsyncSession]


def eur(amount: int) -> types_pb2.Money:
    return types_pb2.Money(currency_code="EUR", amount_minor=amount)


def line(sku: str, quantity: int, price: int = 1000) -> pb.CartLine:
    return pb.CartLine(sku=sku, quantity=quantity, unit_price=eur(price))


async def stock(sessions: Sessions, sku: str, on_hand: int, **policy: Any) -> None:
    """An item with `on_hand` units in a warehouse of its own."""
    async with sessions() as s, s.begin():
        code = unique("WH")
        await inventory.create_warehouse(s, code=code, name=code, address={}, contact={})
        await inventory.upsert_item(s, sku=sku, **policy)
        if on_hand:
            await inventory.set_stock(s, sku=sku, warehouse_code=code, quantity=on_hand, reason="test")


async def levels(sessions: Sessions, sku: str) -> tuple[int, int]:
    async with sessions() as s, s.begin():
        lv = await inventory.get_stock_level(s, sku)
        return lv.on_hand, lv.reserved


async def scalar(sessions: Sessions, sql: str, **params: Any) -> Any:
    async with sessions() as s, s.begin():
        return (await s.execute(text(sql), params)).scalar_one()


async def new_cart(ep: Entrepot, *lines: pb.CartLine, customer: str = "", approval: bool = False) -> pb.Cart:
    return await ep.cart.create_cart(
        pb.CreateCartRequest(
            cart=pb.Cart(
                customer_ref=customer or unique("cust"), lines=list(lines), approval_required=approval
            )
        )
    )


# ------------------------------------------------------------------ lines, versions, totals


async def test_lines_totals_and_versions(admin: Entrepot) -> None:
    sku_a, sku_b = unique("A"), unique("B")
    cart = await new_cart(admin, line(sku_a, 3, 333))
    assert cart.version == 1 and cart.state == pb.Cart.STATE_ACTIVE
    assert cart.subtotal == eur(999) and cart.item_count == 3
    assert cart.hold.state == pb.StockHold.STATE_NONE

    cart = await admin.cart.add_cart_line(
        pb.AddCartLineRequest(cart_id=cart.id, version=cart.version, line=line(sku_b, 2, 1))
    )
    assert cart.version == 2 and [x.line_id for x in cart.lines] == ["ln-1", "ln-2"]
    assert cart.subtotal == eur(1001)

    cart = await admin.cart.update_cart_line(
        pb.UpdateCartLineRequest(
            cart_id=cart.id,
            version=cart.version,
            line=pb.CartLine(line_id="ln-1", quantity=10),
            update_mask={"paths": ["quantity"]},
        )
    )
    assert cart.lines[0].quantity == 10 and cart.lines[0].unit_price == eur(333)
    assert cart.lines[0].line_total == eur(3330) and cart.subtotal == eur(3332)

    cart = await admin.cart.remove_cart_line(
        pb.RemoveCartLineRequest(cart_id=cart.id, version=cart.version, line_id="ln-2")
    )
    assert cart.version == 4 and [x.sku for x in cart.lines] == [sku_a]
    got = await admin.cart.get_cart(pb.GetCartRequest(cart_id=cart.id))
    assert got == cart

    with pytest.raises(AlreadyExistsError) as dup:
        await admin.cart.add_cart_line(
            pb.AddCartLineRequest(cart_id=cart.id, version=cart.version, line=line(sku_a, 1))
        )
    assert dup.value.reason == "CART_LINE_EXISTS" and dup.value.metadata["line_id"] == "ln-1"


async def test_bad_lines_report_every_field(admin: Entrepot) -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        await admin.cart.create_cart(
            pb.CreateCartRequest(
                cart=pb.Cart(
                    customer_ref="",
                    lines=[
                        pb.CartLine(sku=" x", quantity=0, unit_price=types_pb2.Money(currency_code="USD")),
                        line("SAME", 1),
                        line("SAME", 1),
                    ],
                )
            )
        )
    fields = {v.field for v in exc.value.field_violations}
    assert fields == {
        "cart.customer_ref",
        "cart.lines[0].sku",
        "cart.lines[0].quantity",
        "cart.lines[0].unit_price.currency_code",
        "cart.lines[2].sku",
    }


async def test_two_clients_same_version_one_wins_one_aborted(
    client_factory: Callable[..., Entrepot],
) -> None:
    alice, bob = client_factory(sub="alice"), client_factory(sub="bob")
    cart = await new_cart(alice, line(unique("S"), 1))
    results = await asyncio.gather(
        *(
            c.cart.update_cart_line(
                pb.UpdateCartLineRequest(
                    cart_id=cart.id,
                    version=cart.version,
                    line=pb.CartLine(line_id="ln-1", quantity=q),
                    update_mask={"paths": ["quantity"]},
                )
            )
            for c, q in ((alice, 5), (bob, 7))
        ),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, pb.Cart)]
    lost = [r for r in results if isinstance(r, AbortedError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert lost[0].reason == "CART_VERSION_MISMATCH" and lost[0].metadata["current_version"] == "2"
    final = await alice.cart.get_cart(pb.GetCartRequest(cart_id=cart.id))
    assert final.version == 2 and final.lines[0].quantity == won[0].lines[0].quantity


async def test_cart_of_another_channel_is_not_found(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    slug = unique("ch")
    await admin.channel.create_channel(
        channel_pb2.CreateChannelRequest(channel=channel_pb2.Channel(slug=slug, name=slug, currency="EUR"))
    )
    cart = await new_cart(admin, line(unique("S"), 1))
    other = client_factory(channel=slug)
    with pytest.raises(NotFoundError) as exc:
        await other.cart.get_cart(pb.GetCartRequest(cart_id=cart.id))
    assert exc.value.reason == "CART_NOT_FOUND"


# ------------------------------------------------------------------ holds


async def test_hold_follows_lines_and_expiry_is_reported(admin: Entrepot, sessions: Sessions) -> None:
    sku = unique("H")
    await stock(sessions, sku, 10)
    cart = await new_cart(admin, line(sku, 3))
    cart = await admin.cart.hold_cart_stock(
        pb.HoldCartStockRequest(cart_id=cart.id, version=cart.version, ttl=duration_pb2.Duration(seconds=60))
    )
    assert cart.hold.state == pb.StockHold.STATE_HELD and cart.hold.ttl.seconds == 60
    assert await levels(sessions, sku) == (10, 3)

    cart = await admin.cart.update_cart_line(
        pb.UpdateCartLineRequest(
            cart_id=cart.id,
            version=cart.version,
            line=pb.CartLine(line_id="ln-1", quantity=5),
            update_mask={"paths": ["quantity"]},
        )
    )
    assert cart.hold.state == pb.StockHold.STATE_HELD
    assert await levels(sessions, sku) == (10, 5)

    # Short stock: the edit is refused whole; the hold and the line stay as they were.
    with pytest.raises(FailedPreconditionError) as exc:
        await admin.cart.update_cart_line(
            pb.UpdateCartLineRequest(
                cart_id=cart.id,
                version=cart.version,
                line=pb.CartLine(line_id="ln-1", quantity=11),
                update_mask={"paths": ["quantity"]},
            )
        )
    assert exc.value.reason == "INSUFFICIENT_STOCK"
    assert [v.subject for v in exc.value.precondition_violations] == [sku]
    same = await admin.cart.get_cart(pb.GetCartRequest(cart_id=cart.id))
    assert same == cart and await levels(sessions, sku) == (10, 5)

    # A short hold runs out: the cart says so, and once inventory's sweeper ran, nothing is held.
    cart = await admin.cart.hold_cart_stock(
        pb.HoldCartStockRequest(
            cart_id=cart.id, version=cart.version, ttl=duration_pb2.Duration(nanos=300_000_000)
        )
    )
    await asyncio.sleep(0.6)
    got = await admin.cart.get_cart(pb.GetCartRequest(cart_id=cart.id))
    assert got.hold.state == pb.StockHold.STATE_EXPIRED
    # The server's expiry sweeper (every second) gives the stock back.
    for _ in range(50):
        if await levels(sessions, sku) == (10, 0):
            break
        await asyncio.sleep(0.2)
    assert await levels(sessions, sku) == (10, 0)
    got = await admin.cart.get_cart(pb.GetCartRequest(cart_id=cart.id))
    assert got.hold.state == pb.StockHold.STATE_EXPIRED

    # Editing after expiry does not silently re-reserve; HoldCartStock renews.
    cart = await admin.cart.remove_cart_line(
        pb.RemoveCartLineRequest(cart_id=cart.id, version=got.version, line_id="ln-1")
    )
    assert await levels(sessions, sku) == (10, 0) and cart.hold.state == pb.StockHold.STATE_EXPIRED
    async with sessions() as s, s.begin():
        await check_invariants(s)


async def test_checkout_after_the_hold_expired_reserves_again(admin: Entrepot, sessions: Sessions) -> None:
    sku = unique("EX")
    await stock(sessions, sku, 3)
    cart = await new_cart(admin, line(sku, 3))
    cart = await admin.cart.hold_cart_stock(
        pb.HoldCartStockRequest(
            cart_id=cart.id, version=cart.version, ttl=duration_pb2.Duration(nanos=200_000_000)
        )
    )
    await asyncio.sleep(0.4)
    done = await admin.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=cart.id, version=cart.version))
    assert done.reservation_id != cart.hold.reservation_id
    assert await levels(sessions, sku) == (3, 3)
    async with sessions() as s, s.begin():
        assert (await inventory.get_reservation(s, done.reservation_id)).expires_at is None
        assert (await inventory.get_reservation(s, cart.hold.reservation_id)).state in ("expired", "released")
        await check_invariants(s)


async def test_release_hold(admin: Entrepot, sessions: Sessions) -> None:
    sku = unique("R")
    await stock(sessions, sku, 4)
    cart = await new_cart(admin, line(sku, 4))
    cart = await admin.cart.hold_cart_stock(pb.HoldCartStockRequest(cart_id=cart.id, version=cart.version))
    assert cart.hold.ttl.seconds == 15 * 60 and await levels(sessions, sku) == (4, 4)
    cart = await admin.cart.release_cart_hold(
        pb.ReleaseCartHoldRequest(cart_id=cart.id, version=cart.version)
    )
    assert cart.hold.state == pb.StockHold.STATE_NONE and await levels(sessions, sku) == (4, 0)


# ------------------------------------------------------------------ checkout


async def test_checkout_turns_the_hold_into_the_order_reservation(
    admin: Entrepot, sessions: Sessions
) -> None:
    sku = unique("C")
    await stock(sessions, sku, 5)
    cart = await new_cart(admin, line(sku, 2, 1250), customer="acme")
    cart = await admin.cart.hold_cart_stock(pb.HoldCartStockRequest(cart_id=cart.id, version=cart.version))
    hold_id = cart.hold.reservation_id
    ledger_before = await scalar(sessions, "SELECT count(*) FROM inventory.ledger WHERE sku = :s", s=sku)
    req = pb.CheckoutCartRequest(
        cart_id=cart.id,
        version=cart.version,
        tax=eur(500),
        shipping=eur(100),
        request_id=unique("rid"),
        payments=[pb.CheckoutPayment(tender_id="t1", method="card", captured=eur(3100))],
    )
    first, again = await asyncio.gather(admin.cart.checkout_cart(req), admin.cart.checkout_cart(req))
    assert first == again, "same request_id: the same answer"
    assert first.cart.state == pb.Cart.STATE_CONVERTED and first.cart.order_id == first.order_id
    assert first.reservation_id == hold_id, "the live hold is handed over as it is"
    assert await levels(sessions, sku) == (5, 2)
    assert (
        await scalar(sessions, "SELECT count(*) FROM inventory.ledger WHERE sku = :s", s=sku) == ledger_before
    )
    o = await admin.order.get_order(order_pb2.GetOrderRequest(id=first.order_id))
    assert o.source_system == "cart" and o.intent_id == cart.id and o.customer_ref == "acme"
    assert o.totals.grand_total == eur(3100) and o.reservation_id == first.reservation_id
    assert [(x.line_id, x.sku, x.quantity) for x in o.lines] == [("ln-1", sku, 2)]
    async with sessions() as s, s.begin():
        res = await inventory.get_reservation(s, first.reservation_id)
        assert res.state == "active" and res.expires_at is None, "an order's stock never expires"
        assert [(x.sku, x.open_quantity) for x in res.lines] == [(sku, 2)]
        await check_invariants(s)

    events = await scalar(
        sessions,
        "SELECT count(*) FROM platform.outbox WHERE topic = 'cart.converted' AND aggregate_id = :c "
        "AND payload->>'order_id' = :o",
        c=cart.id,
        o=first.order_id,
    )
    assert events == 1, "one cart.converted event, even with the replayed request"
    with pytest.raises(AbortedError):  # a new request with the old version
        await admin.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=cart.id, version=cart.version))
    with pytest.raises(FailedPreconditionError) as exc:
        await admin.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=cart.id, version=first.cart.version))
    assert exc.value.reason == "CART_CONVERTED"


async def test_fifty_carts_race_for_the_last_ten_units(
    client_factory: Callable[..., Entrepot], sessions: Sessions
) -> None:
    sku, other = unique("LAST"), unique("PLENTY")
    await stock(sessions, sku, 10)
    await stock(sessions, other, 1000)
    clients = [client_factory(sub=f"shopper-{i % 8}") for i in range(8)]
    created = await asyncio.gather(
        *(new_cart(clients[i % 8], line(other, 2), line(sku, 1)) for i in range(50))
    )
    # A few carts hold stock first (holds count as reserved): the race is the same.
    held = []
    for c in created[:5]:
        held.append(
            await clients[0].cart.hold_cart_stock(pb.HoldCartStockRequest(cart_id=c.id, version=c.version))
        )
    carts_now = held + list(created[5:])
    results = await asyncio.gather(
        *(
            clients[i % 8].cart.checkout_cart(
                pb.CheckoutCartRequest(cart_id=c.id, version=c.version, request_id=unique("co"))
            )
            for i, c in enumerate(carts_now)
        ),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, pb.CheckoutCartResponse)]
    short = [r for r in results if isinstance(r, FailedPreconditionError)]
    assert len(ok) == 10 and len(short) == 40, [
        r for r in results if not isinstance(r, pb.CheckoutCartResponse)
    ][:3]
    for err in short:
        assert err.reason == "INSUFFICIENT_STOCK"
        assert [(v.type, v.subject) for v in err.precondition_violations] == [("INSUFFICIENT_STOCK", sku)]
        assert list(shortages(err)) == [sku]
    # The held carts had their units already: all five got through.
    assert {c.id for c in held} <= {r.cart.id for r in ok}

    assert await levels(sessions, sku) == (10, 10)
    assert await levels(sessions, other) == (1000, 20)
    ids = [c.id for c in carts_now]
    assert (
        await scalar(
            sessions,
            "SELECT count(*) FROM orders.orders WHERE source_system = 'cart' AND intent_id = ANY(:ids)",
            ids=ids,
        )
        == 10
    )
    assert (
        await scalar(
            sessions,
            "SELECT count(*) FROM carts.carts WHERE state = 'converted' AND id = ANY(CAST(:ids AS uuid[]))",
            ids=ids,
        )
        == 10
    )
    # No leaked holds: the only open reservations of these carts are the 10 orders'.
    refs = [f"cart:{i}" for i in ids]
    assert (
        await scalar(
            sessions,
            "SELECT count(*) FROM inventory.reservations WHERE state = 'active' AND reference = ANY(:refs)",
            refs=refs,
        )
        == 10
    )
    async with sessions() as s, s.begin():
        await check_invariants(s)
    # Losers are untouched and still at their version.
    loser = next(c for c in carts_now if c.id not in {r.cart.id for r in ok})
    got = await clients[0].cart.get_cart(pb.GetCartRequest(cart_id=loser.id))
    assert got.version == loser.version and got.state == pb.Cart.STATE_ACTIVE


async def test_checkout_failing_after_reserving_leaves_nothing_reserved(
    admin: Entrepot, sessions: Sessions
) -> None:
    """medusa#13625: the order step fails after the stock was reserved; all of it rolls back."""
    sku = unique("RB")
    await stock(sessions, sku, 5)
    taken = unique("EXT")
    first = await new_cart(admin, line(sku, 1))
    await admin.cart.checkout_cart(
        pb.CheckoutCartRequest(cart_id=first.id, version=first.version, external_order_id=taken)
    )
    cart = await new_cart(admin, line(sku, 2))
    cart = await admin.cart.hold_cart_stock(pb.HoldCartStockRequest(cart_id=cart.id, version=cart.version))
    assert await levels(sessions, sku) == (5, 3)
    ledger_before = await scalar(sessions, "SELECT count(*) FROM inventory.ledger WHERE sku = :s", s=sku)

    with pytest.raises(AlreadyExistsError) as exc:  # the order module refuses after the reservation
        await admin.cart.checkout_cart(
            pb.CheckoutCartRequest(cart_id=cart.id, version=cart.version, external_order_id=taken)
        )
    assert exc.value.reason == "EXTERNAL_ORDER_ID_TAKEN"
    assert await levels(sessions, sku) == (5, 3)
    assert (
        await scalar(sessions, "SELECT count(*) FROM inventory.ledger WHERE sku = :s", s=sku) == ledger_before
    )
    assert (
        await scalar(
            sessions,
            "SELECT count(*) FROM inventory.reservations WHERE state = 'active' AND reference = :r",
            r=f"cart:{cart.id}",
        )
        == 1
    )
    same = await admin.cart.get_cart(pb.GetCartRequest(cart_id=cart.id))
    assert same == cart and same.hold.state == pb.StockHold.STATE_HELD
    async with sessions() as s, s.begin():
        await check_invariants(s)

    # Without a hold the checkout reserves first, then the order step refuses: nothing stays reserved.
    bare = await new_cart(admin, line(sku, 2))
    with pytest.raises(AlreadyExistsError):
        await admin.cart.checkout_cart(
            pb.CheckoutCartRequest(cart_id=bare.id, version=bare.version, external_order_id=taken)
        )
    assert await levels(sessions, sku) == (5, 3)
    assert (
        await scalar(sessions, "SELECT count(*) FROM inventory.ledger WHERE sku = :s", s=sku) == ledger_before
    )
    assert (
        await scalar(
            sessions, "SELECT count(*) FROM inventory.reservations WHERE reference = :r", r=f"cart:{bare.id}"
        )
        == 0
    )
    async with sessions() as s, s.begin():
        await check_invariants(s)

    done = await admin.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=cart.id, version=cart.version))
    assert done.cart.state == pb.Cart.STATE_CONVERTED and await levels(sessions, sku) == (5, 3)
    done = await admin.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=bare.id, version=bare.version))
    assert done.cart.state == pb.Cart.STATE_CONVERTED and await levels(sessions, sku) == (5, 5)


# ------------------------------------------------------------------ purchase limits


async def test_limits_checked_when_lines_change(admin: Entrepot) -> None:
    sku = unique("L")
    limit = await admin.cart.set_purchase_limit(
        pb.SetPurchaseLimitRequest(
            limit=pb.PurchaseLimit(sku=sku, min_quantity=2, order_multiple=2, max_per_order=6)
        )
    )
    assert limit.channel == "test" and limit.max_per_order == 6
    assert await admin.cart.get_purchase_limit(pb.GetPurchaseLimitRequest(sku=sku)) == limit
    with pytest.raises(FailedPreconditionError) as exc:
        await new_cart(admin, line(sku, 1))
    assert exc.value.reason == "PURCHASE_LIMIT_EXCEEDED"
    assert {v.type for v in exc.value.precondition_violations} == {"MIN_QUANTITY", "ORDER_MULTIPLE"}
    cart = await new_cart(admin, line(sku, 4))
    with pytest.raises(FailedPreconditionError) as exc:
        await admin.cart.update_cart_line(
            pb.UpdateCartLineRequest(
                cart_id=cart.id,
                version=cart.version,
                line=pb.CartLine(line_id="ln-1", quantity=8),
                update_mask={"paths": ["quantity"]},
            )
        )
    assert [(v.type, v.subject) for v in exc.value.precondition_violations] == [("MAX_PER_ORDER", sku)]


async def test_thirty_day_limit_across_orders_in_the_channel_time_zone(
    admin: Entrepot, client_factory: Callable[..., Entrepot], sessions: Sessions
) -> None:
    slug, tz = unique("kiri"), "Pacific/Kiritimati"  # UTC+14: local days differ from UTC days
    await admin.channel.create_channel(
        channel_pb2.CreateChannelRequest(
            channel=channel_pb2.Channel(slug=slug, name=slug, currency="EUR", timezone=tz)
        )
    )
    ep = client_factory(channel=slug)
    sku = unique("LIM")
    await stock(sessions, sku, 100)
    await ep.cart.set_purchase_limit(
        pb.SetPurchaseLimitRequest(limit=pb.PurchaseLimit(sku=sku, max_per_customer=5))
    )

    async def buy(q: int) -> pb.CheckoutCartResponse:
        cart = await new_cart(ep, line(sku, q), customer="cust-1")
        return await ep.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=cart.id, version=cart.version))

    first = await buy(3)
    with pytest.raises(FailedPreconditionError) as exc:  # refused as soon as the line is there
        await new_cart(ep, line(sku, 3), customer="cust-1")
    assert [v.type for v in exc.value.precondition_violations] == ["MAX_PER_CUSTOMER"]
    await new_cart(ep, line(sku, 3), customer="cust-2")  # another customer has their own allowance
    await buy(2)
    with pytest.raises(FailedPreconditionError):
        await buy(1)

    # Move the first order (3 units) to just before / just after the window's
    # start: local midnight in Kiritimati 29 days before today.
    now = await scalar(sessions, "SELECT now()")
    start = carts.window_start(now, tz)
    assert start.astimezone(zoneinfo.ZoneInfo(tz)).hour == 0

    async def move_first_to(when: Any) -> None:
        async with sessions() as s, s.begin():
            await s.execute(
                text("UPDATE carts.purchases SET purchased_at = :t WHERE order_id = :o"),
                {"t": when, "o": first.order_id},
            )

    await move_first_to(start + timedelta(minutes=1))
    with pytest.raises(FailedPreconditionError):  # still inside: 3 + 2 bought
        await buy(1)
    await move_first_to(start - timedelta(minutes=1))
    done = await buy(3)  # outside: only the 2 count now
    assert done.cart.state == pb.Cart.STATE_CONVERTED


async def test_limit_checkout_is_safe_under_concurrency(
    client_factory: Callable[..., Entrepot], sessions: Sessions
) -> None:
    sku = unique("CC")
    await stock(sessions, sku, 100)
    ep = client_factory()
    await ep.cart.set_purchase_limit(
        pb.SetPurchaseLimitRequest(limit=pb.PurchaseLimit(sku=sku, max_per_customer=3))
    )
    made = [await new_cart(ep, line(sku, 1), customer="greedy") for _ in range(10)]
    results = await asyncio.gather(
        *(ep.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=c.id, version=c.version)) for c in made),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, pb.CheckoutCartResponse)]
    refused = [r for r in results if isinstance(r, FailedPreconditionError)]
    assert len(ok) == 3 and len(refused) == 7
    assert all(r.reason == "PURCHASE_LIMIT_EXCEEDED" for r in refused)
    assert await levels(sessions, sku) == (100, 3)


async def test_refunded_quantities_are_credited_back(app: Any, sessions: Sessions) -> None:
    """Through the port the refund module will implement (domain level)."""
    sku = unique("RF")
    channel = ChannelRef("test", "EUR", "Europe/Paris")

    class Refunded:
        async def refunded_quantities(
            self, session: Any, *, channel: str, customer_ref: str, skus: Any, since: Any
        ) -> dict[str, int]:
            return {sku: 2} if customer_ref == "refunded" else {}

    async with sessions() as s, s.begin():
        await carts.set_purchase_limit(
            s, channel=channel, limit=carts.Limit(sku, max_per_customer=3), actor="t"
        )
    for cust in ("refunded", "plain"):
        async with sessions() as s, s.begin():
            await s.execute(
                text(
                    "INSERT INTO carts.carts (id, channel, customer_ref, currency, created_by) "
                    "VALUES (gen_random_uuid(), 'test', :c, 'EUR', 't')"
                ),
                {"c": cust},
            )
            cid = (
                await s.execute(
                    text("SELECT id FROM carts.carts WHERE customer_ref = :c LIMIT 1"), {"c": cust}
                )
            ).scalar_one()
            await s.execute(
                text(
                    "INSERT INTO carts.purchases (channel, customer_ref, sku, quantity, cart_id, order_id) "
                    "VALUES ('test', :c, :s, 3, :cid, 'o')"
                ),
                {"c": cust, "s": sku, "cid": cid},
            )
    async with sessions() as s, s.begin():
        cart = await carts.create_cart(
            s,
            channel=channel,
            customer_ref="refunded",
            approval_required=False,
            lines=[carts.LineDraft(sku, 2, Money("EUR", 1))],
            actor="t",
            refunds=Refunded(),
        )
        assert cart.item_count == 2
    async with sessions() as s, s.begin():
        with pytest.raises(FailedPrecondition):
            await carts.create_cart(
                s,
                channel=channel,
                customer_ref="plain",
                approval_required=False,
                lines=[carts.LineDraft(sku, 1, Money("EUR", 1))],
                actor="t",
                refunds=Refunded(),
            )


# ------------------------------------------------------------------ B2B approval


async def test_approval_four_eyes_and_lock(
    client_factory: Callable[..., Entrepot], sessions: Sessions
) -> None:
    sku = unique("AP")
    await stock(sessions, sku, 10)
    buyer = client_factory(
        sub="buyer", permissions=["cart.write", "cart.read", "cart.approve", "cart.checkout"]
    )
    manager = client_factory(sub="manager", permissions=["cart.approve", "cart.read"])
    clerk = client_factory(sub="clerk", permissions=["cart.write", "cart.read"])
    cart = await new_cart(buyer, line(sku, 3), approval=True)
    with pytest.raises(FailedPreconditionError) as exc:
        await buyer.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=cart.id, version=cart.version))
    assert exc.value.reason == "APPROVAL_REQUIRED"

    cart = await buyer.cart.submit_cart_for_approval(
        pb.SubmitCartForApprovalRequest(cart_id=cart.id, version=cart.version, note="for Q4")
    )
    assert cart.state == pb.Cart.STATE_PENDING_APPROVAL and cart.approval.submitted_by == "buyer"
    with pytest.raises(FailedPreconditionError) as exc:
        await buyer.cart.add_cart_line(
            pb.AddCartLineRequest(cart_id=cart.id, version=cart.version, line=line(unique("X"), 1))
        )
    assert exc.value.reason == "CART_LOCKED"

    with pytest.raises(PermissionDeniedError) as denied:
        await buyer.cart.decide_cart_approval(
            pb.DecideCartApprovalRequest(
                cart_id=cart.id, version=cart.version, decision=pb.Approval.DECISION_APPROVE
            )
        )
    assert denied.value.reason == "SELF_APPROVAL_FORBIDDEN"
    with pytest.raises(PermissionDeniedError):  # no cart.approve permission
        await clerk.cart.decide_cart_approval(
            pb.DecideCartApprovalRequest(
                cart_id=cart.id, version=cart.version, decision=pb.Approval.DECISION_APPROVE
            )
        )
    with pytest.raises(InvalidArgumentError):  # a rejection needs a reason
        await manager.cart.decide_cart_approval(
            pb.DecideCartApprovalRequest(
                cart_id=cart.id, version=cart.version, decision=pb.Approval.DECISION_REJECT
            )
        )
    rejected = await manager.cart.decide_cart_approval(
        pb.DecideCartApprovalRequest(
            cart_id=cart.id, version=cart.version, decision=pb.Approval.DECISION_REJECT, reason="too many"
        )
    )
    assert rejected.state == pb.Cart.STATE_REJECTED and rejected.approval.reason == "too many"
    # A rejected cart is editable again, and goes back to ACTIVE.
    cart = await buyer.cart.update_cart_line(
        pb.UpdateCartLineRequest(
            cart_id=cart.id,
            version=rejected.version,
            line=pb.CartLine(line_id="ln-1", quantity=2),
            update_mask={"paths": ["quantity"]},
        )
    )
    assert cart.state == pb.Cart.STATE_ACTIVE
    cart = await buyer.cart.submit_cart_for_approval(
        pb.SubmitCartForApprovalRequest(cart_id=cart.id, version=cart.version)
    )
    cart = await manager.cart.decide_cart_approval(
        pb.DecideCartApprovalRequest(
            cart_id=cart.id, version=cart.version, decision=pb.Approval.DECISION_APPROVE
        )
    )
    assert cart.state == pb.Cart.STATE_APPROVED and cart.approval.decided_by == "manager"
    done = await buyer.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=cart.id, version=cart.version))
    assert done.cart.state == pb.Cart.STATE_CONVERTED


async def test_approval_with_short_stock_blocks(
    client_factory: Callable[..., Entrepot], sessions: Sessions
) -> None:
    sku, ok_sku = unique("SH"), unique("OK")
    await stock(sessions, sku, 1)
    await stock(sessions, ok_sku, 10)
    buyer, manager = client_factory(sub="buyer2"), client_factory(sub="manager2")
    cart = await new_cart(buyer, line(sku, 3), line(ok_sku, 1), approval=True)
    cart = await buyer.cart.submit_cart_for_approval(
        pb.SubmitCartForApprovalRequest(cart_id=cart.id, version=cart.version)
    )
    cart = await manager.cart.decide_cart_approval(
        pb.DecideCartApprovalRequest(
            cart_id=cart.id, version=cart.version, decision=pb.Approval.DECISION_APPROVE
        )
    )
    assert cart.state == pb.Cart.STATE_APPROVED_BLOCKED_INVENTORY
    assert [s.sku for s in cart.approval.shortages] == [sku]
    assert await levels(sessions, sku) == (1, 0), "the stock check reserves nothing"
    with pytest.raises(FailedPreconditionError) as exc:
        await buyer.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=cart.id, version=cart.version))
    assert exc.value.reason == "INSUFFICIENT_STOCK"
    async with sessions() as s, s.begin():
        lv = await inventory.get_stock_level(s, sku)
        await inventory.adjust_stock(
            s, sku=sku, warehouse_code=lv.levels[0].warehouse_code, delta=5, reason="receipt"
        )
    done = await buyer.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=cart.id, version=cart.version))
    assert done.cart.state == pb.Cart.STATE_CONVERTED and await levels(sessions, sku) == (6, 3)


async def test_list_carts_pages_by_customer(admin: Entrepot) -> None:
    cust = unique("lc")
    made = {(await new_cart(admin, line(unique("S"), 1), customer=cust)).id for _ in range(5)}
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.cart.list_carts(
            pb.ListCartsRequest(customer_ref=cust, page_size=2, page_token=token)
        )
        seen += [c.id for c in page.carts]
        token = page.next_page_token
        if not token:
            break
    assert set(seen) == made and len(seen) == 5
    pending = await admin.cart.list_carts(
        pb.ListCartsRequest(customer_ref=cust, state=pb.Cart.STATE_PENDING_APPROVAL)
    )
    assert list(pending.carts) == []
    with pytest.raises(InvalidArgumentError):
        await admin.cart.list_carts(pb.ListCartsRequest(state=42))  # type: ignore[arg-type]


# ------------------------------------------------------------------ bad input (R8, for this service)

_NASTY_STR = [
    "",
    " ",
    "\x00",
    "ln-1",
    "x" * 300,
    "ÿ\u0301",
    "00000000-0000-0000-0000-000000000000",
    "EUR",
    "USD",
]
_NASTY_INT = [0, 1, -1, 2**31 - 1, -(2**31), 2**62, -(2**62), 10**6 + 1]


def _fill(msg: Any, rng: Any, depth: int = 0) -> None:
    from google.protobuf.descriptor import FieldDescriptor as F

    for f in msg.DESCRIPTOR.fields:
        if rng.random() < 0.3:
            continue
        if f.type == F.TYPE_MESSAGE:
            if depth > 3 or f.message_type.full_name in ("google.protobuf.Timestamp",):
                continue
            if f.message_type.full_name == "google.protobuf.Duration":
                getattr(msg, f.name).seconds = rng.choice([-5, 0, 1, 10**6, 315_576_000_000])
                continue
            if f.message_type.full_name == "google.protobuf.FieldMask":
                getattr(msg, f.name).paths.extend(
                    rng.sample(["quantity", "unit_price", "sku", "line.quantity"], 2)
                )
                continue
            if f.is_repeated:
                for _ in range(rng.randint(0, 3)):
                    _fill(getattr(msg, f.name).add(), rng, depth + 1)
            else:
                _fill(getattr(msg, f.name), rng, depth + 1)
        elif f.type == F.TYPE_STRING:
            values = [rng.choice(_NASTY_STR) for _ in range(2 if f.is_repeated else 1)]
            if f.is_repeated:
                getattr(msg, f.name).extend(values)
            else:
                setattr(msg, f.name, values[0])
        elif f.type == F.TYPE_BOOL:
            setattr(msg, f.name, rng.random() < 0.5)
        elif f.type == F.TYPE_ENUM:
            setattr(msg, f.name, rng.choice([v.number for v in f.enum_type.values] + [99]))
        elif not f.is_repeated:
            value = rng.choice(_NASTY_INT)
            if f.type in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
                value = max(min(value, 2**31 - 1), -(2**31))
            setattr(msg, f.name, value)


async def test_bad_input_never_internal(admin: Entrepot, sessions: Sessions) -> None:
    import random

    import grpc

    from entrepot_client import EntrepotError

    rng = random.Random(int(os.environ.get("CART_FUZZ_SEED", "1234")))
    real = await new_cart(admin, line(unique("F"), 1))
    service = pb.DESCRIPTOR.services_by_name["CartService"]
    seen: dict[str, int] = {}
    for method in service.methods:
        call = getattr(
            admin.cart, "".join("_" + c.lower() if c.isupper() else c for c in method.name).lstrip("_")
        )
        for i in range(25):
            request = getattr(pb, method.input_type.name)()
            _fill(request, rng)
            if hasattr(request, "request_id"):
                # A NUL in request_id is the framework's (idempotency store) to refuse; reported.
                request.request_id = request.request_id.replace("\x00", "")
            if i % 2 and hasattr(request, "cart_id"):
                request.cart_id = real.id  # reach past the lookup into the real checks
            try:
                await call(request)
            except EntrepotError as err:
                assert err.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                    method.name,
                    request,
                    err,
                )
                seen[err.code.name] = seen.get(err.code.name, 0) + 1
    assert {"INVALID_ARGUMENT", "NOT_FOUND"} <= set(seen)
    async with sessions() as s, s.begin():
        await check_invariants(s)


async def test_client_helper_retries_on_a_newer_version(client_factory: Callable[..., Entrepot]) -> None:
    from entrepot_client.cart import line as cart_line
    from entrepot_client.cart import with_latest_version

    a, b = client_factory(sub="ha"), client_factory(sub="hb")
    cart = await new_cart(a, cart_line(unique("H"), 1, 100, "EUR"))
    calls = 0

    async def bump(c: pb.Cart) -> pb.Cart:
        nonlocal calls
        calls += 1
        if calls == 1:  # someone else changes the cart between our read and our write
            await b.cart.update_cart_line(
                pb.UpdateCartLineRequest(
                    cart_id=c.id,
                    version=c.version,
                    line=pb.CartLine(line_id="ln-1", quantity=5),
                    update_mask={"paths": ["quantity"]},
                )
            )
        current = c.lines[0].quantity
        return await a.cart.update_cart_line(
            pb.UpdateCartLineRequest(
                cart_id=c.id,
                version=c.version,
                line=pb.CartLine(line_id="ln-1", quantity=current + 1),
                update_mask={"paths": ["quantity"]},
            )
        )

    final = await with_latest_version(a.cart, cart.id, bump)
    assert calls == 2 and final.lines[0].quantity == 6 and final.version == 3


async def test_approval_counts_the_carts_own_hold(
    client_factory: Callable[..., Entrepot], sessions: Sessions
) -> None:
    sku = unique("OWN")
    await stock(sessions, sku, 3)
    buyer, manager = client_factory(sub="buyer3"), client_factory(sub="manager3")
    cart = await new_cart(buyer, line(sku, 3), approval=True)
    cart = await buyer.cart.hold_cart_stock(pb.HoldCartStockRequest(cart_id=cart.id, version=cart.version))
    cart = await buyer.cart.submit_cart_for_approval(
        pb.SubmitCartForApprovalRequest(cart_id=cart.id, version=cart.version)
    )
    cart = await manager.cart.decide_cart_approval(
        pb.DecideCartApprovalRequest(
            cart_id=cart.id, version=cart.version, decision=pb.Approval.DECISION_APPROVE
        )
    )
    assert cart.state == pb.Cart.STATE_APPROVED and list(cart.approval.shortages) == []
    assert await levels(sessions, sku) == (3, 3) and cart.hold.state == pb.StockHold.STATE_HELD
    done = await buyer.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=cart.id, version=cart.version))
    assert done.reservation_id == cart.hold.reservation_id and await levels(sessions, sku) == (3, 3)


async def test_refunded_units_are_credited_back_end_to_end(
    client_factory: Callable[..., Entrepot], sessions: Sessions
) -> None:
    """Limit 3 per customer; buy 3, refund 2 through RefundService: 2 more can be bought."""
    from entrepot.refund.v1 import refund_pb2
    from tests.refund_support import R, wait_state

    sku, customer = unique("RFE"), unique("cust")
    await stock(sessions, sku, 50)
    shop = client_factory(sub="shop")
    clerk = client_factory(sub="clerk-r", permissions=["refund.request", "refund.read"])
    boss = client_factory(sub="boss-r", permissions=["refund.approve", "refund.read"])
    await shop.cart.set_purchase_limit(
        pb.SetPurchaseLimitRequest(limit=pb.PurchaseLimit(sku=sku, max_per_customer=3))
    )
    cart = await new_cart(shop, line(sku, 3, 1000), customer=customer)
    bought = await shop.cart.checkout_cart(
        pb.CheckoutCartRequest(
            cart_id=cart.id,
            version=cart.version,
            payments=[
                pb.CheckoutPayment(
                    tender_id="t1", method="card", captured=eur(3000), gateway_reference=unique("psp")
                )
            ],
        )
    )
    with pytest.raises(FailedPreconditionError):
        await new_cart(shop, line(sku, 2), customer=customer)

    r = await clerk.refund.submit_refund_for_approval(
        refund_pb2.SubmitRefundForApprovalRequest(
            order_id=bought.order_id,
            lines=[refund_pb2.RefundLineInput(line_id="ln-1", quantity=2)],
            reason="damaged",
            request_id=unique("rf"),
        )
    )
    await boss.refund.decide_refund_approval(
        refund_pb2.DecideRefundApprovalRequest(
            refund_id=r.refund_id, decision=refund_pb2.DecideRefundApprovalRequest.DECISION_APPROVE, note="ok"
        )
    )
    done = await wait_state(boss, r.refund_id)
    assert done.state == R.STATE_COMPLETED, done.fault_message

    again = await new_cart(shop, line(sku, 2), customer=customer)
    await shop.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=again.id, version=again.version))
    with pytest.raises(FailedPreconditionError) as exc:
        await new_cart(shop, line(sku, 1), customer=customer)
    assert [v.type for v in exc.value.precondition_violations] == ["MAX_PER_CUSTOMER"]


async def test_checkout_claims_its_request_id_in_its_first_statement(
    admin: Entrepot, sessions: Sessions
) -> None:
    # CheckoutCart makes the idempotency claim inside the cart's bump: the
    # answers are those of a separate claim.
    sku = unique("IDEM")
    await stock(sessions, sku, 100)
    carts_ = [await new_cart(admin, line(sku, 1)) for _ in range(3)]
    a, b, c = carts_
    rid = unique("co-idem")
    req = pb.CheckoutCartRequest(cart_id=a.id, version=a.version, request_id=rid)
    answers = await asyncio.gather(*(admin.cart.checkout_cart(req) for _ in range(8)))
    assert all(x == answers[0] for x in answers) and answers[0].cart.state == pb.Cart.STATE_CONVERTED
    orders = await scalar(sessions, "SELECT count(*) FROM orders.orders WHERE intent_id = :c", c=a.id)
    assert orders == 1 and await levels(sessions, sku) == (100, 1)
    # The same request_id for another cart: refused, and that cart is left alone.
    with pytest.raises(AlreadyExistsError) as reused:
        await admin.cart.checkout_cart(
            pb.CheckoutCartRequest(cart_id=b.id, version=b.version, request_id=rid)
        )
    assert reused.value.reason == "REQUEST_ID_REUSED"
    got = await admin.cart.get_cart(pb.GetCartRequest(cart_id=b.id))
    assert got.version == b.version and got.state == pb.Cart.STATE_ACTIVE
    # A refusal is the answer for its request_id too, even once the cause is gone.
    rid2 = unique("co-stale")
    stale = pb.CheckoutCartRequest(cart_id=c.id, version=c.version + 1, request_id=rid2)
    with pytest.raises(AbortedError):
        await admin.cart.checkout_cart(stale)
    c = await admin.cart.update_cart_line(
        pb.UpdateCartLineRequest(
            cart_id=c.id,
            version=c.version,
            line=pb.CartLine(line_id=c.lines[0].line_id, quantity=2),
            update_mask={"paths": ["quantity"]},
        )
    )
    assert c.version == stale.version
    with pytest.raises(AbortedError):
        await admin.cart.checkout_cart(stale)
    assert (await admin.cart.get_cart(pb.GetCartRequest(cart_id=c.id))).state == pb.Cart.STATE_ACTIVE
    # Without a request_id there is nothing to claim.
    done = await admin.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=c.id, version=c.version))
    assert done.cart.state == pb.Cart.STATE_CONVERTED and await levels(sessions, sku) == (100, 3)


async def test_approval_covers_exactly_what_was_approved(
    client_factory: Callable[..., Entrepot], sessions: Sessions
) -> None:
    sku, extra = unique("AT"), unique("AX")
    await stock(sessions, sku, 10)
    await stock(sessions, extra, 10)
    buyer = client_factory(
        sub="buyer-at", permissions=["cart.write", "cart.read", "cart.checkout", "order.read"]
    )
    manager = client_factory(sub="manager-at", permissions=["cart.approve", "cart.read"])

    async def approve(cart: pb.Cart) -> pb.Cart:
        cart = await buyer.cart.submit_cart_for_approval(
            pb.SubmitCartForApprovalRequest(cart_id=cart.id, version=cart.version)
        )
        return await manager.cart.decide_cart_approval(
            pb.DecideCartApprovalRequest(
                cart_id=cart.id, version=cart.version, decision=pb.Approval.DECISION_APPROVE
            )
        )

    cart = await approve(await new_cart(buyer, line(sku, 3, 1250), approval=True))
    a = cart.approval
    assert cart.state == pb.Cart.STATE_APPROVED and not a.stale
    assert a.approved_grand_total == eur(3750)
    assert [(x.sku, x.quantity, x.unit_price.amount_minor) for x in a.approved_lines] == [(sku, 3, 1250)]

    # A change after the approval sends the cart back: active again, its approval stale.
    cart = await buyer.cart.update_cart_line(
        pb.UpdateCartLineRequest(
            cart_id=cart.id,
            version=cart.version,
            line=pb.CartLine(line_id=a.approved_lines[0].line_id, unit_price=eur(999)),
            update_mask={"paths": ["unit_price"]},
        )
    )
    assert cart.state == pb.Cart.STATE_ACTIVE and cart.approval.stale
    assert cart.approval.approved_grand_total == eur(3750) and cart.subtotal == eur(2997)
    with pytest.raises(FailedPreconditionError) as stale:
        await buyer.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=cart.id, version=cart.version))
    assert stale.value.reason == "APPROVAL_STALE"
    assert stale.value.metadata["approved_grand_total_minor"] == "3750"
    assert stale.value.metadata["grand_total_minor"] == "2997"

    # Approved again (with one more line), the cart converts exactly the approved total.
    cart = await buyer.cart.add_cart_line(
        pb.AddCartLineRequest(cart_id=cart.id, version=cart.version, line=line(extra, 1, 3))
    )
    cart = await approve(cart)
    assert cart.approval.approved_grand_total == eur(3000) and not cart.approval.stale
    done = await buyer.cart.checkout_cart(pb.CheckoutCartRequest(cart_id=cart.id, version=cart.version))
    order = await buyer.order.get_order(order_pb2.GetOrderRequest(id=done.order_id))
    assert order.totals.grand_total == eur(3000)
    assert done.cart.approval.approved_grand_total == eur(3000) and not done.cart.approval.stale
