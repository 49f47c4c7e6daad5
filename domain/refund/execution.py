"""The steps RefundExecutionWorkflow runs (one activity, one transaction each).

Exactly-once side effects: money moves only through the gateway with the key
fixed per (refund, tender); everything in our database that a step does
(tender marked refunded, order counters, history entries, restock) happens in
one transaction guarded by a conditional UPDATE or a step marker
(`idempotency.once` on refunds.refund_steps), so a retried or replayed
activity changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

import domain.inventory as inventory
import domain.order as orders
from domain.refund import store
from domain.refund.events import (
    REFUND_WRITER,
    TOPIC_COMPLETED,
    TOPIC_FAULTED,
    TOPIC_TENDER_REFUNDED,
    append_history,
    emit_event,
)
from domain.refund.rules import COMPLETED, EXECUTING, Refund, RefundTender, workflow_id
from domain.refund.store import get_refund
from domain.shared.errors import FailedPrecondition


@dataclass(frozen=True)
class PlanTender:
    tender_id: str
    amount_minor: int


@dataclass(frozen=True)
class Plan:
    """What an execution still has to do; empty tenders when all were refunded."""

    refund_id: str
    state: str
    attempt: int
    tenders: tuple[PlanTender, ...]


async def execution_plan(session: AsyncSession, refund_id: str) -> Plan:
    refund = await get_refund(session, refund_id, channel=None)
    pending = tuple(PlanTender(t.tender_id, t.amount_minor) for t in refund.tenders if t.state == "pending")
    return Plan(refund.id, refund.state, refund.execution_attempt, pending)


async def begin_tender_attempt(
    session: AsyncSession, refund_id: str, tender_id: str
) -> tuple[Refund, RefundTender] | None:
    """Counts a gateway attempt; None when the tender is already refunded."""
    if not await store.count_tender_attempt(session, refund_id, tender_id):
        return None
    refund = await get_refund(session, refund_id, channel=None)
    return refund, next(t for t in refund.tenders if t.tender_id == tender_id)


async def mark_tender_refunded(
    session: AsyncSession, refund_id: str, tender_id: str, gateway_refund_id: str
) -> bool:
    """Records a gateway refund on our side once: the tender, the order's refunded
    amount, the history entry and the event. False when it was already recorded."""
    amount = await store.mark_tender_succeeded(session, refund_id, tender_id, gateway_refund_id)
    if amount is None:
        return False
    refund = await get_refund(session, refund_id, channel=None)
    await orders.record_refund(
        session,
        refund.order_id,
        f"{refund.id}:{tender_id}",
        {},
        {tender_id: amount},
        actor=REFUND_WRITER.subject,
    )
    payload = {"tender_id": tender_id, "amount_minor": amount, "gateway_refund_id": gateway_refund_id}
    await append_history(session, refund, "refund:tender_refunded", payload)
    await emit_event(session, refund, TOPIC_TENDER_REFUNDED, payload)
    return True


async def finish_refund(session: AsyncSession, refund_id: str) -> Refund:
    """Completes an EXECUTING refund whose tenders are all refunded: records the
    refunded line quantities on the order, returns stock when asked, and moves
    to COMPLETED. Idempotent (a second call finds the refund completed)."""
    refund = await get_refund(session, refund_id, channel=None)
    if refund.state == COMPLETED:
        return refund
    if refund.state != EXECUTING or any(t.state != "succeeded" for t in refund.tenders):
        raise FailedPrecondition(
            "REFUND_NOT_FINISHABLE",
            f"refund {refund_id} is {refund.state} with tenders left to refund",
            metadata={"refund_id": refund_id},
        )
    if refund.lines and await store.first_time(session, refund.id, store.LINES_RECORDED):
        await _record_lines(session, refund)
    if refund.restock and await store.first_time(session, refund.id, store.RESTOCKED):
        await _restock(session, refund)
    if not await store.complete(session, refund.id):
        # Lost a race with another run of the same step: that run completed it.
        return await get_refund(session, refund_id, channel=None)
    done = await get_refund(session, refund_id, channel=None)
    await append_history(session, done, "refund:completed", {"amount_minor": done.amount_minor})
    await emit_event(session, done, TOPIC_COMPLETED, {"amount_minor": done.amount_minor})
    return done


async def _record_lines(session: AsyncSession, refund: Refund) -> None:
    """The refunded quantities on the order's lines."""
    await orders.record_refund(
        session,
        refund.order_id,
        f"{refund.id}:lines",
        {li.line_id: li.quantity for li in refund.lines},
        {},
        actor=REFUND_WRITER.subject,
    )


async def _restock(session: AsyncSession, refund: Refund) -> None:
    """The refunded units back on hand in the refund's warehouse."""
    for li in refund.lines:
        await inventory.return_stock(
            session,
            sku=li.sku,
            warehouse_code=refund.restock_warehouse_code,
            quantity=li.quantity,
            reason="refund",
            reference=f"refund:{refund.id}",
            actor=REFUND_WRITER.subject,
            source="refund",
        )
    await append_history(
        session,
        refund,
        "refund:restocked",
        {
            "warehouse_code": refund.restock_warehouse_code,
            "lines": {li.sku: li.quantity for li in refund.lines},
        },
    )


async def record_fault(
    session: AsyncSession, refund_id: str, attempt: int, *, step: str, error_type: str, message: str
) -> bool:
    """EXECUTING (this attempt) -> FAULTED with a workflow_faults row and an event.
    False when the refund was no longer executing this attempt (nothing written)."""
    message = message[:2000]
    if not await store.fault(session, refund_id, attempt, message):
        return False
    refund = await get_refund(session, refund_id, channel=None)
    wf = workflow_id(refund.id, attempt)
    await store.insert_fault(session, refund, wf, step=step, error_type=error_type, message=message)
    payload = {"workflow_id": wf, "step": step, "error_type": error_type, "message": message}
    await append_history(session, refund, "refund:faulted", payload, severity=orders.Severity.WARNING)
    await emit_event(session, refund, TOPIC_FAULTED, payload)
    return True
