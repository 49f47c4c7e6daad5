"""Order domain against real PostgreSQL (no server): intents, lifecycle, history, refunds.

Inventory is a recording stand-in here; tests/integration/test_order_api.py
runs the same flows against real inventory through the gRPC server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import domain.order as orders
from domain.order import Intent, LineIn, PaymentIn, Severity, State, StatusIn, StockLine, TotalsIn
from domain.platform.idempotency import Answers, Claim
from domain.shared.caller import Caller, ChannelRef
from domain.shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from domain.shared.money import Money
from tests.integration.order_db import order_db_url, order_sessions  # noqa: F401

pytestmark = pytest.mark.asyncio(loop_scope="session")

CH = ChannelRef(slug="test", currency="EUR", timezone="UTC")
OTHER = ChannelRef(slug="other", currency="EUR", timezone="UTC")


class RecordingInventory:
    def __init__(self, backorder: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.written: list[str] = []  # reservations whose pending write ran
        self.backorder = backorder or {}

    async def reserve(
        self,
        session: AsyncSession,
        lines: Sequence[StockLine],
        *,
        reference: str,
        actor: str,
        channel: str = "",
    ) -> orders.Reserved:
        rid = f"res-{uuid.uuid4().hex[:8]}"
        self.calls.append(("reserve", (rid, list(lines), reference)))
        return orders.Reserved(rid, dict(self.backorder))

    async def reserve_pending(
        self,
        session: AsyncSession,
        lines: Sequence[StockLine],
        *,
        reference: str,
        actor: str,
        channel: str = "",
        claim: Claim | None = None,
    ) -> orders.PendingReservation:
        reserved = await self.reserve(session, lines, reference=reference, actor=actor, channel=channel)

        async def write(answers: Answers) -> None:
            self.written.append(reserved.reservation_id)

        return orders.PendingReservation(reserved, None, write)

    async def fulfil(
        self,
        session: AsyncSession,
        reservation_id: str,
        lines: Sequence[StockLine],
        *,
        reference: str,
        actor: str,
    ) -> None:
        self.calls.append(("fulfil", (reservation_id, list(lines))))

    async def release(self, session: AsyncSession, reservation_id: str, *, reason: str, actor: str) -> None:
        self.calls.append(("release", reservation_id))


def eur(n: int) -> Money:
    return Money("EUR", n)


def make_intent(intent_id: str | None = None, **kw: Any) -> Intent:
    return Intent(
        intent_id=intent_id or uuid.uuid4().hex,
        source_system=kw.pop("source_system", "web"),
        lines=kw.pop("lines", (LineIn("l1", "SKU-A", 3, eur(1000)), LineIn("l2", "SKU-B", 2, eur(250)))),
        totals=kw.pop("totals", TotalsIn(eur(3500), eur(700), eur(500), eur(0), eur(4700))),
        payments=kw.pop("payments", (PaymentIn("t1", "card", eur(4000)), PaymentIn("t2", "gift", eur(700)))),
        **kw,
    )


@pytest.fixture(scope="module")
async def sessions(order_sessions: async_sessionmaker[AsyncSession]) -> async_sessionmaker[AsyncSession]:  # noqa: F811
    async with order_sessions() as s, s.begin():
        for c in (CH, OTHER):
            await s.execute(
                text(
                    "INSERT INTO platform.channels (slug, name, currency, timezone) VALUES (:s, :s, 'EUR', 'UTC')"
                ),
                {"s": c.slug},
            )
    return order_sessions


async def submit(sessions: async_sessionmaker[AsyncSession], i: Intent, **kw: Any) -> orders.SubmitResult:
    async with sessions() as s, s.begin():
        return await orders.submit_intent(s, i, channel=kw.pop("channel", CH), actor="tester", **kw)


async def test_fifty_concurrent_duplicates_make_one_order(sessions: async_sessionmaker[AsyncSession]) -> None:
    i = make_intent()
    results = await asyncio.gather(*(submit(sessions, i) for _ in range(50)))
    assert len({r.order.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    async with sessions() as s:
        n = (
            await s.execute(
                text("SELECT count(*) FROM orders.orders WHERE intent_id = :i"), {"i": i.intent_id}
            )
        ).scalar()
        entries = (
            await s.execute(
                text(
                    "SELECT count(*) FROM orders.status_entries WHERE order_id = :o AND code = 'order:submitted'"
                ),
                {"o": uuid.UUID(results[0].order.id)},
            )
        ).scalar()
    assert n == 1 and entries == 1


async def test_conflicting_content_says_what_differs(sessions: async_sessionmaker[AsyncSession]) -> None:
    i = make_intent()
    first = await submit(sessions, i)
    other = make_intent(
        i.intent_id,
        lines=(LineIn("l1", "SKU-A", 3, eur(1000)), LineIn("l2", "SKU-B", 2, eur(200))),
        totals=TotalsIn(eur(3400), eur(700), eur(500), eur(0), eur(4600)),
        payments=(PaymentIn("t1", "card", eur(4600)),),
    )
    with pytest.raises(AlreadyExists) as exc:
        await submit(sessions, other)
    assert exc.value.reason == "INTENT_CONFLICT"
    diff = exc.value.metadata["differing_fields"].split(",")
    assert diff == [
        "intent.lines[1].unit_price",
        "intent.payments",
        "intent.totals.grand_total",
        "intent.totals.subtotal",
    ]
    assert exc.value.metadata["order_id"] == first.order.id
    # Another channel reusing the key learns nothing about the order.
    with pytest.raises(AlreadyExists) as exc:
        await submit(sessions, i, channel=OTHER)
    assert exc.value.metadata["differing_fields"] == "intent.channel" and "order_id" not in exc.value.metadata


async def test_external_id_unique_per_channel_and_source(sessions: async_sessionmaker[AsyncSession]) -> None:
    ext = uuid.uuid4().hex
    await submit(sessions, make_intent(external_order_id=ext))
    with pytest.raises(AlreadyExists) as exc:
        await submit(sessions, make_intent(external_order_id=ext))
    assert exc.value.reason == "EXTERNAL_ORDER_ID_TAKEN"
    async with sessions() as s:
        o = await orders.get_order_by_external_id(s, "web", ext, channel="test")
        assert o.external_order_id == ext
        with pytest.raises(NotFound):
            await orders.get_order_by_external_id(s, "web", ext, channel="other")


async def test_money_and_lines_are_immutable_in_the_database(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    r = await submit(sessions, make_intent())
    oid = uuid.UUID(r.order.id)
    for sql in (
        "UPDATE orders.order_lines SET quantity = 9 WHERE order_id = :o",
        "UPDATE orders.orders SET grand_total_minor = 1, subtotal_minor = 1, tax_minor = 0, shipping_minor = 0 WHERE id = :o",
        "UPDATE orders.payments SET captured_minor = 1 WHERE order_id = :o",
        "UPDATE orders.status_entries SET code = 'x:y' WHERE order_id = :o",
        "DELETE FROM orders.status_entries WHERE order_id = :o",
    ):
        with pytest.raises(DBAPIError, match=r"immutable|append-only|not allowed"):
            async with sessions() as s, s.begin():
                await s.execute(text(sql), {"o": oid})


async def test_lifecycle_drives_inventory(sessions: async_sessionmaker[AsyncSession]) -> None:
    inv = RecordingInventory()
    r = await submit(sessions, make_intent())
    oid = r.order.id
    async with sessions() as s, s.begin():
        o = await orders.transition(s, oid, State.PROCESSING, channel="test", actor="ops", inventory=inv)
    assert o.state is State.PROCESSING and o.reservation_id
    assert inv.calls[0][0] == "reserve"
    assert inv.calls[0][1][1] == [StockLine("SKU-A", 3), StockLine("SKU-B", 2)]
    async with sessions() as s, s.begin():
        o, sh = await orders.ship_items(
            s,
            oid,
            [("l1", 1)],
            channel="test",
            actor="wh",
            tracking_number="TRK1",
            carrier="ups",
            inventory=inv,
        )
    assert o.state is State.PARTIALLY_SHIPPED and sh.tracking_number == "TRK1"
    assert inv.calls[-1] == ("fulfil", (o.reservation_id, [StockLine("SKU-A", 1)]))
    async with sessions() as s, s.begin():
        with pytest.raises(FailedPrecondition) as exc:
            await orders.ship_items(s, oid, [("l1", 3)], channel="test", actor="wh", inventory=inv)
        assert exc.value.reason == "QUANTITY_EXCEEDS_REMAINING"
    async with sessions() as s, s.begin():
        with pytest.raises(FailedPrecondition) as exc:
            await orders.transition(s, oid, State.CANCELLED, channel="test", actor="ops", inventory=inv)
        assert exc.value.reason == "INVALID_STATE_TRANSITION"
    async with sessions() as s, s.begin():
        o = await orders.transition(s, oid, State.SHIPPED, channel="test", actor="ops", inventory=inv)
    assert o.state is State.SHIPPED
    assert inv.calls[-1] == ("fulfil", (o.reservation_id, [StockLine("SKU-A", 2), StockLine("SKU-B", 2)]))
    async with sessions() as s, s.begin():
        o = await orders.transition(s, oid, State.DELIVERED, channel="test", actor="ops", inventory=inv)
        st = await orders.shipment_status(s, oid, channel="test")
        hist, _ = await orders.list_status_history(s, oid, channel="test")
    assert [(li.line_id, li.shipped_quantity, li.remaining_quantity) for li in st.lines] == [
        ("l1", 3, 0),
        ("l2", 2, 0),
    ]
    assert len(st.shipments) == 2
    assert [e.code for e in hist] == [
        "order:submitted",
        "inventory:reservation_confirmed",
        "order:processing",
        "order:items_shipped",
        "order:partially_shipped",
        "order:items_shipped",
        "order:shipped",
        "order:delivered",
    ]


async def test_cancel_releases_and_backorder_is_recorded(sessions: async_sessionmaker[AsyncSession]) -> None:
    inv = RecordingInventory(backorder={"SKU-B": 2})
    r = await submit(sessions, make_intent(), reserve_inventory=True, inventory=inv)
    assert r.order.state is State.PENDING and r.order.reservation_id
    async with sessions() as s, s.begin():
        # Already reserved at submission: processing does not reserve twice.
        await orders.transition(s, r.order.id, State.PROCESSING, channel="test", actor="ops", inventory=inv)
        o = await orders.transition(
            s, r.order.id, State.CANCELLED, channel="test", actor="ops", reason="fraud", inventory=inv
        )
        summary = await orders.status_summary(s, r.order.id, channel="test")
    assert [c[0] for c in inv.calls] == ["reserve", "release"]
    assert inv.calls[1][1] == r.order.reservation_id and o.state is State.CANCELLED
    latest = {e.module: e.code for e in summary.latest_by_module}
    assert latest == {"inventory": "inventory:released", "order": "order:cancelled"}
    async with sessions() as s:
        hist, _ = await orders.list_status_history(s, r.order.id, channel="test", module="inventory")
    assert [(e.code, e.severity) for e in hist] == [
        ("inventory:reservation_backordered", Severity.WARNING),
        ("inventory:released", Severity.INFO),
    ]


async def test_blocking_entry_pauses_shipping(sessions: async_sessionmaker[AsyncSession]) -> None:
    inv = RecordingInventory()
    procurement = Caller("procurement-bot", status_namespaces=frozenset({"procurement"}))
    r = await submit(sessions, make_intent())
    oid = r.order.id
    async with sessions() as s, s.begin():
        await orders.transition(s, oid, State.PROCESSING, channel="test", actor="ops", inventory=inv)
        e = await orders.append_status(
            s, oid, StatusIn("procurement:blocking_exception", Severity.BLOCKING, "exception", {"po": "PO-1"}),
            channel="test", caller=procurement,
        )  # fmt: skip
    async with sessions() as s:
        blocked, _ = await orders.list_orders(
            s, channel="test", filters=orders.OrderFilter(blocked_only=True), size=0, token=""
        )
        assert oid in [o.id for o in blocked] and all(o.blocked for o in blocked)
    async with sessions() as s, s.begin():
        with pytest.raises(FailedPrecondition) as exc:
            await orders.ship_items(s, oid, [("l1", 1)], channel="test", actor="wh", inventory=inv)
    assert exc.value.reason == "ORDER_BLOCKED"
    assert exc.value.precondition_violations[0].subject == f"orders/{oid}/status/{e.id}"
    async with sessions() as s, s.begin():
        with pytest.raises(PermissionDenied):
            await orders.close_status(
                s,
                oid,
                e.id,
                "nope",
                channel="test",
                caller=Caller("x", status_namespaces=frozenset({"payment"})),
            )
    async with sessions() as s, s.begin():
        closed = await orders.close_status(s, oid, e.id, "PO arrived", channel="test", caller=procurement)
    assert not closed.open and closed.closed_by == "procurement-bot"
    async with sessions() as s, s.begin():
        with pytest.raises(FailedPrecondition) as exc:
            await orders.close_status(s, oid, e.id, "again", channel="test", caller=procurement)
        assert exc.value.reason == "STATUS_ALREADY_CLOSED"
    async with sessions() as s, s.begin():
        o, _ = await orders.ship_items(s, oid, [("l1", 1)], channel="test", actor="wh", inventory=inv)
    assert o.state is State.PARTIALLY_SHIPPED and not o.blocked


async def test_list_orders_filters_and_pages(sessions: async_sessionmaker[AsyncSession]) -> None:
    cust = uuid.uuid4().hex
    ids = [
        (await submit(sessions, make_intent(customer_ref=cust, source_system="pos"))).order.id
        for _ in range(5)
    ]
    seen: list[str] = []
    token = ""
    async with sessions() as s:
        while True:
            page, token = await orders.list_orders(
                s, channel="test", filters=orders.OrderFilter(customer_ref=cust), size=2, token=token
            )
            seen += [o.id for o in page]
            if not token:
                break
        assert seen == list(reversed(ids))
        page, _ = await orders.list_orders(
            s,
            channel="test",
            filters=orders.OrderFilter(customer_ref=cust, states=(State.PROCESSING,)),
            size=0,
            token="",
        )
        assert page == []
        with pytest.raises(InvalidArgument):
            await orders.list_orders(
                s, channel="test", filters=orders.OrderFilter(customer_ref="x"), size=2, token=token or "Zm9v"
            )
        other, _ = await orders.list_orders(
            s, channel="other", filters=orders.OrderFilter(customer_ref=cust), size=0, token=""
        )
        assert other == []


async def test_record_refund_is_idempotent_and_bounded(sessions: async_sessionmaker[AsyncSession]) -> None:
    r = await submit(sessions, make_intent())
    oid = r.order.id
    async with sessions() as s, s.begin():
        rec = await orders.record_refund(s, oid, "rf-1", {"l1": 1}, {"t1": 1000}, actor="refunds")
    async with sessions() as s, s.begin():
        again = await orders.record_refund(s, oid, "rf-1", {"l1": 1}, {"t1": 1000}, actor="refunds")
    assert again == rec
    async with sessions() as s, s.begin():
        with pytest.raises(AlreadyExists):
            await orders.record_refund(s, oid, "rf-1", {"l1": 2}, {"t1": 1000}, actor="refunds")
    async with sessions() as s, s.begin():
        with pytest.raises(FailedPrecondition) as exc:
            # 1 + 3 > 3 units; 1000 + 3001 > 4000 captured: nothing of it sticks.
            await orders.record_refund(s, oid, "rf-2", {"l1": 3, "l2": 1}, {"t1": 3001}, actor="refunds")
        assert {v.subject for v in exc.value.precondition_violations} == {
            f"orders/{oid}/lines/l1",
            f"orders/{oid}/payments/t1",
        }
    async with sessions() as s:
        o = await orders.get_order(s, oid, channel=None)
        refunds = await orders.list_refunds(s, oid)
    assert [(li.line_id, li.refunded_quantity) for li in o.lines] == [("l1", 1), ("l2", 0)]
    assert [(p.tender_id, p.refunded.amount_minor, p.captured.amount_minor) for p in o.payments] == [
        ("t1", 1000, 4000),
        ("t2", 0, 700),
    ]
    assert [x.refund_id for x in refunds] == ["rf-1"]


async def test_events_are_in_the_outbox(sessions: async_sessionmaker[AsyncSession]) -> None:
    r = await submit(sessions, make_intent())
    async with sessions() as s:
        rows = (
            await s.execute(
                text("SELECT topic, channel FROM platform.outbox WHERE aggregate_id = :o ORDER BY id"),
                {"o": r.order.id},
            )
        ).all()
    assert [tuple(x) for x in rows] == [("order.created", "test"), ("order.status_appended", "test")]


async def test_cart_adopts_its_reservation(sessions: async_sessionmaker[AsyncSession]) -> None:
    inv = RecordingInventory()
    with pytest.raises(InvalidArgument):
        await submit(sessions, make_intent(), reserve_inventory=True, reservation_id="res-x", inventory=inv)
    r = await submit(sessions, make_intent(), reservation_id="res-cart-1", inventory=inv)
    assert r.order.reservation_id == "res-cart-1" and inv.calls == []
    async with sessions() as s, s.begin():
        await orders.transition(s, r.order.id, State.PROCESSING, channel="test", actor="ops", inventory=inv)
        o = await orders.transition(
            s, r.order.id, State.CANCELLED, channel="test", actor="ops", inventory=inv
        )
        hist, _ = await orders.list_status_history(s, r.order.id, channel="test", module="inventory")
    assert inv.calls == [("release", "res-cart-1")] and o.state is State.CANCELLED
    assert hist[0].payload == {"reservation_id": "res-cart-1", "adopted": True}


async def _outbox(sessions: async_sessionmaker[AsyncSession], order_id: str) -> list[tuple[str, Any]]:
    async with sessions() as s:
        rows = (
            await s.execute(
                text("SELECT topic, payload FROM platform.outbox WHERE aggregate_id = :o ORDER BY id"),
                {"o": order_id},
            )
        ).all()
    return [(r.topic, r.payload) for r in rows]


def entry_json(e: orders.StatusEntry) -> dict[str, Any]:
    """What an order status event's `entry` has always held (the Python builder
    the events were first made with): the stored entry, timestamps as
    datetime.isoformat of the UTC values asyncpg reads."""
    return {
        "id": e.id,
        "order_id": e.order_id,
        "code": e.code,
        "module": e.module,
        "category": e.category,
        "severity": e.severity.value,
        "payload": e.payload,
        "recorded_at": e.recorded_at.isoformat(),
        "written_by": e.written_by,
        "created_at": e.created_at.isoformat(),
        "closed_at": e.closed_at.isoformat() if e.closed_at else None,
        "closed_by": e.closed_by,
        "close_note": e.close_note,
    }


@pytest.mark.parametrize("variant", ["plain", "adopted", "reserved", "backordered"])
async def test_intent_events_carry_the_stored_entries(
    sessions: async_sessionmaker[AsyncSession], variant: str
) -> None:
    inv = RecordingInventory(backorder={"SKU-A": 1} if variant == "backordered" else None)
    kw: dict[str, Any] = {"inventory": inv}
    if variant == "adopted":
        kw["reservation_id"] = "res-cart-7"
    if variant in ("reserved", "backordered"):
        kw["reserve_inventory"] = True
    r = await submit(sessions, make_intent(), **kw)
    async with sessions() as s, s.begin():
        hist, _ = await orders.list_status_history(s, r.order.id, channel="test")

    assert len(hist) == (1 if variant == "plain" else 2)
    assert await _outbox(sessions, r.order.id) == [
        (orders.CREATED, {"order_id": r.order.id, "state": "pending"}),
        *((orders.STATUS_APPENDED, {"order_id": r.order.id, "entry": entry_json(e)}) for e in hist),
    ]
    if variant != "plain":
        assert r.order.reservation_id == hist[1].payload["reservation_id"]
    if variant == "backordered":
        assert hist[1].code == "inventory:reservation_backordered" and hist[1].severity is Severity.WARNING


async def test_append_transition_and_close_events_carry_the_stored_entries(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    from datetime import UTC, datetime

    r = await submit(sessions, make_intent())
    oid = r.order.id
    crm = Caller("crm-bot", status_namespaces=frozenset({"crm"}))
    async with sessions() as s, s.begin():
        appended = await orders.append_status(
            s,
            oid,
            StatusIn(
                code="crm:called",
                severity=Severity.BLOCKING,
                category="contact",
                payload={"n": 1, "who": "Zoë", "nested": {"ok": True, "list": [1, "2", None]}},
                recorded_at=datetime(2026, 3, 29, 1, 30, 0, 120, tzinfo=UTC),
            ),
            channel="test",
            caller=crm,
        )
    async with sessions() as s, s.begin():
        closed = await orders.close_status(s, oid, appended.id, "done", channel="test", caller=crm)
    async with sessions() as s, s.begin():
        await orders.transition(
            s, oid, State.CANCELLED, channel="test", actor="ops", inventory=RecordingInventory()
        )
    async with sessions() as s, s.begin():
        hist, _ = await orders.list_status_history(s, oid, channel="test")
    by_code = {e.code: e for e in hist}
    assert closed == by_code["crm:called"] and closed.closed_at is not None
    open_entry = dataclasses.replace(closed, closed_at=None, closed_by=None, close_note=None)
    assert appended == open_entry
    assert await _outbox(sessions, oid) == [
        (orders.CREATED, {"order_id": oid, "state": "pending"}),
        (orders.STATUS_APPENDED, {"order_id": oid, "entry": entry_json(by_code["order:submitted"])}),
        (orders.STATUS_APPENDED, {"order_id": oid, "entry": entry_json(open_entry)}),
        (orders.STATUS_CLOSED, {"order_id": oid, "entry": entry_json(closed)}),
        (orders.TRANSITIONED, {"order_id": oid, "from": "pending", "to": "cancelled"}),
        (orders.STATUS_APPENDED, {"order_id": oid, "entry": entry_json(by_code["order:cancelled"])}),
    ]
    # The watcher's reading of each entry event is the stored entry.
    async with sessions() as s:
        rows = (
            await s.execute(
                text(
                    "SELECT payload FROM platform.outbox WHERE aggregate_id = :o AND topic LIKE 'order.status%'"
                ),
                {"o": oid},
            )
        ).scalars()
        seen = [orders.entry_from_payload(p["entry"]) for p in rows]
    assert seen == [by_code["order:submitted"], open_entry, closed, by_code["order:cancelled"]]


async def test_event_timestamps_are_written_like_python_isoformat(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # Entry events are built in SQL; their timestamps must read exactly as
    # datetime.isoformat of a UTC datetime writes them (as they always have).
    from datetime import UTC, datetime

    from domain.order.store.entries import _iso_sql

    cases = [
        datetime(2026, 3, 29, 1, 30, 0, 0, tzinfo=UTC),
        datetime(2026, 3, 29, 1, 30, 0, 120, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 11, 22, 2, 0, 7, 100000, tzinfo=UTC),
    ]
    async with sessions() as s:
        await s.execute(text("SET LOCAL TimeZone = 'America/New_York'"))  # the session's zone plays no part
        for dt in cases:
            got = (
                await s.execute(text(f"SELECT {_iso_sql('CAST(:t AS timestamptz)')}"), {"t": dt})
            ).scalar_one()
            assert got == dt.isoformat()
