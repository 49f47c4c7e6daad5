"""Refunds recorded on orders, for the refund module: refunded quantities per
line and amounts per tender, each refund once."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.models import OrderRow
from domain.order.rules import Refundable, check_refundable, content_hash, validate_refund
from domain.order.store import entries, orders, refunds
from domain.order.types import RefundRecord
from domain.shared.errors import AlreadyExists


async def record_refund(
    session: AsyncSession,
    order_id: str,
    refund_id: str,
    lines: Mapping[str, int],
    amounts: Mapping[str, int],
    *,
    actor: str,
    channel: str | None = None,
) -> RefundRecord:
    """Records refunded quantities per line and refunded amounts per tender.

    Idempotent per (order, refund_id): recording the same refund again
    returns the first record and changes nothing; other content under the
    same id is ALREADY_EXISTS (REFUND_CONFLICT). Never lets a line's refunded
    quantity exceed its ordered quantity, nor a tender's refunded amount
    exceed what it captured (FAILED_PRECONDITION, REFUND_EXCEEDS_REFUNDABLE).
    """
    validate_refund(refund_id, lines, amounts)
    row = await orders.order_row(session, order_id, channel, lock=True)
    body = {"lines": dict(sorted(lines.items())), "amounts": dict(sorted(amounts.items()))}
    digest = content_hash(body)
    recorded = await refunds.recorded_refund(session, row.id, refund_id, order_ref=order_id)
    if recorded is not None:
        record, recorded_digest = recorded
        if recorded_digest != digest:
            raise AlreadyExists(
                "REFUND_CONFLICT",
                f"refund {refund_id} was already recorded with other lines or amounts",
                metadata={"order_id": order_id, "refund_id": refund_id},
            )
        return record
    # Checked before anything is written (the order lock keeps the counters
    # still), so a refused refund leaves no trace even if the caller goes on.
    await _check_refundable(session, row, order_id, refund_id, lines, amounts)
    for line_id, quantity in sorted(lines.items()):
        await refunds.add_refunded_quantity(session, row.id, line_id, quantity)
    for tender_id, amount in sorted(amounts.items()):
        await refunds.add_refunded_amount(session, row.id, tender_id, amount)
    record = await refunds.insert_refund(
        session,
        row.id,
        refund_id,
        digest=digest,
        lines=body["lines"],
        amounts=body["amounts"],
        recorded_by=actor,
        order_ref=order_id,
    )
    spec = entries.EntrySpec(
        "order:refund_recorded", actor, category="refund", payload={"refund_id": refund_id, **body}
    )
    await entries.append_entry(session, row, spec)
    return record


async def _check_refundable(
    session: AsyncSession,
    row: OrderRow,
    order_id: str,
    refund_id: str,
    lines: Mapping[str, int],
    amounts: Mapping[str, int],
) -> None:
    """REFUND_EXCEEDS_REFUNDABLE unless every line and tender has that much left to refund."""
    check_refundable(
        order_id,
        refund_id,
        lines,
        amounts,
        line_counts={
            li.line_id: Refundable(li.quantity, li.refunded_quantity)
            for li in await orders.order_lines(session, row.id)
        },
        tender_amounts={
            p.tender_id: Refundable(p.captured_minor, p.refunded_minor)
            for p in await orders.payments(session, row.id)
        },
    )


async def list_refunds(
    session: AsyncSession, order_id: str, *, channel: str | None = None
) -> list[RefundRecord]:
    row = await orders.order_row(session, order_id, channel)
    return await refunds.refunds_of(session, row.id, order_ref=order_id)
