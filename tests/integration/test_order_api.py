"""OrderService from a client's side: real gRPC server, real PostgreSQL.

Inventory-backed lifecycle tests live in test_order_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from entrepot.order.v1 import order_pb2 as pb
from entrepot.platform.v1 import channel_pb2
from entrepot_client import (
    AlreadyExistsError,
    Entrepot,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from entrepot_client.order import build_intent, money, watch_order_events
from server.app import App
from tests.conftest import unique

LINES = [("1", "SKU-A", 2, 1250), ("2", "SKU-B", 1, 990)]


def intent(intent_id: str | None = None, **kw: object) -> pb.OrderIntent:
    args: dict[str, object] = {
        "lines": LINES,
        "tax_minor": 698,
        "shipping_minor": 500,
        "payments": [("t1", "card", 4000)],
    }
    args.update(kw)
    return build_intent(intent_id or unique("intent"), "webshop", "EUR", **args)  # type: ignore[arg-type]


async def submit(client: Entrepot, i: pb.OrderIntent, **kw: object) -> pb.SubmitOrderIntentResponse:
    return await client.order.submit_order_intent(pb.SubmitOrderIntentRequest(intent=i, **kw))  # type: ignore[arg-type]


async def test_fifty_concurrent_duplicate_intents_make_one_order(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    i = intent()
    # Each caller retries with its own request_id: only the intent key dedupes them.
    results = await asyncio.gather(*(submit(admin, i, request_id=unique("rid")) for _ in range(50)))
    assert len({r.order.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert all(r.order == results[0].order for r in results)
    async with sessions() as s:
        n = (
            await s.execute(
                text("SELECT count(*) FROM orders.orders WHERE intent_id = :i"), {"i": i.intent_id}
            )
        ).scalar_one()
        created_events = (
            await s.execute(
                text(
                    "SELECT count(*) FROM platform.outbox WHERE topic = 'order.created' AND aggregate_id = :o"
                ),
                {"o": results[0].order.id},
            )
        ).scalar_one()
    assert n == 1 and created_events == 1
    o = results[0].order
    assert o.state == pb.Order.STATE_PENDING and o.totals.grand_total.amount_minor == 4688
    assert [li.line_total.amount_minor for li in o.lines] == [2500, 990]


async def test_same_intent_different_content_is_already_exists(admin: Entrepot) -> None:
    i = intent()
    first = await submit(admin, i)
    changed = intent(i.intent_id, lines=[("1", "SKU-A", 3, 1250), ("2", "SKU-B", 1, 990)], payments=[])
    with pytest.raises(AlreadyExistsError) as exc:
        await submit(admin, changed)
    err = exc.value
    assert err.reason == "INTENT_CONFLICT" and err.domain == "entrepot"
    assert err.metadata["order_id"] == first.order.id
    assert err.metadata["differing_fields"].split(",") == [
        "intent.lines[0].quantity",
        "intent.payments",
        "intent.totals.grand_total",
        "intent.totals.subtotal",
    ]
    assert {v.field for v in err.field_violations} == set(err.metadata["differing_fields"].split(","))
    # The original is untouched.
    again = await submit(admin, i)
    assert not again.created and again.order == first.order


async def test_invalid_intent_gives_field_violations(admin: Entrepot) -> None:
    bad = intent(lines=[("1", "SKU-A", 2, 1250), ("1", "", 0, 990)], payments=[("t1", "card", 999_999)])
    bad.totals.tax.CopyFrom(money("USD", 698))  # wrong currency, and totals no longer add up
    bad.totals.grand_total.amount_minor += 1
    with pytest.raises(InvalidArgumentError) as exc:
        await submit(admin, bad)
    assert exc.value.reason == "INVALID_ORDER_INTENT"
    fields = {v.field: v.description for v in exc.value.field_violations}
    assert set(fields) == {
        "intent.lines[1].line_id",
        "intent.lines[1].sku",
        "intent.lines[1].quantity",
        "intent.totals.tax.currency_code",
        "intent.totals.grand_total",
        "intent.payments",
    }
    assert "EUR" in fields["intent.totals.tax.currency_code"]
    with pytest.raises(InvalidArgumentError) as exc:
        await submit(admin, pb.OrderIntent())
    assert {"intent.intent_id", "intent.source_system", "intent.lines"} <= {
        v.field for v in exc.value.field_violations
    }


async def test_orders_are_read_back_by_id_external_id_and_lists(admin: Entrepot) -> None:
    customer = unique("cust")
    made = [
        (await submit(admin, intent(external_order_id=unique("ext"), customer_ref=customer))).order
        for _ in range(3)
    ]
    got = await admin.order.get_order(pb.GetOrderRequest(id=made[0].id))
    assert got == made[0]
    by_ext = await admin.order.get_order_by_external_id(
        pb.GetOrderByExternalIdRequest(source_system="webshop", external_order_id=made[1].external_order_id)
    )
    assert by_ext.id == made[1].id
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.order.list_orders(
            pb.ListOrdersRequest(customer_ref=customer, page_size=2, page_token=token)
        )
        seen += [o.id for o in page.orders]
        token = page.next_page_token
        if not token:
            break
    assert seen == [o.id for o in reversed(made)]
    none = await admin.order.list_orders(
        pb.ListOrdersRequest(customer_ref=customer, states=[pb.Order.STATE_SHIPPED])
    )
    assert list(none.orders) == []
    window = await admin.order.list_orders(
        pb.ListOrdersRequest(customer_ref=customer, start_time=made[1].create_time)
    )
    assert [o.id for o in window.orders] == [made[2].id, made[1].id]


async def test_another_channels_order_is_not_found(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    slug = unique("ch")
    await admin.channel.create_channel(
        channel_pb2.CreateChannelRequest(channel=channel_pb2.Channel(slug=slug, name="Other", currency="EUR"))
    )
    o = (await submit(admin, intent())).order
    other = client_factory(channel=slug)
    with pytest.raises(NotFoundError) as exc:
        await other.order.get_order(pb.GetOrderRequest(id=o.id))
    assert exc.value.reason == "ORDER_NOT_FOUND"
    with pytest.raises(NotFoundError):
        await other.order.get_order(pb.GetOrderRequest(id="not-a-uuid"))


async def test_status_namespaces_and_history(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    o = (await submit(admin, intent())).order
    payment = client_factory(
        permissions=["order.status.write", "order.read"], sub="psp-adapter", status_namespaces=["payment"]
    )
    entry = await payment.order.append_order_status(
        pb.AppendOrderStatusRequest(
            entry=pb.OrderStatusEntry(
                order_id=o.id,
                code="payment:captured",
                category="payment",
                payload_json='{"amount_minor": 4688, "psp": "sim"}',
            ),
            request_id=unique("rid"),
        )
    )
    assert entry.written_by == "psp-adapter" and entry.severity == pb.SEVERITY_INFO and entry.open
    with pytest.raises(PermissionDeniedError) as exc:
        await payment.order.append_order_status(
            pb.AppendOrderStatusRequest(
                entry=pb.OrderStatusEntry(
                    order_id=o.id, code="procurement:blocking_exception", severity=pb.SEVERITY_BLOCKING
                )
            )
        )
    assert exc.value.reason == "STATUS_NAMESPACE_FORBIDDEN"
    no_permission = client_factory(permissions=["order.read"], status_namespaces=["procurement"])
    with pytest.raises(PermissionDeniedError):
        await no_permission.order.append_order_status(
            pb.AppendOrderStatusRequest(entry=pb.OrderStatusEntry(order_id=o.id, code="procurement:note"))
        )
    with pytest.raises(InvalidArgumentError) as exc2:
        await payment.order.append_order_status(
            pb.AppendOrderStatusRequest(
                entry=pb.OrderStatusEntry(
                    order_id=o.id, code="payment:captured", payload_json='{"amount": 12.5}'
                )
            )
        )
    assert exc2.value.field_violations[0].field == "entry.payload_json"
    # A manual correction is an entry, never a rewrite.
    backoffice = client_factory(
        permissions=["order.status.write", "order.read"], sub="agent-7", status_namespaces=["order"]
    )
    adj = await backoffice.order.append_order_status(
        pb.AppendOrderStatusRequest(
            entry=pb.OrderStatusEntry(
                order_id=o.id,
                code="order:manually_adjusted",
                payload_json='{"note": "customer phoned: gift wrap"}',
            )
        )
    )
    assert adj.module == "order"
    with pytest.raises(PermissionDeniedError) as exc:
        await backoffice.order.append_order_status(
            pb.AppendOrderStatusRequest(entry=pb.OrderStatusEntry(order_id=o.id, code="order:shipped"))
        )
    assert exc.value.reason == "STATUS_CODE_RESERVED"
    history = await admin.order.list_order_status_history(pb.ListOrderStatusHistoryRequest(order_id=o.id))
    assert [e.code for e in history.entries] == [
        "order:submitted",
        "payment:captured",
        "order:manually_adjusted",
    ]
    summary = await admin.order.get_order_status_summary(pb.GetOrderStatusSummaryRequest(order_id=o.id))
    assert {e.module: e.code for e in summary.latest_by_module} == {
        "order": "order:manually_adjusted",
        "payment": "payment:captured",
    }
    assert list(summary.open_blocking) == [] and summary.state == pb.Order.STATE_PENDING
    unchanged = await admin.order.get_order(pb.GetOrderRequest(id=o.id))
    assert unchanged.lines == o.lines and unchanged.totals == o.totals


async def test_invalid_transitions_are_failed_precondition(admin: Entrepot) -> None:
    o = (await submit(admin, intent())).order
    for target in (pb.Order.STATE_DELIVERED, pb.Order.STATE_SHIPPED):
        with pytest.raises(FailedPreconditionError) as exc:
            await admin.order.transition_order(pb.TransitionOrderRequest(order_id=o.id, target_state=target))
        assert exc.value.reason == "INVALID_STATE_TRANSITION"
    with pytest.raises(InvalidArgumentError) as exc2:
        await admin.order.transition_order(pb.TransitionOrderRequest(order_id=o.id))
    assert exc2.value.field_violations[0].field == "target_state"
    cancelled = await admin.order.transition_order(
        pb.TransitionOrderRequest(order_id=o.id, target_state=pb.Order.STATE_CANCELLED, reason="customer")
    )
    assert cancelled.state == pb.Order.STATE_CANCELLED
    with pytest.raises(FailedPreconditionError) as exc:
        await admin.order.transition_order(
            pb.TransitionOrderRequest(order_id=o.id, target_state=pb.Order.STATE_PROCESSING)
        )
    assert exc.value.reason == "INVALID_STATE_TRANSITION"
    with pytest.raises(FailedPreconditionError):
        await admin.order.ship_order_items(
            pb.ShipOrderItemsRequest(order_id=o.id, lines=[pb.LineQuantity(line_id="1", quantity=1)])
        )


async def _collect(
    client: Entrepot, after: int, done: Callable[[list[pb.OrderEvent]], bool]
) -> tuple[list[pb.OrderEvent], int]:
    """Reads until done(events) holds; returns every event received and the last cursor."""
    events: list[pb.OrderEvent] = []
    cursor = after
    stream = client.order.watch_order_events(pb.WatchOrderEventsRequest(after_event_id=after))
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async with asyncio.timeout(30):
            async for resp in stream:
                events += resp.events
                cursor = resp.cursor
                if done(events):
                    break
    return events, cursor


async def _other_channel(admin: Entrepot) -> str:
    slug = unique("ch")
    await admin.channel.create_channel(
        channel_pb2.CreateChannelRequest(channel=channel_pb2.Channel(slug=slug, name=slug, currency="EUR"))
    )
    return slug


def _saw(order_id: str, kind: int) -> Callable[[list[pb.OrderEvent]], bool]:
    return lambda events: any(e.order_id == order_id and e.type == kind for e in events)


async def test_watch_order_events_resumes_with_nothing_lost_or_repeated(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    slug = await _other_channel(admin)
    watcher = client_factory(permissions=["order.read"])
    # A first watcher from "now": created + status_appended per order.
    orders: list[str] = []
    first = asyncio.ensure_future(
        _collect(
            watcher,
            0,
            lambda ev: len(orders) == 3 and _saw(orders[2], pb.ORDER_EVENT_TYPE_STATUS_APPENDED)(ev),
        )
    )
    await asyncio.sleep(0.5)
    other = (await submit(client_factory(channel=slug), intent())).order.id  # another channel: never here
    orders += [(await submit(admin, intent())).order.id for _ in range(3)]
    received, _ = await first
    # "From now" may include a few earlier events while some transaction on
    # the server holds the visibility horizon back; ours come once, in order.
    assert other not in {e.order_id for e in received}
    events = [e for e in received if e.order_id in orders]
    assert [(e.order_id, e.type) for e in events] == [
        (oid, t) for oid in orders for t in (pb.ORDER_EVENT_TYPE_CREATED, pb.ORDER_EVENT_TYPE_STATUS_APPENDED)
    ]
    assert events[1].entry.code == "order:submitted"
    # Disconnect after the 3rd event; more happens while away; resume from it.
    resume_from = events[2].event_id
    await admin.order.transition_order(
        pb.TransitionOrderRequest(order_id=orders[0], target_state=pb.Order.STATE_CANCELLED)
    )
    later = (await submit(admin, intent())).order.id
    resumed, _ = await _collect(watcher, resume_from, _saw(later, pb.ORDER_EVENT_TYPE_STATUS_APPENDED))
    got = [(e.order_id, e.type) for e in resumed]
    assert got == [
        (orders[1], pb.ORDER_EVENT_TYPE_STATUS_APPENDED),
        (orders[2], pb.ORDER_EVENT_TYPE_CREATED),
        (orders[2], pb.ORDER_EVENT_TYPE_STATUS_APPENDED),
        (orders[0], pb.ORDER_EVENT_TYPE_TRANSITIONED),
        (orders[0], pb.ORDER_EVENT_TYPE_STATUS_APPENDED),  # order:cancelled
        (later, pb.ORDER_EVENT_TYPE_CREATED),
        (later, pb.ORDER_EVENT_TYPE_STATUS_APPENDED),
    ]
    transitioned = resumed[3]
    assert (
        transitioned.previous_state == pb.Order.STATE_PENDING
        and transitioned.state == pb.Order.STATE_CANCELLED
    )
    ids = [e.event_id for e in events[:3] + resumed]
    assert len(ids) == len(set(ids)) and ids == sorted(ids)  # single writer here: commit order = id order


async def test_watch_helper_filters_by_order(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    o = (await submit(admin, intent())).order
    watcher = client_factory(permissions=["order.read"])
    helper = watch_order_events(watcher.order, order_id=o.id)
    first = asyncio.ensure_future(anext(helper))
    await asyncio.sleep(0.5)
    await submit(admin, intent())  # another order: filtered out
    crm = client_factory(permissions=["order.status.write"], status_namespaces=["crm"])
    await crm.order.append_order_status(
        pb.AppendOrderStatusRequest(entry=pb.OrderStatusEntry(order_id=o.id, code="crm:called"))
    )
    async with contextlib.aclosing(helper), asyncio.timeout(30):  # type: ignore[type-var]
        seen = [await first]
        while seen[-1].entry.code != "crm:called":
            seen.append(await anext(helper))
    assert {e.order_id for e in seen} == {o.id}


async def test_unknown_resume_point_is_out_of_range(admin: Entrepot) -> None:
    from entrepot_client import EntrepotError

    with pytest.raises(EntrepotError) as exc:
        await _collect(admin, 10**15, bool)
    assert exc.value.reason == "UNKNOWN_EVENT_ID"


async def test_watch_by_type_channel_and_resume(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    slug = await _other_channel(admin)
    watcher = client_factory(permissions=["order.read"])
    created_only = pb.WatchOrderEventsRequest(types=[pb.ORDER_EVENT_TYPE_CREATED])
    stream = watcher.order.watch_order_events(created_only)
    first = asyncio.ensure_future(anext(aiter(stream)))
    await asyncio.sleep(0.5)  # the watcher has taken its "now" position
    ids = [(await submit(admin, intent())).order.id for _ in range(3)]
    await submit(client_factory(channel=slug), intent())  # another channel: never delivered
    events = list((await asyncio.wait_for(first, 30)).events)
    async with asyncio.timeout(30):
        async for resp in stream:
            if ids[-1] in {e.order_id for e in events}:
                break
            events += resp.events
    await stream.aclose()  # type: ignore[attr-defined]
    assert all(e.type == pb.ORDER_EVENT_TYPE_CREATED for e in events)
    mine = [e for e in events if e.order_id in ids]
    assert [e.order_id for e in mine] == ids
    # Resume after the first: exactly the other two, then new ones.
    later = (await submit(admin, intent())).order.id
    resumed: list[pb.OrderEvent] = []
    resume = pb.WatchOrderEventsRequest(types=[pb.ORDER_EVENT_TYPE_CREATED], after_event_id=mine[0].event_id)
    stream = watcher.order.watch_order_events(resume)
    async with contextlib.aclosing(stream), asyncio.timeout(30):  # type: ignore[type-var]
        async for resp in stream:
            resumed += resp.events
            if later in {e.order_id for e in resumed}:
                break
    assert [e.order_id for e in resumed] == [*ids[1:], later]


async def test_a_slow_order_watcher_catches_up_and_is_never_cut_off(
    admin: Entrepot, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server import watch_hub

    # A buffer of one event: every order (two events in one transaction) overflows
    # it, and the watcher goes back to its own reads from what it was sent.
    monkeypatch.setattr(watch_hub, "ORDER_BUFFER_EVENTS", 1)
    hub = watch_hub.hub_for(app.rt)
    fallbacks = hub.fallbacks
    received: list[pb.OrderEvent] = []
    wanted: set[str] = set()
    more: list[str] = []
    arrived = asyncio.Event()

    async def follow() -> None:
        stream = admin.order.watch_order_events(pb.WatchOrderEventsRequest())
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for resp in stream:
                received.extend(resp.events)
                seen = {e.order_id for e in received if e.type == pb.ORDER_EVENT_TYPE_STATUS_APPENDED}
                if wanted and wanted <= seen:
                    arrived.set()
                    if more and more[0] in seen:
                        return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.5)  # the watcher is on the live feed
    wanted.update(r.order.id for r in await asyncio.gather(*(submit(admin, intent()) for _ in range(20))))
    await asyncio.wait_for(arrived.wait(), 30)
    assert hub.fallbacks > fallbacks
    # Still on the same stream: later orders keep arriving.
    more.append((await submit(admin, intent())).order.id)
    await asyncio.wait_for(follower, 30)
    ids = [e.event_id for e in received]
    assert len(ids) == len(set(ids))
    for oid in [*wanted, *more]:
        assert [e.type for e in received if e.order_id == oid] == [
            pb.ORDER_EVENT_TYPE_CREATED,
            pb.ORDER_EVENT_TYPE_STATUS_APPENDED,
        ]


async def test_stock_and_order_watchers_share_one_hub_and_listen_connection(
    admin: Entrepot, app: App, sessions: async_sessionmaker[AsyncSession]
) -> None:
    from entrepot.inventory.v1 import inventory_pb2 as inv
    from server import watch_hub

    hub = watch_hub.hub_for(app.rt)
    stock = admin.inventory.watch_stock_changes(inv.WatchStockChangesRequest(skus=["SKU-A"]))
    orders = admin.order.watch_order_events(pb.WatchOrderEventsRequest())
    stock_next = asyncio.ensure_future(anext(aiter(stock)))
    orders_next = asyncio.ensure_future(anext(aiter(orders)))
    try:
        wanted = {"inventory.stock_changed", *orders_topics()}
        for _ in range(200):  # both calls reach the hub
            if wanted <= set(hub.topics):
                break
            await asyncio.sleep(0.05)
        assert wanted <= set(hub.topics)
        async with sessions() as s:
            listeners = (
                await s.execute(
                    text(
                        """SELECT count(*) FROM pg_stat_activity
                           WHERE datname = current_database() AND application_name LIKE 'entrepot-%'
                             AND query LIKE 'LISTEN%'"""
                    )
                )
            ).scalar_one()
        assert listeners == 1
    finally:
        for pending in (stock_next, orders_next):
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending


def orders_topics() -> tuple[str, ...]:
    import domain.order

    return domain.order.TOPICS


async def test_a_watcher_receives_each_entry_as_the_history_reads_it(
    admin: Entrepot, client_factory: Callable[..., Entrepot], sessions: async_sessionmaker[AsyncSession]
) -> None:
    crm = client_factory(permissions=["order.status.write", "order.read"], status_namespaces=["crm"])
    async with sessions() as s:  # a cursor before the order's events
        after = int((await s.execute(text("SELECT max(id) FROM platform.outbox"))).scalar_one())
    o = (await submit(admin, intent())).order
    appended = await crm.order.append_order_status(
        pb.AppendOrderStatusRequest(
            entry=pb.OrderStatusEntry(
                order_id=o.id, code="crm:called", severity=pb.SEVERITY_WARNING, category="contact"
            )
        )
    )
    closed = await crm.order.close_order_status(
        pb.CloseOrderStatusRequest(order_id=o.id, entry_id=appended.id, note="done")
    )
    received, _ = await _collect(
        admin,
        after,
        lambda ev: any(e.order_id == o.id and e.type == pb.ORDER_EVENT_TYPE_STATUS_CLOSED for e in ev),
    )
    entries = [e.entry for e in received if e.order_id == o.id and e.HasField("entry")]
    history = await admin.order.list_order_status_history(pb.ListOrderStatusHistoryRequest(order_id=o.id))
    submitted = next(x for x in history.entries if x.code == "order:submitted")
    assert closed in history.entries and closed.close_note == "done"
    assert entries == [submitted, appended, closed]
