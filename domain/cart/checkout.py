"""CheckoutCart: limits, the inventory reservation, the order intent and the
cart's conversion in one transaction (the caller's).

The hot path: its two statements of its own (the bump that also reads lines
and limits and makes the idempotency claim, and the conversion that also
stores the answer) run on the driver connection (see store.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

import domain.inventory as inventory
import domain.order as order
from domain.cart import store
from domain.cart.limits import enforce_limits
from domain.cart.ports import NO_REFUNDS, RefundedQuantities
from domain.cart.rules import (
    CartState,
    Limit,
    check_approval_current,
    check_can_checkout,
    check_text,
    check_version,
)
from domain.cart.service import (
    approval_of,
    approved_lines,
    as_approved,
    bump_refused,
    cart_event,
    held_quantities,
    parse_id,
    release_if_held,
    wanted_quantities,
)
from domain.cart.types import NO_HOLD, SOURCE_SYSTEM, Cart, CartLine, CheckoutResult, Payment
from domain.platform import idempotency
from domain.shared.caller import ChannelRef
from domain.shared.errors import FailedPrecondition, Violations
from domain.shared.money import Money


async def checkout(
    session: AsyncSession,
    cart_id: str,
    version: int,
    *,
    channel: ChannelRef,
    tax: Money | None,
    shipping: Money | None,
    discount: Money | None,
    payments: Sequence[Payment],
    external_order_id: str,
    actor: str,
    refunds: RefundedQuantities = NO_REFUNDS,
    claim: idempotency.Claim | None = None,
    respond: Callable[[CheckoutResult], bytes] | None = None,
) -> CheckoutResult:
    """One transaction: any refusal leaves the cart, its hold and stock as they were.

    `claim`: the RPC's idempotency claim, made by the first statement (see
    idempotency.Claim); KeyTaken when its request_id was used before.
    `respond`: the RPC's response to the result, as bytes, stored as the
    claim's answer by the last statement (Claim.answers)."""
    _check_request(version, external_order_id, payments)
    cid = parse_id(cart_id)
    row = await store.bump_for_checkout(session, cid, channel.slug, version, claim)
    if row is None:
        raise await bump_refused(session, cart_id, cid, version, channel.slug)
    lines = _lines(cart_id, row)
    check_approval_current(
        cart_id,
        CartState(row.state),
        row.approval_required,
        approved_lines(row),
        row.approved_grand_total_minor,
        as_approved(lines),
    )
    check_can_checkout(cart_id, CartState(row.state), row.approval_required)
    await enforce_limits(
        session,
        channel=channel,
        customer_ref=row.customer_ref,
        quantities={x.sku: x.quantity for x in lines},
        now=row.now,
        refunds=refunds,
        lock=True,
        limits={r[0]: Limit(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4]), r[5]) for r in row.limits},
    )
    res = await _order_reservation(session, row, lines, actor=actor)
    intent = _intent(row, lines, tax, shipping, discount, payments, external_order_id)
    order_id = await _submit_order(
        session,
        cart_id,
        intent,
        channel=channel,
        actor=actor,
        reservation_id=str(res.id),
        backordered=res.backordered > 0,
    )
    # One statement for the purchase rows, the conversion and its event: this
    # runs while the stock rows are locked, so every round trip counts.
    converted = cart_event(
        "cart.converted", row.id, channel.slug, order_id=order_id, reservation_id=str(res.id)
    )
    result = CheckoutResult(_converted(row, lines, order_id), order_id, str(res.id))
    await store.convert(
        session,
        row,
        channel=channel.slug,
        order_id=order_id,
        lines=lines,
        converted=converted,
        answers=claim.answers(respond(result))
        if claim is not None and respond is not None
        else idempotency.Answers(),
    )
    return result


def _check_request(version: int, external_order_id: str, payments: Sequence[Payment]) -> None:
    v = Violations()
    check_text(v, "external_order_id", external_order_id, 128)
    for i, p in enumerate(payments):
        for name in ("tender_id", "method", "gateway_reference"):
            check_text(v, f"payments[{i}].{name}", getattr(p, name), 256)
    v.raise_if_any("the checkout request is invalid")
    v = Violations()
    check_version(v, version)
    v.raise_if_any("the request is invalid")


def _lines(cart_id: str, row: Any) -> list[CartLine]:
    """The lines the bump read with the cart; CART_EMPTY when there are none."""
    currency = row.currency
    lines = [
        CartLine(line_id, sku, int(q), Money(currency, int(p)))
        for line_id, sku, q, p in zip(
            row.line_ids, row.line_skus, row.line_quantities, row.line_prices, strict=True
        )
    ]
    if not lines:
        raise FailedPrecondition("CART_EMPTY", f"cart {cart_id} has no lines", metadata={"cart_id": cart_id})
    return lines


async def _order_reservation(
    session: AsyncSession, row: Any, lines: Sequence[CartLine], *, actor: str
) -> inventory.Reservation:
    """The reservation the order adopts, without a TTL (an order's stock never expires).

    A live hold that covers exactly the lines is handed over as it is
    (inventory.retarget: no counter moves, no stock row locked). Otherwise the
    hold, if any, is released and the lines are reserved now, in this
    transaction (our released units stay locked against others in between)."""
    wanted = wanted_quantities(lines)
    reference = f"cart:{row.id}"
    if row.hold_reservation_id is not None:
        if row.hold_expires_at is None or row.hold_expires_at > row.now:
            res = await _retarget_hold(session, row, reference=reference, actor=actor)
            if res is not None and held_quantities(res) == wanted:
                return res
            # Partly released elsewhere (InventoryService): given back below, then reserved.
        await release_if_held(session, row, reason="cart checked out", actor=actor)
    return await inventory.reserve(
        session,
        [inventory.LineRequest(sku, q) for sku, q in wanted.items()],
        reference=reference,
        ttl=None,
        actor=actor,
        source="cart",
        channel=row.channel,
    )


async def _retarget_hold(
    session: AsyncSession, row: Any, *, reference: str, actor: str
) -> inventory.Reservation | None:
    """The cart's hold, now the order's without a TTL; None when it expired or
    was released meanwhile (the sweeper won)."""
    try:
        # retarget locks the hold and re-checks that it is active and unexpired.
        return await inventory.retarget(
            session, row.hold_reservation_id, reference=reference, ttl=None, actor=actor
        )
    except FailedPrecondition as err:
        if err.reason not in ("RESERVATION_EXPIRED", "RESERVATION_NOT_ACTIVE"):
            raise
        return None


def _intent(
    row: Any,
    lines: Sequence[CartLine],
    tax: Money | None,
    shipping: Money | None,
    discount: Money | None,
    payments: Sequence[Payment],
    external_order_id: str,
) -> order.Intent:
    """The order intent of the cart: its id is the intent id, totals from the lines."""
    currency = row.currency
    subtotal = sum(x.line_total.amount_minor for x in lines)
    t, s, d = (m if m is not None else Money(currency, 0) for m in (tax, shipping, discount))
    return order.Intent(
        intent_id=str(row.id),
        source_system=SOURCE_SYSTEM,
        lines=tuple(order.LineIn(x.line_id, x.sku, x.quantity, x.unit_price) for x in lines),
        totals=order.TotalsIn(
            subtotal=Money(currency, subtotal),
            tax=t,
            shipping=s,
            discount=d,
            grand_total=Money(currency, subtotal + t.amount_minor + s.amount_minor - d.amount_minor),
        ),
        payments=tuple(
            order.PaymentIn(p.tender_id, p.method, p.captured, p.gateway_reference) for p in payments
        ),
        external_order_id=external_order_id,
        customer_ref=row.customer_ref,
    )


async def _submit_order(
    session: AsyncSession,
    cart_id: str,
    intent: order.Intent,
    *,
    channel: ChannelRef,
    actor: str,
    reservation_id: str,
    backordered: bool,
) -> str:
    """The new order's id; CART_CONVERTED if the cart's intent was accepted before."""
    submitted = await order.submit_intent(
        session,
        intent,
        channel=channel,
        actor=actor,
        reservation_id=reservation_id,
        reservation_backordered=backordered,
    )
    if not submitted.created:
        # Only possible if the cart's intent was accepted before; never reuse it silently.
        raise FailedPrecondition(
            "CART_CONVERTED",
            f"cart {cart_id} was already turned into order {submitted.order.id}",
            metadata={"cart_id": cart_id, "order_id": submitted.order.id},
        )
    return submitted.order.id


def _converted(row: Any, lines: Sequence[CartLine], order_id: str) -> Cart:
    """The cart after conversion, built from what was read and written (nothing is read back)."""
    return Cart(
        id=str(row.id),
        channel=row.channel,
        customer_ref=row.customer_ref,
        currency=row.currency,
        version=int(row.version),
        state=CartState.CONVERTED,
        lines=tuple(lines),
        approval_required=row.approval_required,
        hold=NO_HOLD,
        approval=approval_of(row, lines),
        order_id=order_id,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
