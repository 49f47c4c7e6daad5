"""Every statement of the refund module on its schema (`refunds`).

Functions take the caller's AsyncSession and never commit. Reads return the
module's types (rules.py). State changes are conditional UPDATEs on the state
they leave and say whether they happened, so two deciders, two retries or a
retry racing a decision have exactly one effect.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.platform.idempotency import StepMarkers, once
from domain.refund.rules import (
    EXECUTING,
    FAULTED,
    OPEN_STATES,
    PENDING_APPROVAL,
    Held,
    Refund,
    RefundLine,
    RefundTender,
    WorkflowFault,
    refund_not_found,
)

# Effects of the execution done once per refund (lines recorded on the order, restock).
REFUND_STEPS = StepMarkers("refunds.refund_steps", ("refund_id", "step"))
LINES_RECORDED = "lines_recorded"
RESTOCKED = "restocked"


def refund_uuid(refund_id: str) -> uuid.UUID:
    """The refund's key; an id that is no UUID names no refund."""
    try:
        return uuid.UUID(refund_id)
    except (ValueError, AttributeError, TypeError) as exc:
        raise refund_not_found(refund_id) from exc


# ---------------------------------------------------------------- reading refunds

_REFUND_COLUMNS = """
    id, order_id, channel, customer_ref, state, currency, amount_minor, reason, restock,
    restock_warehouse_code, requested_by, decided_by, decision_note, execution_attempt,
    fault_message, created_at, decided_at, completed_at
"""


async def get_refund(session: AsyncSession, refund_id: str, *, channel: str | None) -> Refund:
    """The refund, or REFUND_NOT_FOUND; `channel=None` only for trusted internal
    callers (the workflow). Another channel's refund is indistinguishable from a
    missing one."""
    sql = f"SELECT {_REFUND_COLUMNS} FROM refunds.refunds WHERE id = :id"
    params: dict[str, Any] = {"id": refund_uuid(refund_id)}
    if channel is not None:
        sql += " AND channel = :channel"
        params["channel"] = channel
    row = (await session.execute(text(sql), params)).first()
    if row is None:
        raise refund_not_found(refund_id)
    return (await _with_lines_and_tenders(session, [row]))[0]


async def newest_refunds(
    session: AsyncSession,
    *,
    channel: str,
    states: Sequence[str],
    order_id: str,
    before: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> tuple[list[Refund], bool]:
    """Up to `limit` of a channel's refunds, newest first, created before `before`
    (created_at, id); and whether more follow."""
    sql = f"SELECT {_REFUND_COLUMNS} FROM refunds.refunds WHERE channel = :channel"
    params: dict[str, Any] = {"channel": channel, "limit": limit + 1}
    if states:
        sql += " AND state = ANY(:states)"
        params["states"] = list(states)
    if order_id:
        sql += " AND order_id = :order_id"
        params["order_id"] = order_id
    if before is not None:
        sql += " AND (created_at, id) < (:after_ts, :after_id)"
        params["after_ts"], params["after_id"] = before
    sql += " ORDER BY created_at DESC, id DESC LIMIT :limit"
    rows = list((await session.execute(text(sql), params)).all())
    return await _with_lines_and_tenders(session, rows[:limit]), len(rows) > limit


async def _with_lines_and_tenders(session: AsyncSession, rows: Sequence[Any]) -> list[Refund]:
    ids = [r.id for r in rows]
    if not ids:
        return []
    lines = await _lines_of(session, ids)
    tenders = await _tenders_of(session, ids)
    return [_refund(r, lines[r.id], tenders[r.id]) for r in rows]


async def _lines_of(session: AsyncSession, ids: list[uuid.UUID]) -> dict[uuid.UUID, list[RefundLine]]:
    lines: dict[uuid.UUID, list[RefundLine]] = {i: [] for i in ids}
    for r in await session.execute(
        text(
            "SELECT refund_id, line_id, sku, quantity, amount_minor FROM refunds.refund_lines "
            "WHERE refund_id = ANY(:ids) ORDER BY refund_id, line_id"
        ),
        {"ids": ids},
    ):
        lines[r.refund_id].append(RefundLine(r.line_id, r.sku, int(r.quantity), int(r.amount_minor)))
    return lines


async def _tenders_of(session: AsyncSession, ids: list[uuid.UUID]) -> dict[uuid.UUID, list[RefundTender]]:
    tenders: dict[uuid.UUID, list[RefundTender]] = {i: [] for i in ids}
    for t in await session.execute(
        text(
            """
            SELECT refund_id, tender_id, seq, method, gateway_reference, amount_minor, state,
                   idempotency_key, gateway_refund_id, attempts, refunded_at
            FROM refunds.refund_tenders WHERE refund_id = ANY(:ids) ORDER BY refund_id, seq
            """
        ),
        {"ids": ids},
    ):
        tenders[t.refund_id].append(
            RefundTender(
                t.tender_id,
                t.seq,
                t.method,
                t.gateway_reference,
                int(t.amount_minor),
                t.state,
                t.idempotency_key,
                t.gateway_refund_id,
                int(t.attempts),
                t.refunded_at,
            )
        )
    return tenders


def _refund(r: Any, lines: list[RefundLine], tenders: list[RefundTender]) -> Refund:
    return Refund(
        id=str(r.id),
        order_id=r.order_id,
        channel=r.channel,
        customer_ref=r.customer_ref,
        state=r.state,
        currency=r.currency,
        amount_minor=int(r.amount_minor),
        reason=r.reason,
        restock=r.restock,
        restock_warehouse_code=r.restock_warehouse_code,
        lines=tuple(lines),
        tenders=tuple(tenders),
        requested_by=r.requested_by,
        decided_by=r.decided_by,
        decision_note=r.decision_note,
        execution_attempt=int(r.execution_attempt),
        fault_message=r.fault_message,
        created_at=r.created_at,
        decided_at=r.decided_at,
        completed_at=r.completed_at,
    )


async def refunded_quantity(
    session: AsyncSession, *, channel: str, customer_ref: str, sku: str, since: datetime
) -> int:
    """Units of `sku` refunded (completed refunds) to `customer_ref` in `channel` on
    orders submitted at or after `since`: what purchase limits credit back."""
    value = (
        await session.execute(
            text(
                """
                SELECT coalesce(sum(l.quantity), 0)
                FROM refunds.refund_lines l JOIN refunds.refunds r ON r.id = l.refund_id
                WHERE r.channel = :channel AND r.customer_ref = :customer AND l.sku = :sku
                  AND r.state = 'completed' AND r.order_submitted_at >= :since
                """
            ),
            {"channel": channel, "customer": customer_ref, "sku": sku, "since": since},
        )
    ).scalar_one()
    return int(value)


async def stale_executions(
    session: AsyncSession, older_than_seconds: float, limit: int
) -> list[tuple[str, int]]:
    """EXECUTING refunds untouched for a while: (refund id, execution attempt)."""
    rows = await session.execute(
        text(
            """
            SELECT id, execution_attempt FROM refunds.refunds
            WHERE state = 'executing' AND updated_at < now() - make_interval(secs => :secs)
            ORDER BY updated_at LIMIT :limit
            """
        ),
        {"secs": older_than_seconds, "limit": limit},
    )
    return [(str(r[0]), int(r[1])) for r in rows.all()]


# ---------------------------------------------------------------- submitting


async def lock_order_refunds(session: AsyncSession, order_id: str) -> None:
    """Serializes refund submissions of one order (the refundable room check and
    the insert must not interleave). A transaction-scoped advisory lock keeps us
    off the order module's tables."""
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": f"refunds:order:{order_id}"}
    )


async def held_by_open_refunds(session: AsyncSession, order_id: str) -> Held:
    """Amounts per tender and quantities per line held by open refunds of the order
    (not yet recorded on the order)."""
    params = {"o": order_id, "open": list(OPEN_STATES)}
    tenders = {
        r.tender_id: int(r.total)
        for r in await session.execute(
            text(
                """
                SELECT t.tender_id, sum(t.amount_minor) AS total
                FROM refunds.refund_tenders t JOIN refunds.refunds r ON r.id = t.refund_id
                WHERE r.order_id = :o AND r.state = ANY(:open) AND t.state = 'pending'
                GROUP BY t.tender_id
                """
            ),
            params,
        )
    }
    lines = {
        r.line_id: int(r.total)
        for r in await session.execute(
            text(
                """
                SELECT l.line_id, sum(l.quantity) AS total
                FROM refunds.refund_lines l JOIN refunds.refunds r ON r.id = l.refund_id
                WHERE r.order_id = :o AND r.state = ANY(:open)
                  AND NOT EXISTS (SELECT 1 FROM refunds.refund_steps s
                                  WHERE s.refund_id = r.id AND s.step = :lines_recorded)
                GROUP BY l.line_id
                """
            ),
            {**params, "lines_recorded": LINES_RECORDED},
        )
    }
    return Held(tenders, lines)


async def insert_refund(session: AsyncSession, refund_id: uuid.UUID, **values: Any) -> None:
    """A new refund, pending approval. `values`: channel, order_id, customer_ref,
    order_submitted_at, currency, amount_minor, reason, restock,
    restock_warehouse_code, requested_by."""
    await session.execute(
        text(
            """
            INSERT INTO refunds.refunds (id, channel, order_id, customer_ref, order_submitted_at,
                currency, amount_minor, reason, restock, restock_warehouse_code, state, requested_by)
            VALUES (:id, :channel, :order_id, :customer_ref, :order_submitted_at, :currency,
                :amount_minor, :reason, :restock, :restock_warehouse_code, 'pending_approval', :requested_by)
            """
        ),
        {"id": refund_id, **values},
    )


async def insert_lines(session: AsyncSession, refund_id: uuid.UUID, lines: Sequence[RefundLine]) -> None:
    if not lines:
        return
    await session.execute(
        text(
            "INSERT INTO refunds.refund_lines (refund_id, line_id, sku, quantity, amount_minor) "
            "VALUES (:r, :l, :s, :q, :a)"
        ),
        [
            {"r": refund_id, "l": li.line_id, "s": li.sku, "q": li.quantity, "a": li.amount_minor}
            for li in lines
        ],
    )


async def insert_tenders(
    session: AsyncSession, refund_id: uuid.UUID, tenders: Sequence[RefundTender]
) -> None:
    """The tenders to pay back, pending, each with its gateway idempotency key."""
    if not tenders:
        return
    await session.execute(
        text(
            """
            INSERT INTO refunds.refund_tenders (refund_id, tender_id, seq, method, gateway_reference,
                amount_minor, state, idempotency_key)
            VALUES (:r, :t, :seq, :m, :g, :a, 'pending', :k)
            """
        ),
        [
            {
                "r": refund_id,
                "t": t.tender_id,
                "seq": t.seq,
                "m": t.method,
                "g": t.gateway_reference,
                "a": t.amount_minor,
                "k": t.idempotency_key,
            }
            for t in tenders
        ],
    )


# ---------------------------------------------------------------- state changes


async def _move(
    session: AsyncSession,
    refund_id: str,
    channel: str | None,
    frm: Sequence[str],
    sets: str,
    *,
    where: str = "",
    **params: Any,
) -> bool:
    result = await session.execute(
        text(
            f"UPDATE refunds.refunds SET {sets}, updated_at = now() "
            "WHERE id = :id AND state = ANY(:frm) AND (CAST(:channel AS text) IS NULL OR channel = :channel) "
            f"{where} RETURNING id"
        ),
        {"id": refund_uuid(refund_id), "frm": list(frm), "channel": channel, **params},
    )
    return result.first() is not None


async def approve(session: AsyncSession, refund_id: str, channel: str, *, by: str, note: str) -> bool:
    """PENDING_APPROVAL -> EXECUTING, first execution attempt."""
    return await _move(
        session,
        refund_id,
        channel,
        [PENDING_APPROVAL],
        "state = 'executing', execution_attempt = 1, decided_by = :by, decision_note = :note, "
        "decided_at = now()",
        by=by,
        note=note,
    )


async def deny(session: AsyncSession, refund_id: str, channel: str, *, by: str, note: str) -> bool:
    """PENDING_APPROVAL -> DENIED."""
    return await _move(
        session,
        refund_id,
        channel,
        [PENDING_APPROVAL],
        "state = 'denied', decided_by = :by, decision_note = :note, decided_at = now()",
        by=by,
        note=note,
    )


async def execute_again(session: AsyncSession, refund_id: str, channel: str) -> bool:
    """FAULTED -> EXECUTING with the next execution attempt."""
    return await _move(
        session,
        refund_id,
        channel,
        [FAULTED],
        "state = 'executing', execution_attempt = execution_attempt + 1, fault_message = ''",
    )


async def complete(session: AsyncSession, refund_id: str) -> bool:
    """EXECUTING -> COMPLETED."""
    return await _move(session, refund_id, None, [EXECUTING], "state = 'completed', completed_at = now()")


async def fault(session: AsyncSession, refund_id: str, attempt: int, message: str) -> bool:
    """EXECUTING (execution `attempt`) -> FAULTED."""
    return await _move(
        session,
        refund_id,
        None,
        [EXECUTING],
        "state = 'faulted', fault_message = :msg",
        where="AND execution_attempt = :attempt",
        msg=message,
        attempt=attempt,
    )


# ---------------------------------------------------------------- execution steps


async def count_tender_attempt(session: AsyncSession, refund_id: str, tender_id: str) -> bool:
    """One more gateway attempt on a pending tender; False when it is already refunded."""
    row = (
        await session.execute(
            text(
                """
                UPDATE refunds.refund_tenders SET attempts = attempts + 1
                WHERE refund_id = :r AND tender_id = :t AND state = 'pending'
                RETURNING tender_id
                """
            ),
            {"r": refund_uuid(refund_id), "t": tender_id},
        )
    ).first()
    return row is not None


async def mark_tender_succeeded(
    session: AsyncSession, refund_id: str, tender_id: str, gateway_refund_id: str
) -> int | None:
    """Pending -> succeeded with the gateway's refund id; the tender's amount, or
    None when it was already succeeded."""
    row = (
        await session.execute(
            text(
                """
                UPDATE refunds.refund_tenders
                SET state = 'succeeded', gateway_refund_id = :g, refunded_at = now()
                WHERE refund_id = :r AND tender_id = :t AND state = 'pending'
                RETURNING amount_minor
                """
            ),
            {"r": refund_uuid(refund_id), "t": tender_id, "g": gateway_refund_id},
        )
    ).first()
    return None if row is None else int(row[0])


async def first_time(session: AsyncSession, refund_id: str, step: str) -> bool:
    """True the first time `step` is done for the refund (in this transaction)."""
    return await once(session, REFUND_STEPS, refund_uuid(refund_id), step)


# ---------------------------------------------------------------- workflow faults


async def insert_fault(
    session: AsyncSession, refund: Refund, workflow_id: str, *, step: str, error_type: str, message: str
) -> None:
    await session.execute(
        text(
            """
            INSERT INTO refunds.workflow_faults (channel, workflow_id, subject_type, subject_id, step,
                error_type, message)
            VALUES (:c, :w, 'refund', :s, :step, :et, :m)
            """
        ),
        {"c": refund.channel, "w": workflow_id, "s": refund.id, "step": step, "et": error_type, "m": message},
    )


async def resolve_faults(session: AsyncSession, refund_id: str) -> None:
    await session.execute(
        text(
            "UPDATE refunds.workflow_faults SET resolved_at = now() "
            "WHERE subject_type = 'refund' AND subject_id = :id AND resolved_at IS NULL"
        ),
        {"id": refund_id},
    )


async def newest_faults(
    session: AsyncSession,
    *,
    channel: str,
    refund_id: str,
    include_resolved: bool,
    before_id: int | None,
    limit: int,
) -> tuple[list[WorkflowFault], bool]:
    """Up to `limit` of a channel's refund faults, newest first, with ids below
    `before_id`; and whether more follow."""
    sql = "SELECT * FROM refunds.workflow_faults WHERE channel = :channel AND subject_type = 'refund'"
    params: dict[str, Any] = {"channel": channel, "limit": limit + 1}
    if refund_id:
        sql += " AND subject_id = :rid"
        params["rid"] = refund_id
    if not include_resolved:
        sql += " AND resolved_at IS NULL"
    if before_id is not None:
        sql += " AND id < :after"
        params["after"] = before_id
    sql += " ORDER BY id DESC LIMIT :limit"
    rows = (await session.execute(text(sql), params)).all()
    faults = [
        WorkflowFault(
            int(r.id),
            r.channel,
            r.workflow_id,
            r.subject_type,
            r.subject_id,
            r.step,
            r.error_type,
            r.message,
            r.created_at,
            r.resolved_at,
        )
        for r in rows[:limit]
    ]
    return faults, len(rows) > limit
