"""Approval of carts that need it: submitting, and the approver's decision
(with a stock check that keeps nothing)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

import domain.inventory as inventory
from domain.cart import store
from domain.cart.rules import EDITABLE, CartState, Shortage, check_decider, check_editable, check_text
from domain.cart.service import (
    as_approved,
    bump,
    event,
    held_quantities,
    lines_of,
    release_if_held,
    reload,
    wanted_quantities,
)
from domain.cart.types import Cart, CartLine
from domain.shared.caller import ChannelRef
from domain.shared.errors import FailedPrecondition, NotFound, Violations


async def submit_for_approval(
    session: AsyncSession, cart_id: str, version: int, *, channel: ChannelRef, note: str, actor: str
) -> Cart:
    v = Violations()
    check_text(v, "note", note)
    v.raise_if_any("the request is invalid")
    row = await bump(session, cart_id, version, channel.slug)
    state = CartState(row.state)
    check_editable(cart_id, state)
    if state not in EDITABLE:  # pragma: no cover - check_editable covers the others
        raise FailedPrecondition("INVALID_STATE_TRANSITION", f"cart {cart_id} is {state.value}")
    if not await store.line_count(session, row.id):
        raise FailedPrecondition("CART_EMPTY", f"cart {cart_id} has no lines", metadata={"cart_id": cart_id})
    await store.mark_submitted(session, row.id, submitted_by=actor, note=note)
    await event(session, "cart.submitted_for_approval", row.id, channel.slug, submitted_by=actor)
    return await reload(session, row.id, channel.slug)


async def decide_approval(
    session: AsyncSession,
    cart_id: str,
    version: int,
    *,
    channel: ChannelRef,
    approve: bool,
    reason: str,
    actor: str,
) -> Cart:
    v = Violations()
    if not approve and not reason.strip():
        v.add("reason", "is required to reject a cart")
    check_text(v, "reason", reason)
    v.raise_if_any("the decision is invalid")
    row = await bump(session, cart_id, version, channel.slug)
    if CartState(row.state) is not CartState.PENDING_APPROVAL:
        raise FailedPrecondition(
            "INVALID_STATE_TRANSITION",
            f"cart {cart_id} is {row.state}, not pending_approval",
            metadata={"cart_id": cart_id, "state": row.state},
        )
    check_decider(cart_id, actor, row.submitted_by or "", row.created_by)
    shortages: list[Shortage] = []
    approved = None
    if approve:
        lines = await lines_of(session, row)
        shortages = await _shortages(session, row, lines)
        state = CartState.APPROVED_BLOCKED_INVENTORY if shortages else CartState.APPROVED
        # What this approval covers: checkout converts exactly these lines and total.
        approved = as_approved(lines)
    else:
        state = CartState.REJECTED
    await store.record_decision(
        session,
        row.id,
        state=state,
        approve=approve,
        decided_by=actor,
        reason=reason,
        shortages=shortages,
        approved=approved,
    )
    await event(session, "cart.approval_decided", row.id, channel.slug, state=state.value, decided_by=actor)
    return await reload(session, row.id, channel.slug)


async def _shortages(session: AsyncSession, row: Any, lines: Sequence[CartLine]) -> list[Shortage]:
    """What stock is missing for the lines right now. Nothing is kept: the probe
    gives back our own hold and reserves inside a savepoint that is always
    rolled back."""
    wanted = wanted_quantities(lines)
    if row.hold_reservation_id is not None:
        hold = await inventory.get_reservation(session, row.hold_reservation_id)
        live = hold.state == "active" and (hold.expires_at is None or hold.expires_at > row.now)
        if live and held_quantities(hold) == wanted:
            return []  # the stock is ours already
    nested = await session.begin_nested()
    try:
        await release_if_held(session, row, reason="approval stock check", actor="")
        await inventory.reserve(
            session,
            [inventory.LineRequest(sku, q) for sku, q in wanted.items()],
            reference=f"cart:{row.id}:approval-check",
            actor="",
            source="cart",
            channel=row.channel,
        )
    except FailedPrecondition as err:
        return [Shortage(p.subject, p.description) for p in err.precondition_violations] or [
            Shortage("", err.message)
        ]
    except NotFound as err:
        return [Shortage(err.metadata.get("sku", ""), err.message)]
    finally:
        await nested.rollback()
    return []
