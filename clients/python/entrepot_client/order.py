"""Helpers for OrderService on top of the generated `OrderClient` (`Entrepot(...).order`).

from entrepot_client.order import build_intent, watch_order_events

intent = build_intent("checkout-42", "webshop", "EUR",
                      lines=[("1", "SKU-A", 2, 1250)], tax_minor=500,
                      payments=[("psp-1", "card", 3000)])
resp = await ep.order.submit_order_intent(
    order_pb2.SubmitOrderIntentRequest(intent=intent, reserve_inventory=True, request_id="checkout-42"))

async for event in watch_order_events(ep.order, after_event_id=last_seen):
    ...  # reconnects after UNAVAILABLE and resumes from the last event seen
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime

from entrepot.order.v1 import order_pb2
from entrepot.platform.v1 import types_pb2
from entrepot_client._services import OrderClient
from entrepot_client.errors import UnavailableError

__all__ = ["build_intent", "money", "watch_order_events"]


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
