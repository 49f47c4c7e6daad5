"""Refund requests: submit, decide, retry, read; and the steps the workflow runs.

State machine (every change is one conditional UPDATE on `state`, so two
deciders, two retries or a retry racing a decision have exactly one effect):

    pending_approval --approve--> executing --all tenders--> completed
                     \\--deny----> denied     \\--fault-----> faulted --retry--> executing

Exactly-once side effects: money moves only through the gateway with the
key fixed per (refund, tender); everything in our database that a step does
(tender marked refunded, order counters, history entries, restock) happens in
one transaction guarded by a conditional UPDATE or a step marker row
(refunds.refund_steps), so a retried or replayed activity changes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import domain.inventory as inventory
import domain.order as orders
from domain.refund.rules import TenderRoom, idempotency_key, split_over_tenders, workflow_id
from domain.shared.caller import Caller, ChannelRef
from domain.shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PreconditionViolation,
    Violations,
)
from domain.shared.money import Money
from domain.shared.outbox import Event, emit
from domain.shared.pagination import decode_token, encode_token, page_size

PENDING_APPROVAL = "pending_approval"
DENIED = "denied"
EXECUTING = "executing"
COMPLETED = "completed"
FAULTED = "faulted"
STATES = (PENDING_APPROVAL, DENIED, EXECUTING, COMPLETED, FAULTED)
# States whose unrefunded tenders and unrecorded lines still hold refundable room.
OPEN_STATES = (PENDING_APPROVAL, EXECUTING, FAULTED)

MAX_REASON = 500
MAX_LINES = 500
# History entries are written by the refund module under its own namespace.
REFUND_WRITER = Caller(subject="system:refunds", status_namespaces=frozenset({"refund"}))

TOPIC_SUBMITTED = "refund.submitted"
TOPIC_APPROVED = "refund.approved"
TOPIC_DENIED = "refund.denied"
TOPIC_TENDER_REFUNDED = "refund.tender_refunded"
TOPIC_COMPLETED = "refund.completed"
TOPIC_FAULTED = "refund.faulted"
TOPIC_RETRIED = "refund.retried"


@dataclass(frozen=True)
class LineInput:
    line_id: str
    quantity: int


@dataclass(frozen=True)
class RefundLine:
    line_id: str
    sku: str
    quantity: int
    amount_minor: int


@dataclass(frozen=True)
class RefundTender:
    tender_id: str
    seq: int
    method: str
    gateway_reference: str
    amount_minor: int
    state: str
    idempotency_key: str
    gateway_refund_id: str
    attempts: int
    refunded_at: datetime | None


@dataclass(frozen=True)
class Refund:
    id: str
    order_id: str
    channel: str
    customer_ref: str
    state: str
    currency: str
    amount_minor: int
    reason: str
    restock: bool
    restock_warehouse_code: str
    lines: tuple[RefundLine, ...]
    tenders: tuple[RefundTender, ...]
    requested_by: str
    decided_by: str
    decision_note: str
    execution_attempt: int
    fault_message: str
    created_at: datetime
    decided_at: datetime | None
    completed_at: datetime | None

    @property
    def amount(self) -> Money:
        return Money(self.currency, self.amount_minor)

    @property
    def workflow_id(self) -> str:
        return workflow_id(self.id, self.execution_attempt) if self.execution_attempt else ""


@dataclass(frozen=True)
class WorkflowFault:
    id: int
    channel: str
    workflow_id: str
    subject_type: str
    subject_id: str
    step: str
    error_type: str
    message: str
    created_at: datetime
    resolved_at: datetime | None


# ---------------------------------------------------------------- reads


def _parse_id(refund_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(refund_id)
    except (ValueError, AttributeError, TypeError) as exc:
        raise _not_found(refund_id) from exc


def _not_found(refund_id: str) -> NotFound:
    return NotFound(
        "REFUND_NOT_FOUND", f"refund {refund_id!r} does not exist", metadata={"refund_id": refund_id}
    )


_COLUMNS = """
    id, order_id, channel, customer_ref, state, currency, amount_minor, reason, restock,
    restock_warehouse_code, requested_by, decided_by, decision_note, execution_attempt,
    fault_message, created_at, decided_at, completed_at
"""


async def _load_many(session: AsyncSession, rows: Sequence[Any]) -> list[Refund]:
    ids = [r.id for r in rows]
    if not ids:
        return []
    lines: dict[uuid.UUID, list[RefundLine]] = {i: [] for i in ids}
    for r in await session.execute(
        text(
            "SELECT refund_id, line_id, sku, quantity, amount_minor FROM refunds.refund_lines "
            "WHERE refund_id = ANY(:ids) ORDER BY refund_id, line_id"
        ),
        {"ids": ids},
    ):
        lines[r.refund_id].append(RefundLine(r.line_id, r.sku, int(r.quantity), int(r.amount_minor)))
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
    return [
        Refund(
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
            lines=tuple(lines[r.id]),
            tenders=tuple(tenders[r.id]),
            requested_by=r.requested_by,
            decided_by=r.decided_by,
            decision_note=r.decision_note,
            execution_attempt=int(r.execution_attempt),
            fault_message=r.fault_message,
            created_at=r.created_at,
            decided_at=r.decided_at,
            completed_at=r.completed_at,
        )
        for r in rows
    ]


async def get_refund(session: AsyncSession, refund_id: str, *, channel: str | None) -> Refund:
    """The refund; `channel=None` only for trusted internal callers (the workflow)."""
    rid = _parse_id(refund_id)
    sql = f"SELECT {_COLUMNS} FROM refunds.refunds WHERE id = :id"
    params: dict[str, Any] = {"id": rid}
    if channel is not None:
        # Another channel's refund is indistinguishable from a missing one.
        sql += " AND channel = :channel"
        params["channel"] = channel
    row = (await session.execute(text(sql), params)).first()
    if row is None:
        raise _not_found(refund_id)
    return (await _load_many(session, [row]))[0]


async def list_refunds(
    session: AsyncSession,
    *,
    channel: str,
    states: Sequence[str] = (),
    order_id: str = "",
    size: int = 0,
    token: str = "",
) -> tuple[list[Refund], str]:
    """Newest first (the inbox), keyset-paginated on (created_at, id)."""
    for s in states:
        if s not in STATES:
            raise InvalidArgument("INVALID_STATE_FILTER", f"unknown state {s!r}")
    n = page_size(size)
    filters = {"channel": channel, "states": sorted(states), "order_id": order_id}
    after = decode_token(token, filters)
    sql = f"SELECT {_COLUMNS} FROM refunds.refunds WHERE channel = :channel"
    params: dict[str, Any] = {"channel": channel, "limit": n + 1}
    if states:
        sql += " AND state = ANY(:states)"
        params["states"] = list(states)
    if order_id:
        sql += " AND order_id = :order_id"
        params["order_id"] = order_id
    if after is not None:
        sql += " AND (created_at, id) < (:after_ts, :after_id)"
        try:
            params["after_ts"], params["after_id"] = datetime.fromisoformat(after[0]), uuid.UUID(after[1])
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise InvalidArgument(
                "INVALID_PAGE_TOKEN", "page_token is not a token this service issued"
            ) from exc
    sql += " ORDER BY created_at DESC, id DESC LIMIT :limit"
    rows = list((await session.execute(text(sql), params)).all())
    more = len(rows) > n
    rows = rows[:n]
    next_token = encode_token([rows[-1].created_at.isoformat(), str(rows[-1].id)], filters) if more else ""
    return await _load_many(session, rows), next_token


async def list_faults(
    session: AsyncSession,
    *,
    channel: str,
    refund_id: str = "",
    include_resolved: bool = False,
    size: int = 0,
    token: str = "",
) -> tuple[list[WorkflowFault], str]:
    n = page_size(size)
    filters = {"channel": channel, "refund_id": refund_id, "resolved": include_resolved}
    after = decode_token(token, filters)
    sql = "SELECT * FROM refunds.workflow_faults WHERE channel = :channel AND subject_type = 'refund'"
    params: dict[str, Any] = {"channel": channel, "limit": n + 1}
    if refund_id:
        sql += " AND subject_id = :rid"
        params["rid"] = refund_id
    if not include_resolved:
        sql += " AND resolved_at IS NULL"
    if after is not None:
        sql += " AND id < :after"
        params["after"] = int(after)
    sql += " ORDER BY id DESC LIMIT :limit"
    rows = list((await session.execute(text(sql), params)).all())
    more = len(rows) > n
    rows = rows[:n]
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
        for r in rows
    ]
    return faults, (encode_token(faults[-1].id, filters) if more else "")


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


# ---------------------------------------------------------------- submit


async def _lock_order(session: AsyncSession, order_id: str) -> None:
    """Serializes refund submissions of one order (the refundable room check and
    the insert must not interleave). A transaction-scoped advisory lock keeps us
    off the order module's tables."""
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": f"refunds:order:{order_id}"}
    )


async def _pending(session: AsyncSession, order_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """Amounts per tender and quantities per line held by open refunds of the order
    (not yet recorded on the order)."""
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
            {"o": order_id, "open": list(OPEN_STATES)},
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
                                  WHERE s.refund_id = r.id AND s.step = 'lines_recorded')
                GROUP BY l.line_id
                """
            ),
            {"o": order_id, "open": list(OPEN_STATES)},
        )
    }
    return tenders, lines


async def submit_refund(
    session: AsyncSession,
    *,
    channel: ChannelRef,
    order_id: str,
    lines: Sequence[LineInput],
    amount: Money | None,
    reason: str,
    restock: bool,
    restock_warehouse_code: str,
    caller: Caller,
) -> Refund:
    v = Violations()
    if not order_id:
        v.add("order_id", "is required")
    if not reason.strip():
        v.add("reason", "is required")
    elif len(reason) > MAX_REASON:
        v.add("reason", f"must be at most {MAX_REASON} characters")
    if len(lines) > MAX_LINES:
        v.add("lines", f"at most {MAX_LINES} lines")
    seen: set[str] = set()
    for i, li in enumerate(lines):
        if not li.line_id:
            v.add(f"lines[{i}].line_id", "is required")
        elif li.line_id in seen:
            v.add(f"lines[{i}].line_id", "appears twice; give each line once")
        seen.add(li.line_id)
        if li.quantity <= 0:
            v.add(f"lines[{i}].quantity", "must be positive")
    if amount is not None:
        if amount.currency != channel.currency:
            v.add("amount.currency_code", f"must be the channel's currency {channel.currency}")
        if amount.amount_minor < 0:
            v.add("amount.amount_minor", "must not be negative")
    if not lines and amount is None:
        v.add("lines", "give lines and quantities, an amount, or both")
    if restock and not lines:
        v.add("restock", "restocking needs lines")
    if restock and not restock_warehouse_code:
        v.add("restock_warehouse_code", "is required when restock is set")
    v.raise_if_any("the refund request is invalid")

    order = await orders.get_order(session, order_id, channel=channel.slug)
    await _lock_order(session, order.id)
    pending_tenders, pending_lines = await _pending(session, order.id)

    by_line = {li.line_id: li for li in order.lines}
    over: list[PreconditionViolation] = []
    refund_lines: list[RefundLine] = []
    for i, li in enumerate(lines):
        ol = by_line.get(li.line_id)
        if ol is None:
            v.add(f"lines[{i}].line_id", f"order {order.id} has no line {li.line_id!r}")
            continue
        room = ol.quantity - ol.refunded_quantity - pending_lines.get(li.line_id, 0)
        if li.quantity > room:
            over.append(
                PreconditionViolation(
                    "REFUND_EXCEEDS_REFUNDABLE",
                    f"orders/{order.id}/lines/{li.line_id}",
                    f"{li.quantity} asked, {max(room, 0)} refundable",
                )
            )
        refund_lines.append(
            RefundLine(li.line_id, ol.sku, li.quantity, ol.unit_price.amount_minor * li.quantity)
        )
    v.raise_if_any("the refund request is invalid")

    total = amount.amount_minor if amount is not None else sum(li.amount_minor for li in refund_lines)
    rooms = [
        TenderRoom(
            p.tender_id,
            p.captured.amount_minor - p.refunded.amount_minor - pending_tenders.get(p.tender_id, 0),
        )
        for p in order.payments
    ]
    split = split_over_tenders(total, rooms)
    if split is None:
        refundable = sum(max(r.refundable_minor, 0) for r in rooms)
        over.append(
            PreconditionViolation(
                "REFUND_EXCEEDS_REFUNDABLE",
                f"orders/{order.id}",
                f"{total} asked, {refundable} refundable over all tenders",
            )
        )
        over.extend(
            PreconditionViolation(
                "TENDER_REFUNDABLE",
                f"orders/{order.id}/payments/{r.tender_id}",
                f"{max(r.refundable_minor, 0)} refundable",
            )
            for r in rooms
        )
    if over:
        raise FailedPrecondition(
            "REFUND_EXCEEDS_REFUNDABLE",
            "the refund exceeds what is refundable",
            metadata={"order_id": order.id},
            precondition_violations=over,
        )
    assert split is not None

    rid = uuid.uuid4()
    await session.execute(
        text(
            """
            INSERT INTO refunds.refunds (id, channel, order_id, customer_ref, order_submitted_at,
                currency, amount_minor, reason, restock, restock_warehouse_code, state, requested_by)
            VALUES (:id, :channel, :order_id, :customer, :submitted, :currency, :amount, :reason,
                :restock, :wh, 'pending_approval', :by)
            """
        ),
        {
            "id": rid,
            "channel": channel.slug,
            "order_id": order.id,
            "customer": order.customer_ref,
            "submitted": order.submitted_at,
            "currency": order.currency,
            "amount": total,
            "reason": reason,
            "restock": restock,
            "wh": restock_warehouse_code if restock else "",
            "by": caller.subject,
        },
    )
    if refund_lines:
        await session.execute(
            text(
                "INSERT INTO refunds.refund_lines (refund_id, line_id, sku, quantity, amount_minor) "
                "VALUES (:r, :l, :s, :q, :a)"
            ),
            [
                {"r": rid, "l": li.line_id, "s": li.sku, "q": li.quantity, "a": li.amount_minor}
                for li in refund_lines
            ],
        )
    payments = {p.tender_id: p for p in order.payments}
    if split:
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
                    "r": rid,
                    "t": tid,
                    "seq": seq,
                    "m": payments[tid].method,
                    "g": payments[tid].gateway_reference,
                    "a": amt,
                    "k": idempotency_key(str(rid), tid),
                }
                for seq, (tid, amt) in enumerate(split)
            ],
        )
    refund = await get_refund(session, str(rid), channel=None)
    await _history(session, refund, "refund:requested", {"amount_minor": total, "reason": reason})
    await _event(session, refund, TOPIC_SUBMITTED, {"amount_minor": total, "requested_by": caller.subject})
    return refund


# ---------------------------------------------------------------- decide / retry


async def _transition(
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
        {"id": _parse_id(refund_id), "frm": list(frm), "channel": channel, **params},
    )
    return result.first() is not None


async def decide_refund(
    session: AsyncSession, refund_id: str, *, channel: str, approve: bool, note: str, caller: Caller
) -> Refund:
    """Approve or deny once. Approval of a zero-amount refund completes it at once;
    otherwise the refund is EXECUTING and the caller starts its workflow after commit."""
    v = Violations()
    if len(note) > MAX_REASON:
        v.add("note", f"must be at most {MAX_REASON} characters")
    if not approve and not note.strip():
        v.add("note", "a denial needs a note")
    v.raise_if_any("the decision is invalid")
    current = await get_refund(session, refund_id, channel=channel)
    if approve and current.requested_by == caller.subject:
        # Four eyes: checked before the state, so the answer never depends on timing.
        raise PermissionDenied(
            "SELF_APPROVAL_FORBIDDEN",
            "the requester of a refund may not approve it",
            metadata={"refund_id": refund_id},
        )
    if approve:
        changed = await _transition(
            session,
            refund_id,
            channel,
            [PENDING_APPROVAL],
            "state = 'executing', execution_attempt = 1, decided_by = :by, decision_note = :note, "
            "decided_at = now()",
            by=caller.subject,
            note=note,
        )
    else:
        changed = await _transition(
            session,
            refund_id,
            channel,
            [PENDING_APPROVAL],
            "state = 'denied', decided_by = :by, decision_note = :note, decided_at = now()",
            by=caller.subject,
            note=note,
        )
    if not changed:
        now = await get_refund(session, refund_id, channel=channel)
        raise FailedPrecondition(
            "REFUND_ALREADY_DECIDED",
            f"refund {refund_id} is {now.state}, not pending approval",
            metadata={"refund_id": refund_id, "state": now.state},
        )
    refund = await get_refund(session, refund_id, channel=channel)
    code, topic = ("refund:approved", TOPIC_APPROVED) if approve else ("refund:denied", TOPIC_DENIED)
    await _history(session, refund, code, {"decided_by": caller.subject, "note": note})
    await _event(session, refund, topic, {"decided_by": caller.subject})
    if approve and not refund.tenders:
        # Nothing to pay back: no gateway, no workflow; finish in this transaction.
        await finish_refund(session, refund.id)
        refund = await get_refund(session, refund_id, channel=channel)
    return refund


async def retry_refund(session: AsyncSession, refund_id: str, *, channel: str, caller: Caller) -> Refund:
    """FAULTED -> EXECUTING with the next execution attempt; the caller starts the
    workflow after commit. The new run skips tenders already refunded."""
    changed = await _transition(
        session,
        refund_id,
        channel,
        [FAULTED],
        "state = 'executing', execution_attempt = execution_attempt + 1, fault_message = ''",
    )
    if not changed:
        now = await get_refund(session, refund_id, channel=channel)
        raise FailedPrecondition(
            "REFUND_NOT_FAULTED",
            f"refund {refund_id} is {now.state}; only a faulted refund can be retried",
            metadata={"refund_id": refund_id, "state": now.state},
        )
    await session.execute(
        text(
            "UPDATE refunds.workflow_faults SET resolved_at = now() "
            "WHERE subject_type = 'refund' AND subject_id = :id AND resolved_at IS NULL"
        ),
        {"id": refund_id},
    )
    refund = await get_refund(session, refund_id, channel=channel)
    await _history(
        session, refund, "refund:retried", {"by": caller.subject, "attempt": refund.execution_attempt}
    )
    await _event(session, refund, TOPIC_RETRIED, {"by": caller.subject, "attempt": refund.execution_attempt})
    return refund


# ---------------------------------------------------------------- execution steps (activities)


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
    row = (
        await session.execute(
            text(
                """
                UPDATE refunds.refund_tenders SET attempts = attempts + 1
                WHERE refund_id = :r AND tender_id = :t AND state = 'pending'
                RETURNING tender_id
                """
            ),
            {"r": _parse_id(refund_id), "t": tender_id},
        )
    ).first()
    if row is None:
        return None
    refund = await get_refund(session, refund_id, channel=None)
    return refund, next(t for t in refund.tenders if t.tender_id == tender_id)


async def mark_tender_refunded(
    session: AsyncSession, refund_id: str, tender_id: str, gateway_refund_id: str
) -> bool:
    """Records a gateway refund on our side once: the tender, the order's refunded
    amount, the history entry and the event. False when it was already recorded."""
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
            {"r": _parse_id(refund_id), "t": tender_id, "g": gateway_refund_id},
        )
    ).first()
    if row is None:
        return False
    amount = int(row[0])
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
    await _history(session, refund, "refund:tender_refunded", payload)
    await _event(session, refund, TOPIC_TENDER_REFUNDED, payload)
    return True


async def _step_once(session: AsyncSession, refund_id: str, step: str) -> bool:
    """True the first time `step` is claimed for the refund (in this transaction)."""
    row = (
        await session.execute(
            text(
                "INSERT INTO refunds.refund_steps (refund_id, step) VALUES (:r, :s) "
                "ON CONFLICT DO NOTHING RETURNING step"
            ),
            {"r": _parse_id(refund_id), "s": step},
        )
    ).first()
    return row is not None


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
    if refund.lines and await _step_once(session, refund.id, "lines_recorded"):
        await orders.record_refund(
            session,
            refund.order_id,
            f"{refund.id}:lines",
            {li.line_id: li.quantity for li in refund.lines},
            {},
            actor=REFUND_WRITER.subject,
        )
    if refund.restock and await _step_once(session, refund.id, "restocked"):
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
        await _history(
            session,
            refund,
            "refund:restocked",
            {
                "warehouse_code": refund.restock_warehouse_code,
                "lines": {li.sku: li.quantity for li in refund.lines},
            },
        )
    if not await _transition(
        session, refund.id, None, [EXECUTING], "state = 'completed', completed_at = now()"
    ):
        # Lost a race with another run of the same step: that run completed it.
        return await get_refund(session, refund_id, channel=None)
    done = await get_refund(session, refund_id, channel=None)
    await _history(session, done, "refund:completed", {"amount_minor": done.amount_minor})
    await _event(session, done, TOPIC_COMPLETED, {"amount_minor": done.amount_minor})
    return done


async def record_fault(
    session: AsyncSession, refund_id: str, attempt: int, *, step: str, error_type: str, message: str
) -> bool:
    """EXECUTING (this attempt) -> FAULTED with a workflow_faults row and an event.
    False when the refund was no longer executing this attempt (nothing written)."""
    message = message[:2000]
    if not await _transition(
        session,
        refund_id,
        None,
        [EXECUTING],
        "state = 'faulted', fault_message = :msg",
        where="AND execution_attempt = :attempt",
        msg=message,
        attempt=attempt,
    ):
        return False
    refund = await get_refund(session, refund_id, channel=None)
    wf = workflow_id(refund.id, attempt)
    await session.execute(
        text(
            """
            INSERT INTO refunds.workflow_faults (channel, workflow_id, subject_type, subject_id, step,
                error_type, message)
            VALUES (:c, :w, 'refund', :s, :step, :et, :m)
            """
        ),
        {"c": refund.channel, "w": wf, "s": refund.id, "step": step, "et": error_type, "m": message},
    )
    payload = {"workflow_id": wf, "step": step, "error_type": error_type, "message": message}
    await _history(session, refund, "refund:faulted", payload, severity=orders.Severity.WARNING)
    await _event(session, refund, TOPIC_FAULTED, payload)
    return True


async def executions_to_reconcile(
    session: AsyncSession, older_than_seconds: float, limit: int = 100
) -> list[tuple[str, int]]:
    """EXECUTING refunds untouched for a while: (refund id, attempt) whose workflow
    start the reconciler re-issues (a no-op when the workflow exists)."""
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


# ---------------------------------------------------------------- helpers


async def _history(
    session: AsyncSession,
    refund: Refund,
    code: str,
    payload: dict[str, Any],
    *,
    severity: orders.Severity = orders.Severity.INFO,
) -> None:
    await orders.append_status(
        session,
        refund.order_id,
        orders.StatusIn(
            code=code, severity=severity, category="refund", payload={"refund_id": refund.id, **payload}
        ),
        channel=refund.channel,
        caller=REFUND_WRITER,
    )


async def _event(session: AsyncSession, refund: Refund, topic: str, payload: dict[str, Any]) -> None:
    await emit(
        session,
        Event(
            topic=topic,
            aggregate_type="refund",
            aggregate_id=refund.id,
            channel=refund.channel,
            payload={"order_id": refund.order_id, "state": refund.state, **payload},
        ),
    )
