"""Carts and their lines and stock holds: `async def f(session, ...)`, one
transaction owned by the caller. Each function loads, decides with rules.py,
saves through store.py and emits its event.

Concurrency. Every mutation starts with one conditional UPDATE that bumps the
version (`WHERE id = :cart_id AND version = :version`): it both detects a
stale version (ABORTED) and locks the cart row, so a second writer with the
same version waits, then matches nothing. Lock order, everywhere: cart row,
then per-(channel, customer, sku) advisory locks (checkout only, in key
order), then inventory's own locks (reservation rows, stock levels). No cycles.

Holds. A hold is an inventory reservation with a TTL and reference
"cart:<id>". When lines change, the hold is released and the new lines are
reserved again in the same transaction (our released units are visible to our
own reserve and stay locked against others), with the hold's TTL renewed.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

import domain.inventory as inventory
from domain.cart import store
from domain.cart.limits import enforce_limits
from domain.cart.ports import NO_REFUNDS, RefundedQuantities
from domain.cart.rules import (
    APPROVED_STATES,
    MAX_LINES,
    ApprovalInfo,
    ApprovedLine,
    CartState,
    LineDraft,
    Shortage,
    approval_stale,
    check_customer_ref,
    check_editable,
    check_hold_ttl,
    check_line,
    check_line_id,
    check_price,
    check_quantity,
    check_version,
    nfc,
)
from domain.cart.types import LINE_UPDATABLE, NO_HOLD, Cart, CartLine, Hold
from domain.shared.caller import ChannelRef
from domain.shared.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Violations,
)
from domain.shared.ids import new_id
from domain.shared.money import Money
from domain.shared.outbox import Event, emit
from domain.shared.pagination import decode_token, encode_token, page_size

# ------------------------------------------------------------------ loading


def parse_id(cart_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(cart_id)
    except (ValueError, AttributeError, TypeError) as exc:
        raise not_found(cart_id) from exc


def not_found(cart_id: str) -> NotFound:
    return NotFound("CART_NOT_FOUND", f"cart {cart_id!r} does not exist", metadata={"cart_id": cart_id})


async def bump(session: AsyncSession, cart_id: str, version: int, channel: str) -> Any:
    """Conditional version bump: the row (locked), or NOT_FOUND / ABORTED."""
    v = Violations()
    check_version(v, version)
    v.raise_if_any("the request is invalid")
    cid = parse_id(cart_id)
    row = await store.bump_version(session, cid, channel, version)
    if row is not None:
        return row
    raise await bump_refused(session, cart_id, cid, version, channel)


async def bump_refused(
    session: AsyncSession, cart_id: str, cid: uuid.UUID, version: int, channel: str
) -> NotFound | Aborted:
    """Why a conditional bump matched nothing."""
    current = await store.current_version(session, cid, channel)
    if current is None:
        return not_found(cart_id)
    return Aborted(
        "CART_VERSION_MISMATCH",
        f"cart {cart_id} is at version {current}, not {version}: read it again and retry",
        metadata={"cart_id": cart_id, "current_version": str(current), "version": str(version)},
    )


async def lines_of(session: AsyncSession, row: Any) -> list[CartLine]:
    return (await store.lines_of(session, [row.id], {row.id: row.currency}))[row.id]


async def _hold(session: AsyncSession, row: Any) -> Hold:
    if row.hold_reservation_id is None:
        return NO_HOLD
    ttl = None if row.hold_ttl_us is None else timedelta(microseconds=int(row.hold_ttl_us))
    res = await inventory.get_reservation(session, row.hold_reservation_id)
    expires = res.expires_at or row.hold_expires_at
    if res.state == "active" and (expires is None or expires > row.now):
        state = "held"
    elif res.state == "expired" or (expires is not None and expires <= row.now):
        # Active but past its time: the sweeper is about to release it; it holds nothing for us.
        state = "expired"
    else:
        state = "released"
    return Hold(state, str(res.id), expires, ttl)


def approved_lines(row: Any) -> tuple[ApprovedLine, ...] | None:
    """The lines the cart's approval approved, or None when it has none."""
    if row.approved_lines is None:
        return None
    return tuple(
        ApprovedLine(x["line_id"], x["sku"], int(x["quantity"]), int(x["unit_price_minor"]))
        for x in row.approved_lines
    )


def as_approved(lines: Sequence[CartLine]) -> tuple[ApprovedLine, ...]:
    """The cart's lines in the form an approval records them."""
    return tuple(ApprovedLine(x.line_id, x.sku, x.quantity, x.unit_price.amount_minor) for x in lines)


def approval_of(row: Any, lines: Sequence[CartLine]) -> ApprovalInfo | None:
    if row.submitted_by is None:
        return None
    approved = approved_lines(row)
    total = row.approved_grand_total_minor
    return ApprovalInfo(
        submitted_by=row.submitted_by,
        submitted_at=row.submitted_at,
        note=row.submit_note,
        decision=row.decision or "",
        decided_by=row.decided_by or "",
        decided_at=row.decided_at,
        reason=row.decision_reason,
        shortages=[Shortage(s["sku"], s["description"]) for s in (row.shortages or [])],
        approved_grand_total=None if total is None else Money(row.currency, int(total)),
        approved_lines=approved or (),
        stale=approval_stale(CartState(row.state), approved, as_approved(lines)),
    )


async def _cart(session: AsyncSession, row: Any, lines: list[CartLine] | None = None) -> Cart:
    if lines is None:
        lines = await lines_of(session, row)
    return Cart(
        id=str(row.id),
        channel=row.channel,
        customer_ref=row.customer_ref,
        currency=row.currency,
        version=int(row.version),
        state=CartState(row.state),
        lines=tuple(lines),
        approval_required=row.approval_required,
        hold=await _hold(session, row),
        approval=approval_of(row, lines),
        order_id=row.order_id or "",
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def reload(session: AsyncSession, cart_id: uuid.UUID, channel: str) -> Cart:
    """The cart as it is now in this transaction."""
    row = await store.cart_row(session, cart_id, channel)
    if row is None:
        raise not_found(str(cart_id))
    return await _cart(session, row)


def cart_event(topic: str, cart_id: Any, channel: str, **payload: Any) -> Event:
    """Every cart event: the cart's id first in its payload."""
    return Event(topic, "cart", str(cart_id), {"cart_id": str(cart_id), **payload}, channel)


async def event(session: AsyncSession, topic: str, cart_id: Any, channel: str, **payload: Any) -> None:
    await emit(session, cart_event(topic, cart_id, channel, **payload))


# ------------------------------------------------------------------ holds


async def _rehold(session: AsyncSession, row: Any, lines: Sequence[CartLine], *, actor: str) -> None:
    """Make the hold follow the lines (only while it still holds)."""
    if row.hold_reservation_id is None:
        return
    hold = await _hold(session, row)
    if hold.state != "held":
        return  # an expired / released hold is reported as such; HoldCartStock renews it
    await inventory.release(
        session, row.hold_reservation_id, None, reason="cart lines changed", actor=actor, source="cart"
    )
    if not lines:
        await store.set_hold(session, row.id, None, None, None)
        return
    ttl = hold.ttl or timedelta(minutes=15)
    res = await _reserve_for_cart(session, row, lines, ttl=ttl, actor=actor)
    await store.set_hold(session, row.id, res.id, ttl, res.expires_at)


async def _reserve_for_cart(
    session: AsyncSession, row: Any, lines: Sequence[CartLine], *, ttl: timedelta, actor: str
) -> inventory.Reservation:
    return await inventory.reserve(
        session,
        [inventory.LineRequest(x.sku, x.quantity) for x in lines],
        reference=f"cart:{row.id}",
        ttl=ttl,
        actor=actor,
        source="cart",
        channel=row.channel,
    )


async def release_if_held(session: AsyncSession, row: Any, *, reason: str, actor: str) -> None:
    if row.hold_reservation_id is not None:
        # A no-op for a reservation that no longer holds anything.
        await inventory.release(
            session, row.hold_reservation_id, None, reason=reason, actor=actor, source="cart"
        )


async def hold_stock(
    session: AsyncSession,
    cart_id: str,
    version: int,
    *,
    channel: ChannelRef,
    ttl: timedelta | None,
    actor: str,
) -> Cart:
    v = Violations()
    hold_ttl = check_hold_ttl(v, ttl)
    v.raise_if_any("the hold request is invalid")
    row = await bump(session, cart_id, version, channel.slug)
    if CartState(row.state) is CartState.CONVERTED:
        check_editable(cart_id, CartState.CONVERTED)
    lines = await lines_of(session, row)
    if not lines:
        raise FailedPrecondition(
            "CART_EMPTY", f"cart {cart_id} has no lines to hold", metadata={"cart_id": cart_id}
        )
    await release_if_held(session, row, reason="cart hold renewed", actor=actor)
    res = await _reserve_for_cart(session, row, lines, ttl=hold_ttl, actor=actor)
    await store.set_hold(session, row.id, res.id, hold_ttl, res.expires_at)
    await event(session, "cart.stock_held", row.id, channel.slug, reservation_id=str(res.id))
    return await reload(session, row.id, channel.slug)


async def release_hold(
    session: AsyncSession, cart_id: str, version: int, *, channel: ChannelRef, actor: str
) -> Cart:
    row = await bump(session, cart_id, version, channel.slug)
    if CartState(row.state) is CartState.CONVERTED:
        check_editable(cart_id, CartState.CONVERTED)
    await release_if_held(session, row, reason="cart hold released", actor=actor)
    await store.set_hold(session, row.id, None, None, None)
    await event(session, "cart.stock_released", row.id, channel.slug)
    return await reload(session, row.id, channel.slug)


# ------------------------------------------------------------------ carts and lines


def _check_drafts(v: Violations, prefix: str, drafts: Sequence[LineDraft], currency: str) -> list[LineDraft]:
    out = []
    seen: set[str] = set()
    for i, d in enumerate(drafts):
        d = LineDraft(nfc(d.sku), d.quantity, d.unit_price)
        path = f"{prefix}[{i}]"
        check_line(v, path, d, currency)
        if d.sku in seen:
            v.add(path + ".sku", f"SKU {d.sku!r} appears on two lines; use one line per SKU")
        seen.add(d.sku)
        out.append(d)
    return out


async def create_cart(
    session: AsyncSession,
    *,
    channel: ChannelRef,
    customer_ref: str,
    approval_required: bool,
    lines: Sequence[LineDraft],
    actor: str,
    refunds: RefundedQuantities = NO_REFUNDS,
) -> Cart:
    v = Violations()
    check_customer_ref(v, "cart.customer_ref", customer_ref)
    if len(lines) > MAX_LINES:
        v.add("cart.lines", f"at most {MAX_LINES} lines")
    drafts = _check_drafts(v, "cart.lines", lines, channel.currency)
    v.raise_if_any("the cart is invalid")
    await enforce_limits(
        session,
        channel=channel,
        customer_ref=customer_ref,
        quantities={d.sku: d.quantity for d in drafts},
        now=await store.database_now(session),
        refunds=refunds,
        lock=False,
    )
    cid = new_id()
    await store.insert_cart(
        session,
        cid,
        channel=channel.slug,
        customer_ref=customer_ref,
        currency=channel.currency,
        approval_required=approval_required,
        created_by=actor,
        drafts=drafts,
    )
    await event(session, "cart.created", cid, channel.slug, customer_ref=customer_ref)
    return await reload(session, cid, channel.slug)


async def get_cart(session: AsyncSession, cart_id: str, *, channel: ChannelRef) -> Cart:
    return await reload(session, parse_id(cart_id), channel.slug)


async def list_carts(
    session: AsyncSession,
    *,
    channel: ChannelRef,
    customer_ref: str = "",
    state: CartState | None = None,
    size: int = 0,
    token: str = "",
) -> tuple[list[Cart], str]:
    n = page_size(size)
    if customer_ref:
        v = Violations()
        check_customer_ref(v, "customer_ref", customer_ref)
        v.raise_if_any("the filter is invalid")
    filters = ["carts", channel.slug, customer_ref, state.value if state else ""]
    after = decode_token(token, filters)
    before: tuple[datetime, uuid.UUID] | None = None
    if after is not None:
        try:
            before = datetime.fromisoformat(str(after[0])), uuid.UUID(str(after[1]))
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise InvalidArgument(
                "INVALID_PAGE_TOKEN", "page_token is not a token this service issued"
            ) from exc
    rows = await store.carts_page(
        session, channel=channel.slug, customer_ref=customer_ref, state=state, before=before, limit=n + 1
    )
    more = len(rows) > n
    rows = rows[:n]
    lines = await store.lines_of(session, [r.id for r in rows], {r.id: r.currency for r in rows})
    carts = [await _cart(session, r, lines[r.id]) for r in rows]
    nxt = encode_token([rows[-1].created_at.isoformat(), str(rows[-1].id)], filters) if more and rows else ""
    return carts, nxt


async def _after_line_change(
    session: AsyncSession,
    row: Any,
    *,
    channel: ChannelRef,
    actor: str,
    refunds: RefundedQuantities,
    topic: str,
    **payload: Any,
) -> Cart:
    """What every line change does next: limits, reopening a rejected cart,
    the hold following the lines, the event, the cart as it is now."""
    lines = await lines_of(session, row)
    await enforce_limits(
        session,
        channel=channel,
        customer_ref=row.customer_ref,
        quantities={x.sku: x.quantity for x in lines},
        now=row.now,
        refunds=refunds,
        lock=False,
    )
    if CartState(row.state) is CartState.REJECTED or CartState(row.state) in APPROVED_STATES:
        # Editing a rejected or approved cart starts over: it needs a new
        # submission (an approval stays on record, stale).
        await store.reopen(session, row.id)
    await _rehold(session, row, lines, actor=actor)
    await event(session, topic, row.id, channel.slug, **payload)
    return await reload(session, row.id, channel.slug)


async def add_line(
    session: AsyncSession,
    cart_id: str,
    version: int,
    *,
    channel: ChannelRef,
    line: LineDraft,
    actor: str,
    refunds: RefundedQuantities = NO_REFUNDS,
) -> Cart:
    v = Violations()
    (draft,) = _check_drafts(v, "line", [line], channel.currency)
    v.raise_if_any("the line is invalid")
    row = await bump(session, cart_id, version, channel.slug)
    check_editable(cart_id, CartState(row.state))
    count, existing = await store.line_count_and_line_of(session, row.id, draft.sku)
    if existing is not None:
        raise AlreadyExists(
            "CART_LINE_EXISTS",
            f"cart {cart_id} already has SKU {draft.sku!r} on line {existing}; update that line instead",
            metadata={"cart_id": cart_id, "line_id": existing, "sku": draft.sku},
        )
    if count >= MAX_LINES:
        raise FailedPrecondition(
            "CART_FULL", f"a cart holds at most {MAX_LINES} lines", metadata={"cart_id": cart_id}
        )
    line_id = await store.insert_line(session, row.id, row.next_line_no, draft)
    return await _after_line_change(
        session, row, channel=channel, actor=actor, refunds=refunds, topic="cart.line_added", line_id=line_id
    )


async def update_line(
    session: AsyncSession,
    cart_id: str,
    version: int,
    *,
    channel: ChannelRef,
    line_id: str,
    fields: Sequence[str],
    quantity: int,
    unit_price: Money,
    actor: str,
    refunds: RefundedQuantities = NO_REFUNDS,
) -> Cart:
    paths = set(fields) or set(LINE_UPDATABLE)
    v = Violations()
    for p in sorted(paths - set(LINE_UPDATABLE)):
        v.add("update_mask", f"{p!r} cannot be updated (updatable: {', '.join(LINE_UPDATABLE)})")
    check_line_id(v, "line.line_id", line_id)
    if "quantity" in paths:
        check_quantity(v, "line.quantity", quantity)
    if "unit_price" in paths:
        check_price(v, "line.unit_price", unit_price, channel.currency)
    v.raise_if_any("the line update is invalid")
    row = await bump(session, cart_id, version, channel.slug)
    check_editable(cart_id, CartState(row.state))
    found = await store.update_line(
        session,
        row.id,
        line_id,
        quantity=quantity if "quantity" in paths else None,
        unit_price=unit_price.amount_minor if "unit_price" in paths else None,
    )
    if not found:
        raise _line_not_found(cart_id, line_id)
    return await _after_line_change(
        session,
        row,
        channel=channel,
        actor=actor,
        refunds=refunds,
        topic="cart.line_updated",
        line_id=line_id,
    )


async def remove_line(
    session: AsyncSession,
    cart_id: str,
    version: int,
    *,
    channel: ChannelRef,
    line_id: str,
    actor: str,
    refunds: RefundedQuantities = NO_REFUNDS,
) -> Cart:
    v = Violations()
    check_line_id(v, "line_id", line_id)
    v.raise_if_any("the request is invalid")
    row = await bump(session, cart_id, version, channel.slug)
    check_editable(cart_id, CartState(row.state))
    if not await store.delete_line(session, row.id, line_id):
        raise _line_not_found(cart_id, line_id)
    return await _after_line_change(
        session,
        row,
        channel=channel,
        actor=actor,
        refunds=refunds,
        topic="cart.line_removed",
        line_id=line_id,
    )


def _line_not_found(cart_id: str, line_id: str) -> NotFound:
    return NotFound(
        "CART_LINE_NOT_FOUND",
        f"cart {cart_id} has no line {line_id!r}",
        metadata={"cart_id": cart_id, "line_id": line_id},
    )


def held_quantities(res: inventory.Reservation) -> dict[str, int]:
    """Units per SKU the reservation still holds (a kit counted in kits, as the cart's lines ask)."""
    return res.open_quantities()


def wanted_quantities(lines: Sequence[CartLine]) -> dict[str, int]:
    """Units per SKU the lines ask for."""
    wanted: dict[str, int] = {}
    for x in lines:
        wanted[x.sku] = wanted.get(x.sku, 0) + x.quantity
    return wanted
