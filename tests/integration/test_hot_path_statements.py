"""The statements CheckoutCart and SubmitOrderIntent send (TARGETS.md P5/P5o):
counted per call on the server's own connections by asyncpg's query logger,
each statement attributed to the RPC it ran for (server.context.current_method).
A statement more on these paths is a round trip more while stock or the cart is locked."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from asyncpg.connection import LoggedQuery
from sqlalchemy import event

from entrepot.cart.v1 import cart_pb2
from entrepot.inventory.v1 import inventory_pb2 as inv
from entrepot.order.v1 import order_pb2
from entrepot.platform.v1 import types_pb2
from entrepot_client import Entrepot
from entrepot_client.order import build_intent
from server.app import App
from server.context import current_method
from tests.conftest import unique

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHECKOUT = "/entrepot.cart.v1.CartService/CheckoutCart"
SUBMIT = "/entrepot.order.v1.OrderService/SubmitOrderIntent"
# BEGIN, the statements, COMMIT (or ROLLBACK for a replay).
MOST = {
    # the bump (claim, lines, limits), the hold's retarget, the order, the conversion (answer)
    CHECKOUT: 6,
    # the reservation's plan (claim, levels), the order, the reservation's write (answer)
    SUBMIT: 5,
}
REPLAY_MOST = 4
CHANNEL = "test"  # the admin client's  # BEGIN, the claim finding the key taken, the stored answer, ROLLBACK


def _asyncpg_introspection(query: str) -> bool:
    """asyncpg's type introspection, once per connection and type: not the RPC's work."""
    return "pg_catalog.pg_type" in query or "set_config('jit'" in query


class StatementCounter:
    """Every statement the server's connections send during an RPC, in order per connection."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str, str]] = []  # (connection, RPC method, statement)
        self.loggers: dict[Any, Callable[[LoggedQuery], None]] = {}

    def attach(self, driver: Any) -> None:
        if driver in self.loggers:
            return

        def log(record: LoggedQuery) -> None:
            # Called soon after the query, in a copy of the calling task's context.
            self.record(driver, record.query)

        self.loggers[driver] = log
        driver.add_query_logger(log)

    def record(self, driver: Any, statement: str) -> None:
        method = current_method()
        if method and not _asyncpg_introspection(statement):
            self.sent.append((id(driver), method, statement))

    def detach(self) -> None:
        for driver, log in self.loggers.items():
            driver.remove_query_logger(log)

    def clear(self) -> None:
        self.sent.clear()

    def of(self, method: str) -> int:
        """The statements (BEGIN and COMMIT or ROLLBACK included) of `method`'s
        transactions that touched its idempotency key: not the channel lookup a
        call makes when the channel cache expired, a transaction of its own."""
        open_: dict[int, list[str]] = {}
        ended: list[list[str]] = []
        for connection, m, query in self.sent:
            if m != method:
                continue
            if query == "BEGIN":
                open_[connection] = []
            open_.setdefault(connection, []).append(query)
            if query in ("COMMIT", "ROLLBACK"):
                ended.append(open_.pop(connection))
        return sum(len(t) for t in ended if any("platform.idempotency_keys" in q for q in t))


@pytest.fixture
async def counter(app: App) -> AsyncIterator[StatementCounter]:
    counting = StatementCounter()

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        counting.attach(dbapi_connection.driver_connection)

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # Statements run through SQLAlchemy reach asyncpg as prepared statements,
        # which its query logger does not see. Recorded like the logger records
        # (call_soon), so the order per connection stays the order sent.
        driver = conn.connection.driver_connection
        asyncio.get_running_loop().call_soon(counting.record, driver, statement)

    pool, engine = app.rt.engine.sync_engine.pool, app.rt.engine.sync_engine
    event.listen(pool, "checkout", on_checkout)
    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        yield counting
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(pool, "checkout", on_checkout)
        counting.detach()


async def _stocked_skus(ep: Entrepot, n: int) -> list[str]:
    wh = unique("WH")
    await ep.inventory.create_warehouse(
        inv.CreateWarehouseRequest(warehouse=inv.Warehouse(code=wh, name=wh), request_id=uuid.uuid4().hex)
    )
    skus = [unique("HOT") for _ in range(n)]
    for sku in skus:
        await ep.inventory.upsert_inventory_item(
            inv.UpsertInventoryItemRequest(item=inv.InventoryItem(sku=sku, track_inventory=True))
        )
        await ep.inventory.set_stock(
            inv.SetStockRequest(sku=sku, warehouse_code=wh, quantity=100, reason="t")
        )
    return skus


async def _settle() -> None:
    await asyncio.sleep(0.05)  # the logger's callbacks are scheduled with call_soon


async def test_checkout_of_a_held_cart_sends_at_most_six_statements(
    app: App, admin: Entrepot, counter: StatementCounter
) -> None:
    skus = await _stocked_skus(admin, 5)
    eur = types_pb2.Money(currency_code="EUR", amount_minor=1299)
    for attempt in range(3):
        cart = await admin.cart.create_cart(
            cart_pb2.CreateCartRequest(
                cart=cart_pb2.Cart(
                    customer_ref=unique("cust"),
                    lines=[cart_pb2.CartLine(sku=s, quantity=1, unit_price=eur) for s in skus],
                )
            )
        )
        cart = await admin.cart.hold_cart_stock(
            cart_pb2.HoldCartStockRequest(cart_id=cart.id, version=cart.version)
        )
        request = cart_pb2.CheckoutCartRequest(cart_id=cart.id, version=cart.version, request_id=unique("co"))
        await _settle()
        counter.clear()
        app.rt.channel_changed(CHANNEL)  # the call looks its channel up again: not counted
        done = await admin.cart.checkout_cart(request)
        await _settle()
        assert counter.of(CHECKOUT) <= MOST[CHECKOUT], f"call {attempt}: {counter.sent}"
        assert (
            done.cart.state == cart_pb2.Cart.STATE_CONVERTED
            and done.reservation_id == cart.hold.reservation_id
        )

        counter.clear()
        again = await admin.cart.checkout_cart(request)
        await _settle()
        assert again == done, "the answer the conversion stored is the one returned"
        assert counter.of(CHECKOUT) <= REPLAY_MOST, f"replay {attempt}: {counter.sent}"


async def test_submit_order_intent_with_reserve_sends_at_most_five_statements(
    app: App, admin: Entrepot, counter: StatementCounter
) -> None:
    skus = await _stocked_skus(admin, 5)
    for attempt in range(3):
        lines = [(f"l{n}", sku, 1 + n % 3, 1000) for n, sku in enumerate(skus)]
        intent = build_intent(unique("intent"), "webshop", "EUR", lines=lines)
        request = order_pb2.SubmitOrderIntentRequest(
            intent=intent, reserve_inventory=True, request_id=uuid.uuid4().hex
        )
        await _settle()
        counter.clear()
        app.rt.channel_changed(CHANNEL)  # the call looks its channel up again: not counted
        done = await admin.order.submit_order_intent(request)
        await _settle()
        assert counter.of(SUBMIT) <= MOST[SUBMIT], f"call {attempt}: {counter.sent}"
        assert done.created and done.order.reservation_id

        counter.clear()
        again = await admin.order.submit_order_intent(request)
        await _settle()
        assert again == done, "the answer the reservation's write stored is the one returned"
        assert counter.of(SUBMIT) <= REPLAY_MOST, f"replay {attempt}: {counter.sent}"
