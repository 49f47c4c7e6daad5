"""Refund requests: submit, decide, retry, list.

State machine (every change is one conditional UPDATE on `state`, store.py):

    pending_approval --approve--> executing --all tenders--> completed
                     \\--deny----> denied     \\--fault-----> faulted --retry--> executing

What the workflow then does, step by step, is in execution.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

import domain.order as orders
from domain.refund import store
from domain.refund.events import (
    TOPIC_APPROVED,
    TOPIC_DENIED,
    TOPIC_RETRIED,
    TOPIC_SUBMITTED,
    append_history,
    emit_event,
)
from domain.refund.execution import finish_refund
from domain.refund.rules import (
    STATES,
    LineInput,
    Refund,
    RefundTender,
    WorkflowFault,
    check_decision,
    check_request,
    idempotency_key,
    lines_to_refund,
    refuse_excess,
    split_over_order,
)
from domain.refund.store import get_refund
from domain.shared.caller import Caller, ChannelRef
from domain.shared.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from domain.shared.ids import new_id
from domain.shared.money import Money
from domain.shared.pagination import decode_token, encode_token, page_size

# ---------------------------------------------------------------- reads


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
    before = None
    if after is not None:
        try:
            before = (datetime.fromisoformat(after[0]), uuid.UUID(after[1]))
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise InvalidArgument(
                "INVALID_PAGE_TOKEN", "page_token is not a token this service issued"
            ) from exc
    refunds, more = await store.newest_refunds(
        session, channel=channel, states=states, order_id=order_id, before=before, limit=n
    )
    next_token = encode_token([refunds[-1].created_at.isoformat(), refunds[-1].id], filters) if more else ""
    return refunds, next_token


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
    faults, more = await store.newest_faults(
        session,
        channel=channel,
        refund_id=refund_id,
        include_resolved=include_resolved,
        before_id=None if after is None else int(after),
        limit=n,
    )
    return faults, (encode_token(faults[-1].id, filters) if more else "")


# ---------------------------------------------------------------- submit


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
    """A refund request, pending approval, within what the order still allows
    (captured - refunded - held by other open refunds, per tender and per line)."""
    check_request(
        currency=channel.currency,
        order_id=order_id,
        lines=lines,
        amount=amount,
        reason=reason,
        restock=restock,
        restock_warehouse_code=restock_warehouse_code,
    ).raise_if_any("the refund request is invalid")
    order = await orders.get_order(session, order_id, channel=channel.slug)
    await store.lock_order_refunds(session, order.id)
    held = await store.held_by_open_refunds(session, order.id)

    refund_lines, over = lines_to_refund(order, lines, held)
    total = amount.amount_minor if amount is not None else sum(li.amount_minor for li in refund_lines)
    split, over_tenders = split_over_order(order, total, held)
    refuse_excess(order.id, [*over, *over_tenders])
    assert split is not None

    rid = new_id()
    await store.insert_refund(
        session,
        rid,
        channel=channel.slug,
        order_id=order.id,
        customer_ref=order.customer_ref,
        order_submitted_at=order.submitted_at,
        currency=order.currency,
        amount_minor=total,
        reason=reason,
        restock=restock,
        restock_warehouse_code=restock_warehouse_code if restock else "",
        requested_by=caller.subject,
    )
    await store.insert_lines(session, rid, refund_lines)
    await store.insert_tenders(session, rid, _tenders(order, str(rid), split))
    refund = await get_refund(session, str(rid), channel=None)
    await append_history(session, refund, "refund:requested", {"amount_minor": total, "reason": reason})
    await emit_event(
        session, refund, TOPIC_SUBMITTED, {"amount_minor": total, "requested_by": caller.subject}
    )
    return refund


def _tenders(order: orders.Order, refund_id: str, split: Sequence[tuple[str, int]]) -> list[RefundTender]:
    """The pending tenders of a new refund, in split order, each with its fixed gateway key."""
    payments = {p.tender_id: p for p in order.payments}
    return [
        RefundTender(
            tender_id=tid,
            seq=seq,
            method=payments[tid].method,
            gateway_reference=payments[tid].gateway_reference,
            amount_minor=amt,
            state="pending",
            idempotency_key=idempotency_key(refund_id, tid),
            gateway_refund_id="",
            attempts=0,
            refunded_at=None,
        )
        for seq, (tid, amt) in enumerate(split)
    ]


# ---------------------------------------------------------------- decide / retry


async def decide_refund(
    session: AsyncSession, refund_id: str, *, channel: str, approve: bool, note: str, caller: Caller
) -> Refund:
    """Approve or deny once. Approval of a zero-amount refund completes it at once;
    otherwise the refund is EXECUTING and the caller starts its workflow after commit."""
    check_decision(approve, note).raise_if_any("the decision is invalid")
    current = await get_refund(session, refund_id, channel=channel)
    if approve and current.requested_by == caller.subject:
        # Four eyes: checked before the state, so the answer never depends on timing.
        raise PermissionDenied(
            "SELF_APPROVAL_FORBIDDEN",
            "the requester of a refund may not approve it",
            metadata={"refund_id": refund_id},
        )
    decide = store.approve if approve else store.deny
    if not await decide(session, refund_id, channel, by=caller.subject, note=note):
        now = await get_refund(session, refund_id, channel=channel)
        raise FailedPrecondition(
            "REFUND_ALREADY_DECIDED",
            f"refund {refund_id} is {now.state}, not pending approval",
            metadata={"refund_id": refund_id, "state": now.state},
        )
    refund = await get_refund(session, refund_id, channel=channel)
    code, topic = ("refund:approved", TOPIC_APPROVED) if approve else ("refund:denied", TOPIC_DENIED)
    await append_history(session, refund, code, {"decided_by": caller.subject, "note": note})
    await emit_event(session, refund, topic, {"decided_by": caller.subject})
    if approve and not refund.tenders:
        # Nothing to pay back: no gateway, no workflow; finish in this transaction.
        await finish_refund(session, refund.id)
        refund = await get_refund(session, refund_id, channel=channel)
    return refund


async def retry_refund(session: AsyncSession, refund_id: str, *, channel: str, caller: Caller) -> Refund:
    """FAULTED -> EXECUTING with the next execution attempt; the caller starts the
    workflow after commit. The new run skips tenders already refunded."""
    if not await store.execute_again(session, refund_id, channel):
        now = await get_refund(session, refund_id, channel=channel)
        raise FailedPrecondition(
            "REFUND_NOT_FAULTED",
            f"refund {refund_id} is {now.state}; only a faulted refund can be retried",
            metadata={"refund_id": refund_id, "state": now.state},
        )
    await store.resolve_faults(session, refund_id)
    refund = await get_refund(session, refund_id, channel=channel)
    payload = {"by": caller.subject, "attempt": refund.execution_attempt}
    await append_history(session, refund, "refund:retried", payload)
    await emit_event(session, refund, TOPIC_RETRIED, payload)
    return refund
