"""Refund records of orders and the refunded counters of lines and payments."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.models import OrderLineRow, PaymentRow, RefundRow
from domain.order.types import RefundRecord
from domain.shared.errors import FailedPrecondition


def _record(order_id: str, row: RefundRow) -> RefundRecord:
    return RefundRecord(order_id, row.refund_id, dict(row.lines), dict(row.amounts), row.created_at)


# Records carry the order id as the caller wrote it (`order_ref`).


async def recorded_refund(
    session: AsyncSession, order_id: uuid.UUID, refund_id: str, *, order_ref: str
) -> tuple[RefundRecord, bytes] | None:
    """The refund recorded under `refund_id` with its content hash, or None."""
    row = await session.get(RefundRow, (order_id, refund_id))
    return None if row is None else (_record(order_ref, row), row.content_hash)


async def add_refunded_quantity(
    session: AsyncSession, order_id: uuid.UUID, line_id: str, quantity: int
) -> None:
    """Adds to a line's refunded quantity; it can never pass the ordered quantity."""
    await _bump(
        session,
        update(OrderLineRow)
        .where(
            OrderLineRow.order_id == order_id,
            OrderLineRow.line_id == line_id,
            OrderLineRow.refunded_quantity + quantity <= OrderLineRow.quantity,
        )
        .values(refunded_quantity=OrderLineRow.refunded_quantity + quantity)
        .returning(OrderLineRow.line_id),
    )


async def add_refunded_amount(
    session: AsyncSession, order_id: uuid.UUID, tender_id: str, amount_minor: int
) -> None:
    """Adds to a tender's refunded amount; it can never pass the captured amount."""
    await _bump(
        session,
        update(PaymentRow)
        .where(
            PaymentRow.order_id == order_id,
            PaymentRow.tender_id == tender_id,
            PaymentRow.refunded_minor + amount_minor <= PaymentRow.captured_minor,
        )
        .values(refunded_minor=PaymentRow.refunded_minor + amount_minor)
        .returning(PaymentRow.tender_id),
    )


async def _bump(session: AsyncSession, stmt: Any) -> None:
    if (
        await session.execute(stmt.execution_options(synchronize_session=False))
    ).scalar_one_or_none() is None:
        # Unreachable while the order row is locked; refuse rather than overshoot.
        raise FailedPrecondition("REFUND_EXCEEDS_REFUNDABLE", "a refund counter changed concurrently")


async def insert_refund(
    session: AsyncSession,
    order_id: uuid.UUID,
    refund_id: str,
    *,
    digest: bytes,
    lines: dict[str, int],
    amounts: dict[str, int],
    recorded_by: str,
    order_ref: str,
) -> RefundRecord:
    created = (
        await session.execute(
            insert(RefundRow)
            .values(order_id=order_id, refund_id=refund_id, content_hash=digest, lines=lines,
                    amounts=amounts, recorded_by=recorded_by)
            .returning(RefundRow.created_at)
        )
    ).scalar_one()  # fmt: skip
    return RefundRecord(order_ref, refund_id, lines, amounts, created)


async def refunds_of(session: AsyncSession, order_id: uuid.UUID, *, order_ref: str) -> list[RefundRecord]:
    """The order's refunds, oldest first."""
    stmt = select(RefundRow).where(RefundRow.order_id == order_id).order_by(RefundRow.created_at)
    return [_record(order_ref, r) for r in (await session.execute(stmt)).scalars()]
