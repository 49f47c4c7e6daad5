"""Helpers for OrderService on top of the generated `OrderClient` (`Entrepot(...).order`).

from entrepot_client.order import build_intent, watch_order_events

intent = build_intent("checkout-42", "webshop", "EUR",
                      lines=[("1", "SKU-A", 2, 1250)], tax_minor=500,
                      payments=[("psp-1", "card", 3000)])
resp = await ep.order.submit_order_intent(
    order_pb2.SubmitOrderIntentRequest(intent=intent, reserve_inventory=True, request_id="checkout-42"))

async for event in watch_order_events(ep.order, after_event_id=last_seen):
    ...  # reconnects after UNAVAILABLE and resumes from the last event seen

replacement = await reissue_order(ep.order, order.id, "parcel lost", lines=[("1", 1)], request_id="claim-7")
order = await acknowledge_handoff(ep.order, order.id, "ERP-4711", module="erp", request_id="erp-4711")
async for order in stuck_handoffs(ep.order, timedelta(hours=2)):
    ...  # orders older than two hours that no system acknowledged yet
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta

from entrepot.order.v1 import order_pb2
from entrepot.platform.v1 import types_pb2
from entrepot_client._services import OrderClient
from entrepot_client.errors import UnavailableError

__all__ = [
    "acknowledge_handoff",
    "build_intent",
    "money",
    "reissue_order",
    "stuck_handoffs",
    "watch_order_events",
]


def money(currency: str, amount_minor: int) -> types_pb2.Money:
    return types_pb2.Money(currency_code=currency, amount_minor=amount_minor)


def build_intent(
    intent_id: str,
    source_system: str,
    currency: str,
    *,
    lines: Sequence[tuple[str, str, int, int]],
    tax_minor: int = 0,
    shipping_minor: int = 0,
    discount_minor: int = 0,
    payments: Sequence[tuple[str, str, int]] | Sequence[tuple[str, str, int, str]] = (),
    external_order_id: str = "",
    customer_ref: str = "",
    submit_time: datetime | None = None,
) -> order_pb2.OrderIntent:
    """An intent whose totals add up: lines are (line_id, sku, quantity, unit_price_minor),
    payments (tender_id, method, captured_minor[, gateway_reference])."""
    subtotal = sum(q * p for _, _, q, p in lines)
    intent = order_pb2.OrderIntent(
        intent_id=intent_id,
        source_system=source_system,
        external_order_id=external_order_id,
        customer_ref=customer_ref,
        lines=[
            order_pb2.OrderLine(line_id=lid, sku=sku, quantity=q, unit_price=money(currency, p))
            for lid, sku, q, p in lines
        ],
        totals=order_pb2.OrderTotals(
            subtotal=money(currency, subtotal),
            tax=money(currency, tax_minor),
            shipping=money(currency, shipping_minor),
            discount=money(currency, discount_minor),
            grand_total=money(currency, subtotal + tax_minor + shipping_minor - discount_minor),
        ),
        payments=[
            order_pb2.Payment(
                tender_id=p[0],
                method=p[1],
                captured=money(currency, p[2]),
                gateway_reference=p[3] if len(p) > 3 else "",  # type: ignore[misc]
            )
            for p in payments
        ],
    )
    if submit_time is not None:
        intent.submit_time.FromDatetime(submit_time)
    return intent


async def watch_order_events(
    client: OrderClient,
    *,
    after_event_id: int = 0,
    order_id: str = "",
    types: Sequence[int] = (),
    reconnect_delay: float = 1.0,
) -> AsyncIterator[order_pb2.OrderEvent]:
    """Every matching event once, in commit order; survives server restarts."""
    cursor = after_event_id
    while True:
        request = order_pb2.WatchOrderEventsRequest(
            after_event_id=cursor, order_id=order_id, types=list(types)
        )
        try:
            async for response in client.watch_order_events(request):
                for event in response.events:
                    yield event
                cursor = response.cursor or cursor
        except UnavailableError:
            await asyncio.sleep(reconnect_delay)


async def reissue_order(
    client: OrderClient,
    order_id: str,
    reason: str,
    *,
    lines: Sequence[tuple[str, int]] = (),
    keep_unit_prices: bool = False,
    request_id: str = "",
) -> order_pb2.Order:
    """The reissue of `order_id`: (line_id, quantity) pairs, or every line in full;
    zero-priced unless `keep_unit_prices`. Pass a request_id to retry safely."""
    return await client.reissue_order(
        order_pb2.ReissueOrderRequest(
            order_id=order_id,
            reason=reason,
            lines=[order_pb2.LineQuantity(line_id=lid, quantity=q) for lid, q in lines],
            keep_unit_prices=keep_unit_prices,
            request_id=request_id,
        )
    )


async def acknowledge_handoff(
    client: OrderClient, order_id: str, external_reference: str, *, module: str = "", request_id: str = ""
) -> order_pb2.Order:
    """Records the reference of the system that took the order over (once; the
    same reference again is a no-op). `module`: the history namespace, when the
    token has more than one."""
    return await client.acknowledge_order_handoff(
        order_pb2.AcknowledgeOrderHandoffRequest(
            order_id=order_id, external_reference=external_reference, module=module, request_id=request_id
        )
    )


async def stuck_handoffs(
    client: OrderClient, older_than: timedelta, *, states: Sequence[int] = (), page_size: int = 100
) -> AsyncIterator[order_pb2.Order]:
    """Orders created at least `older_than` ago whose handoff nobody acknowledged, newest first."""
    request = order_pb2.ListOrdersRequest(page_size=page_size, states=list(states))
    request.handoff_unacknowledged_for.FromTimedelta(older_than)
    while True:
        page = await client.list_orders(request)
        for order in page.orders:
            yield order
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token
