"""Helpers for refund tests: orders with tenders (through the order module's
public interface, until OrderService is served), stock, waiting for workflows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import domain.inventory as inventory
import domain.order as orders
from domain.shared.caller import ChannelRef
from domain.shared.money import Money
from domain.shared.uow import UnitOfWork
from entrepot.refund.v1 import refund_pb2
from entrepot_client import Entrepot
from entrepot_client.refund import wait_for_refund
from tests.conftest import unique

CHANNEL = ChannelRef(slug="test", currency="EUR", timezone="Europe/Paris")
R = refund_pb2.Refund


def eur(amount: int) -> Money:
    return Money("EUR", amount)


async def make_order(
    sessions: async_sessionmaker[AsyncSession],
    lines: Sequence[tuple[str, str, int, int]],
    payments: Sequence[tuple[str, str, int, str]],
    customer: str = "",
) -> str:
    """lines: (line_id, sku, quantity, unit price); payments: (tender_id, method, captured,
    gateway reference), in capture order."""
    subtotal = sum(q * p for _, _, q, p in lines)
    intent = orders.Intent(
        intent_id=unique("intent"),
        source_system="refund-tests",
        lines=tuple(orders.LineIn(lid, sku, q, eur(p)) for lid, sku, q, p in lines),
        totals=orders.TotalsIn(eur(subtotal), eur(0), eur(0), eur(0), eur(subtotal)),
        payments=tuple(orders.PaymentIn(t, m, eur(a), ref) for t, m, a, ref in payments),
        customer_ref=customer or unique("cust"),
    )
    async with UnitOfWork(sessions) as uow:
        result = await orders.submit_intent(uow.session, intent, channel=CHANNEL, actor="tests")
        await uow.commit()
    return result.order.id


async def make_stock(sessions: async_sessionmaker[AsyncSession], skus: Sequence[str], on_hand: int) -> str:
    code = unique("WH").upper().replace("-", "_")
    async with UnitOfWork(sessions) as uow:
        await inventory.create_warehouse(
            uow.session, code=code, name="Refund returns", address={}, contact={}
        )
        for sku in skus:
            await inventory.upsert_item(uow.session, sku=sku)
            await inventory.adjust_stock(
                uow.session, sku=sku, warehouse_code=code, delta=on_hand, reason="seed"
            )
        await uow.commit()
    return code


async def on_hand(sessions: async_sessionmaker[AsyncSession], sku: str, warehouse: str) -> int:
    async with sessions() as s, s.begin():
        return (await inventory.get_stock_level(s, sku, warehouse)).on_hand


async def get_order(sessions: async_sessionmaker[AsyncSession], order_id: str) -> orders.Order:
    async with sessions() as s, s.begin():
        return await orders.get_order(s, order_id, channel=None)


async def history_codes(sessions: async_sessionmaker[AsyncSession], order_id: str) -> list[str]:
    async with sessions() as s, s.begin():
        entries, _ = await orders.list_status_history(s, order_id, channel="test")
    return [e.code for e in entries]


async def wait_state(
    ep: Entrepot,
    refund_id: str,
    states: Sequence[int] = (R.STATE_COMPLETED, R.STATE_FAULTED),
    timeout: float = 60,
) -> refund_pb2.Refund:
    if set(states) == {R.STATE_COMPLETED, R.STATE_FAULTED}:
        # The client helper users get (it also stops at DENIED, which these callers never reach).
        return await wait_for_refund(ep.refund, refund_id, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        r = await ep.refund.get_refund(refund_pb2.GetRefundRequest(refund_id=refund_id))
        if r.state in states:
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"refund {refund_id} stayed {R.State.Name(r.state)}")
        await asyncio.sleep(0.2)
