"""Cart service functions: `async def f(session, ...)`, one transaction owned by the caller.

Concurrency. Every mutation starts with one conditional UPDATE that bumps the
version (`WHERE id = :id AND version = :v`): it both detects a stale version
(ABORTED) and locks the cart row, so a second writer with the same version
waits, then matches nothing. Lock order, everywhere: cart row, then
per-(channel, customer, sku) advisory locks (checkout only, in key order),
then inventory's own locks (reservation rows, stock levels). No cycles.

Holds. A hold is an inventory reservation with a TTL and reference
"cart:<id>". When lines change, the hold is released and the new lines are
reserved again in the same transaction (our released units are visible to our
own reserve and stay locked against others), with the hold's TTL renewed.
"""

from __future__ import annotations

import json
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import domain.inventory as inventory
import domain.order as order
from domain.cart.ports import NO_REFUNDS, RefundedQuantities
from domain.cart.rules import (
    EDITABLE,
    MAX_LINES,
    ApprovalInfo,
    CartState,
    Limit,
    LineDraft,
    Shortage,
    check_can_checkout,
    check_customer_ref,
    check_decider,
    check_editable,
    check_hold_ttl,
    check_limit_values,
    check_limits,
    check_line,
    check_line_id,
    check_price,
    check_quantity,
    check_sku,
    check_text,
    check_version,
    line_total,
    raise_limit_violations,
    window_start,
)
from domain.platform import idempotency
from domain.shared import outbox
from domain.shared.caller import ChannelRef
from domain.shared.db import DriverStatement, driver_connection
from domain.shared.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Violations,
)
from domain.shared.money import Money
from domain.shared.outbox import Event, emit
from domain.shared.pagination import decode_token, encode_token, page_size

SOURCE_SYSTEM = "cart"
LINE_UPDATABLE = ("quantity", "unit_price")

# ------------------------------------------------------------------ values


@dataclass(frozen=True)
class CartLine:
    line_id: str
    sku: str
    quantity: int
    unit_price: Money

    @property
    def line_total(self) -> Money:
        return Money(self.unit_price.currency, line_total(self.quantity, self.unit_price.amount_minor))


@dataclass(frozen=True)
class Hold:
    state: str  # "none", "held", "expired", "released"
    reservation_id: str = ""
    expires_at: datetime | None = None
    ttl: timedelta | None = None


NO_HOLD = Hold("none")


@dataclass(frozen=True)
class Cart:
    id: str
    channel: str
    customer_ref: str
    currency: str
    version: int
    state: CartState
    lines: tuple[CartLine, ...]
    approval_required: bool
    hold: Hold
    approval: ApprovalInfo | None
    order_id: str
    created_by: str
    created_at: datetime
    updated_at: datetime

    @property
    def subtotal(self) -> Money:
        return Money(self.currency, sum(x.line_total.amount_minor for x in self.lines))

    @property
    def item_count(self) -> int:
        return sum(x.quantity for x in self.lines)


@dataclass(frozen=True)
class Payment:
    tender_id: str
    method: str
    captured: Money
    gateway_reference: str = ""


@dataclass(frozen=True)
class CheckoutResult:
    cart: Cart
    order_id: str
    reservation_id: str


# ------------------------------------------------------------------ helpers


def _nfc(sku: str) -> str:
    return unicodedata.normalize("NFC", sku)


def _parse_id(cart_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(cart_id)
    except (ValueError, AttributeError, TypeError) as exc:
        raise NotFound(
            "CART_NOT_FOUND", f"cart {cart_id!r} does not exist", metadata={"cart_id": cart_id}
        ) from exc


def _not_found(cart_id: str) -> NotFound:
    return NotFound("CART_NOT_FOUND", f"cart {cart_id!r} does not exist", metadata={"cart_id": cart_id})


_COLS = """id, channel, customer_ref, currency, version, state, approval_required, created_by, next_line_no,
           hold_reservation_id, hold_ttl_us, hold_expires_at, submitted_by, submitted_at, submit_note,
           decision, decided_by, decided_at, decision_reason, shortages, order_id, created_at, updated_at,
           now() AS now"""

_BUMP = text(
    f"""UPDATE carts.carts SET version = version + 1, updated_at = now()
        WHERE id = :id AND channel = :ch AND version = :v RETURNING {_COLS}"""
)
_CURRENT_VERSION = text("SELECT version FROM carts.carts WHERE id = :id AND channel = :ch")
_SELECT = text(f"SELECT {_COLS} FROM carts.carts WHERE id = :id AND channel = :ch")
_LINES = text(
    """SELECT cart_id, line_id, sku, quantity, unit_price_minor FROM carts.cart_lines
       WHERE cart_id = ANY(CAST(:ids AS uuid[])) ORDER BY cart_id, line_no"""
)


async def _bump(session: AsyncSession, cart_id: str, version: int, channel: str) -> Any:
    """Conditional version bump: the row (locked), or NOT_FOUND / ABORTED."""
    v = Violations()
    check_version(v, version)
    v.raise_if_any("the request is invalid")
    cid = _parse_id(cart_id)
    row = (await session.execute(_BUMP, {"id": cid, "ch": channel, "v": version})).one_or_none()
    if row is not None:
        return row
    raise await _bump_refused(session, cart_id, cid, version, channel)


async def _bump_refused(
    session: AsyncSession, cart_id: str, cid: uuid.UUID, version: int, channel: str
) -> NotFound | Aborted:
    """Why a conditional bump matched nothing."""
    current = (await session.execute(_CURRENT_VERSION, {"id": cid, "ch": channel})).scalar_one_or_none()
    if current is None:
        return _not_found(cart_id)
    return Aborted(
        "CART_VERSION_MISMATCH",
        f"cart {cart_id} is at version {current}, not {version}: read it again and retry",
        metadata={"cart_id": cart_id, "current_version": str(current), "version": str(version)},
    )


async def _lines(
    session: AsyncSession, ids: Sequence[uuid.UUID], currency: dict[uuid.UUID, str]
) -> dict[uuid.UUID, list[CartLine]]:
    out: dict[uuid.UUID, list[CartLine]] = {i: [] for i in ids}
    if not ids:
        return out
    for r in (await session.execute(_LINES, {"ids": list(ids)})).all():
        out[r.cart_id].append(
            CartLine(r.line_id, r.sku, int(r.quantity), Money(currency[r.cart_id], int(r.unit_price_minor)))
        )
    return out


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


def _approval(row: Any) -> ApprovalInfo | None:
    if row.submitted_by is None:
        return None
    return ApprovalInfo(
        submitted_by=row.submitted_by,
        submitted_at=row.submitted_at,
        note=row.submit_note,
        decision=row.decision or "",
        decided_by=row.decided_by or "",
        decided_at=row.decided_at,
        reason=row.decision_reason,
        shortages=[Shortage(s["sku"], s["description"]) for s in (row.shortages or [])],
    )


async def _cart(session: AsyncSession, row: Any, lines: list[CartLine] | None = None) -> Cart:
    if lines is None:
        lines = (await _lines(session, [row.id], {row.id: row.currency}))[row.id]
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
        approval=_approval(row),
        order_id=row.order_id or "",
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def _reload(session: AsyncSession, cart_id: uuid.UUID, channel: str) -> Cart:
    row = (await session.execute(_SELECT, {"id": cart_id, "ch": channel})).one_or_none()
    if row is None:
        raise _not_found(str(cart_id))
    return await _cart(session, row)


def _cart_event(topic: str, cart_id: Any, channel: str, **payload: Any) -> Event:
    """Every cart event: the cart's id first in its payload."""
    return Event(topic, "cart", str(cart_id), {"cart_id": str(cart_id), **payload}, channel)


async def _event(session: AsyncSession, topic: str, cart_id: Any, channel: str, **payload: Any) -> None:
    await emit(session, _cart_event(topic, cart_id, channel, **payload))


# ------------------------------------------------------------------ purchase limits

_LIMITS = text(
    """SELECT sku, min_quantity, order_multiple, max_per_order, max_per_customer, updated_at
       FROM carts.purchase_limits WHERE channel = :ch AND sku = ANY(CAST(:skus AS text[]))"""
)
_BOUGHT = text(
    """SELECT sku, sum(quantity) AS q FROM carts.purchases
       WHERE channel = :ch AND customer_ref = :cust AND sku = ANY(CAST(:skus AS text[]))
         AND purchased_at >= :since
       GROUP BY sku"""
)
# One advisory lock per (channel, customer, sku), taken in key order so two
# checkouts never wait on each other in a cycle. Collisions only serialize more.
_LOCK_CUSTOMER_SKUS = text(
    """SELECT count(pg_advisory_xact_lock(k)) FROM (
           SELECT DISTINCT hashtextextended(:ch || chr(31) || :cust || chr(31) || s, 0) AS k
           FROM unnest(CAST(:skus AS text[])) AS s ORDER BY 1) t"""
)


def _limit(r: Any) -> Limit:
    return Limit(
        r.sku,
        int(r.min_quantity),
        int(r.order_multiple),
        int(r.max_per_order),
        int(r.max_per_customer),
        r.updated_at,
    )


async def _limits(session: AsyncSession, channel: str, skus: Sequence[str]) -> dict[str, Limit]:
    rows = (await session.execute(_LIMITS, {"ch": channel, "skus": list(skus)})).all()
    return {r.sku: _limit(r) for r in rows}


async def _enforce_limits(
    session: AsyncSession,
    *,
    channel: ChannelRef,
    customer_ref: str,
    quantities: dict[str, int],
    now: datetime,
    refunds: RefundedQuantities,
    lock: bool,
    limits: dict[str, Limit] | None = None,
) -> None:
    """Raises PURCHASE_LIMIT_EXCEEDED listing every broken rule. With `lock`,
    the per-customer counts are read under the customer's SKU locks, held to
    commit, so two checkouts cannot both pass on the same remaining allowance.
    `limits`: the limits of these SKUs when the caller read them already."""
    if not quantities:
        return
    if limits is None:
        limits = await _limits(session, channel.slug, sorted(quantities))
    per_customer = sorted(s for s, lim in limits.items() if lim.max_per_customer)
    bought: dict[str, int] = {}
    if per_customer:
        if lock:
            await session.execute(
                _LOCK_CUSTOMER_SKUS, {"ch": channel.slug, "cust": customer_ref, "skus": per_customer}
            )
        since = window_start(now, channel.timezone)
        rows = (
            await session.execute(
                _BOUGHT, {"ch": channel.slug, "cust": customer_ref, "skus": per_customer, "since": since}
            )
        ).all()
        bought = {r.sku: int(r.q) for r in rows}
        refunded = await refunds.refunded_quantities(
            session, channel=channel.slug, customer_ref=customer_ref, skus=per_customer, since=since
        )
        for sku, q in refunded.items():
            if sku in bought:
                bought[sku] -= int(q)
    raise_limit_violations(check_limits(limits, quantities, bought))


async def set_purchase_limit(
    session: AsyncSession, *, channel: ChannelRef, limit: Limit, actor: str
) -> Limit:
    limit = Limit(
        _nfc(limit.sku), limit.min_quantity, limit.order_multiple, limit.max_per_order, limit.max_per_customer
    )
    v = Violations()
    check_limit_values(v, limit)
    v.raise_if_any("the purchase limit is invalid")
    row = (
        await session.execute(
            text(
                """INSERT INTO carts.purchase_limits
                       (channel, sku, min_quantity, order_multiple, max_per_order, max_per_customer)
                   VALUES (:ch, :sku, :mn, :mul, :mpo, :mpc)
                   ON CONFLICT (channel, sku) DO UPDATE SET min_quantity = EXCLUDED.min_quantity,
                       order_multiple = EXCLUDED.order_multiple, max_per_order = EXCLUDED.max_per_order,
                       max_per_customer = EXCLUDED.max_per_customer, updated_at = now()
                   RETURNING sku, min_quantity, order_multiple, max_per_order, max_per_customer, updated_at"""
            ),
            {
                "ch": channel.slug,
                "sku": limit.sku,
                "mn": limit.min_quantity,
                "mul": limit.order_multiple,
                "mpo": limit.max_per_order,
                "mpc": limit.max_per_customer,
            },
        )
    ).one()
    await emit(
        session,
        Event(
            "cart.purchase_limit_set",
            "purchase_limit",
            f"{channel.slug}:{limit.sku}",
            {"sku": limit.sku, "actor": actor},
            channel.slug,
        ),
    )
    return _limit(row)


async def get_purchase_limit(session: AsyncSession, *, channel: ChannelRef, sku: str) -> Limit:
    v = Violations()
    check_sku(v, "sku", _nfc(sku))
    v.raise_if_any("the SKU is invalid")
    found = await _limits(session, channel.slug, [_nfc(sku)])
    if not found:
        raise NotFound(
            "PURCHASE_LIMIT_NOT_FOUND",
            f"no purchase limit for SKU {sku!r} in channel {channel.slug}",
            metadata={"sku": sku},
        )
    return next(iter(found.values()))


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
        await _set_hold(session, row.id, None, None, None)
        return
    ttl = hold.ttl or timedelta(minutes=15)
    res = await inventory.reserve(
        session,
        [inventory.LineRequest(x.sku, x.quantity) for x in lines],
        reference=f"cart:{row.id}",
        ttl=ttl,
        actor=actor,
        source="cart",
    )
    await _set_hold(session, row.id, res.id, ttl, res.expires_at)


async def _set_hold(
    session: AsyncSession,
    cart_id: uuid.UUID,
    rid: uuid.UUID | None,
    ttl: timedelta | None,
    expires: datetime | None,
) -> None:
    await session.execute(
        text(
            """UPDATE carts.carts SET hold_reservation_id = :rid, hold_ttl_us = :ttl, hold_expires_at = :exp
               WHERE id = :id"""
        ),
        {
            "id": cart_id,
            "rid": rid,
            "ttl": None if ttl is None else ttl // timedelta(microseconds=1),
            "exp": expires,
        },
    )


async def _release_if_held(session: AsyncSession, row: Any, *, reason: str, actor: str) -> None:
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
    row = await _bump(session, cart_id, version, channel.slug)
    if CartState(row.state) is CartState.CONVERTED:
        check_editable(cart_id, CartState.CONVERTED)
    lines = (await _lines(session, [row.id], {row.id: row.currency}))[row.id]
    if not lines:
        raise FailedPrecondition(
            "CART_EMPTY", f"cart {cart_id} has no lines to hold", metadata={"cart_id": cart_id}
        )
    await _release_if_held(session, row, reason="cart hold renewed", actor=actor)
    res = await inventory.reserve(
        session,
        [inventory.LineRequest(x.sku, x.quantity) for x in lines],
        reference=f"cart:{row.id}",
        ttl=hold_ttl,
        actor=actor,
        source="cart",
    )
    await _set_hold(session, row.id, res.id, hold_ttl, res.expires_at)
    await _event(session, "cart.stock_held", row.id, channel.slug, reservation_id=str(res.id))
    return await _reload(session, row.id, channel.slug)


async def release_hold(
    session: AsyncSession, cart_id: str, version: int, *, channel: ChannelRef, actor: str
) -> Cart:
    row = await _bump(session, cart_id, version, channel.slug)
    if CartState(row.state) is CartState.CONVERTED:
        check_editable(cart_id, CartState.CONVERTED)
    await _release_if_held(session, row, reason="cart hold released", actor=actor)
    await _set_hold(session, row.id, None, None, None)
    await _event(session, "cart.stock_released", row.id, channel.slug)
    return await _reload(session, row.id, channel.slug)


# ------------------------------------------------------------------ carts and lines


def _check_drafts(v: Violations, prefix: str, drafts: Sequence[LineDraft], currency: str) -> list[LineDraft]:
    out = []
    seen: set[str] = set()
    for i, d in enumerate(drafts):
        d = LineDraft(_nfc(d.sku), d.quantity, d.unit_price)
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
    now = (await session.execute(text("SELECT now()"))).scalar_one()
    await _enforce_limits(
        session,
        channel=channel,
        customer_ref=customer_ref,
        quantities={d.sku: d.quantity for d in drafts},
        now=now,
        refunds=refunds,
        lock=False,
    )
    cid = uuid.uuid4()
    await session.execute(
        text(
            """INSERT INTO carts.carts (id, channel, customer_ref, currency, approval_required, created_by,
                                       next_line_no)
               VALUES (:id, :ch, :cust, :cur, :appr, :by, :next)"""
        ),
        {
            "id": cid,
            "ch": channel.slug,
            "cust": customer_ref,
            "cur": channel.currency,
            "appr": approval_required,
            "by": actor,
            "next": len(drafts) + 1,
        },
    )
    if drafts:
        await session.execute(
            text(
                """INSERT INTO carts.cart_lines (cart_id, line_id, line_no, sku, quantity, unit_price_minor)
                   SELECT :id, 'ln-' || n, n, s, q, p
                   FROM unnest(CAST(:skus AS text[]), CAST(:qs AS bigint[]), CAST(:ps AS bigint[]))
                        WITH ORDINALITY AS t(s, q, p, n)"""
            ),
            {
                "id": cid,
                "skus": [d.sku for d in drafts],
                "qs": [d.quantity for d in drafts],
                "ps": [d.unit_price.amount_minor for d in drafts],
            },
        )
    await _event(session, "cart.created", cid, channel.slug, customer_ref=customer_ref)
    return await _reload(session, cid, channel.slug)


async def get_cart(session: AsyncSession, cart_id: str, *, channel: ChannelRef) -> Cart:
    return await _reload(session, _parse_id(cart_id), channel.slug)


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
    where = ["channel = :ch"]
    params: dict[str, Any] = {"ch": channel.slug, "n": n + 1}
    if customer_ref:
        where.append("customer_ref = :cust")
        params["cust"] = customer_ref
    if state is not None:
        where.append("state = :state")
        params["state"] = state.value
    if after is not None:
        try:
            params["at"] = datetime.fromisoformat(str(after[0]))
            params["aid"] = uuid.UUID(str(after[1]))
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise InvalidArgument(
                "INVALID_PAGE_TOKEN", "page_token is not a token this service issued"
            ) from exc
        where.append("(created_at, id) < (:at, :aid)")
    rows = (
        await session.execute(
            text(
                f"SELECT {_COLS} FROM carts.carts WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT :n"
            ),
            params,
        )
    ).all()
    more = len(rows) > n
    rows = rows[:n]
    lines = await _lines(session, [r.id for r in rows], {r.id: r.currency for r in rows})
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
    lines = (await _lines(session, [row.id], {row.id: row.currency}))[row.id]
    await _enforce_limits(
        session,
        channel=channel,
        customer_ref=row.customer_ref,
        quantities={x.sku: x.quantity for x in lines},
        now=row.now,
        refunds=refunds,
        lock=False,
    )
    if CartState(row.state) is CartState.REJECTED:
        # Editing a rejected cart starts over: it needs a new submission.
        await session.execute(text("UPDATE carts.carts SET state = 'active' WHERE id = :id"), {"id": row.id})
    await _rehold(session, row, lines, actor=actor)
    await _event(session, topic, row.id, channel.slug, **payload)
    return await _reload(session, row.id, channel.slug)


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
    row = await _bump(session, cart_id, version, channel.slug)
    check_editable(cart_id, CartState(row.state))
    count, existing = (
        await session.execute(
            text(
                """SELECT count(*), max(line_id) FILTER (WHERE sku = :sku)
                   FROM carts.cart_lines WHERE cart_id = :id"""
            ),
            {"id": row.id, "sku": draft.sku},
        )
    ).one()
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
    line_id = f"ln-{row.next_line_no}"
    await session.execute(
        text(
            """INSERT INTO carts.cart_lines (cart_id, line_id, line_no, sku, quantity, unit_price_minor)
               VALUES (:id, :lid, :no, :sku, :q, :p)"""
        ),
        {
            "id": row.id,
            "lid": line_id,
            "no": row.next_line_no,
            "sku": draft.sku,
            "q": draft.quantity,
            "p": draft.unit_price.amount_minor,
        },
    )
    await session.execute(
        text("UPDATE carts.carts SET next_line_no = next_line_no + 1 WHERE id = :id"), {"id": row.id}
    )
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
    row = await _bump(session, cart_id, version, channel.slug)
    check_editable(cart_id, CartState(row.state))
    result = await session.execute(
        text(
            """UPDATE carts.cart_lines SET
                   quantity = CASE WHEN :set_q THEN :q ELSE quantity END,
                   unit_price_minor = CASE WHEN :set_p THEN :p ELSE unit_price_minor END
               WHERE cart_id = :id AND line_id = :lid RETURNING line_id"""
        ),
        {
            "id": row.id,
            "lid": line_id,
            "set_q": "quantity" in paths,
            "q": quantity,
            "set_p": "unit_price" in paths,
            "p": unit_price.amount_minor,
        },
    )
    if result.one_or_none() is None:
        raise NotFound(
            "CART_LINE_NOT_FOUND",
            f"cart {cart_id} has no line {line_id!r}",
            metadata={"cart_id": cart_id, "line_id": line_id},
        )
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
    row = await _bump(session, cart_id, version, channel.slug)
    check_editable(cart_id, CartState(row.state))
    result = await session.execute(
        text("DELETE FROM carts.cart_lines WHERE cart_id = :id AND line_id = :lid RETURNING line_id"),
        {"id": row.id, "lid": line_id},
    )
    if result.one_or_none() is None:
        raise NotFound(
            "CART_LINE_NOT_FOUND",
            f"cart {cart_id} has no line {line_id!r}",
            metadata={"cart_id": cart_id, "line_id": line_id},
        )
    return await _after_line_change(
        session,
        row,
        channel=channel,
        actor=actor,
        refunds=refunds,
        topic="cart.line_removed",
        line_id=line_id,
    )


# ------------------------------------------------------------------ approval


async def submit_for_approval(
    session: AsyncSession, cart_id: str, version: int, *, channel: ChannelRef, note: str, actor: str
) -> Cart:
    v = Violations()
    check_text(v, "note", note)
    v.raise_if_any("the request is invalid")
    row = await _bump(session, cart_id, version, channel.slug)
    state = CartState(row.state)
    check_editable(cart_id, state)
    if state not in EDITABLE:  # pragma: no cover - check_editable covers the others
        raise FailedPrecondition("INVALID_STATE_TRANSITION", f"cart {cart_id} is {state.value}")
    count = (
        await session.execute(
            text("SELECT count(*) FROM carts.cart_lines WHERE cart_id = :id"), {"id": row.id}
        )
    ).scalar_one()
    if not count:
        raise FailedPrecondition("CART_EMPTY", f"cart {cart_id} has no lines", metadata={"cart_id": cart_id})
    await session.execute(
        text(
            """UPDATE carts.carts SET state = 'pending_approval', submitted_by = :by, submitted_at = now(),
                   submit_note = :note, decision = NULL, decided_by = NULL, decided_at = NULL,
                   decision_reason = '', shortages = '[]'
               WHERE id = :id"""
        ),
        {"id": row.id, "by": actor, "note": note},
    )
    await _event(session, "cart.submitted_for_approval", row.id, channel.slug, submitted_by=actor)
    return await _reload(session, row.id, channel.slug)


async def _shortages(session: AsyncSession, row: Any, lines: Sequence[CartLine]) -> list[Shortage]:
    """What stock is missing for the lines right now. Nothing is kept: the probe
    gives back our own hold and reserves inside a savepoint that is always
    rolled back."""
    wanted: dict[str, int] = {}
    for x in lines:
        wanted[x.sku] = wanted.get(x.sku, 0) + x.quantity
    if row.hold_reservation_id is not None:
        hold = await inventory.get_reservation(session, row.hold_reservation_id)
        live = hold.state == "active" and (hold.expires_at is None or hold.expires_at > row.now)
        if live and _held_quantities(hold) == wanted:
            return []  # the stock is ours already
    nested = await session.begin_nested()
    try:
        await _release_if_held(session, row, reason="approval stock check", actor="")
        await inventory.reserve(
            session,
            [inventory.LineRequest(sku, q) for sku, q in wanted.items()],
            reference=f"cart:{row.id}:approval-check",
            actor="",
            source="cart",
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
    row = await _bump(session, cart_id, version, channel.slug)
    if CartState(row.state) is not CartState.PENDING_APPROVAL:
        raise FailedPrecondition(
            "INVALID_STATE_TRANSITION",
            f"cart {cart_id} is {row.state}, not pending_approval",
            metadata={"cart_id": cart_id, "state": row.state},
        )
    check_decider(cart_id, actor, row.submitted_by or "", row.created_by)
    shortages: list[Shortage] = []
    if approve:
        lines = (await _lines(session, [row.id], {row.id: row.currency}))[row.id]
        shortages = await _shortages(session, row, lines)
        state = CartState.APPROVED_BLOCKED_INVENTORY if shortages else CartState.APPROVED
    else:
        state = CartState.REJECTED
    await session.execute(
        text(
            """UPDATE carts.carts SET state = :state, decision = :d, decided_by = :by, decided_at = now(),
                   decision_reason = :reason, shortages = CAST(:short AS jsonb)
               WHERE id = :id"""
        ),
        {
            "id": row.id,
            "state": state.value,
            "d": "approve" if approve else "reject",
            "by": actor,
            "reason": reason,
            "short": _json([{"sku": s.sku, "description": s.description} for s in shortages]),
        },
    )
    await _event(session, "cart.approval_decided", row.id, channel.slug, state=state.value, decided_by=actor)
    return await _reload(session, row.id, channel.slug)


def _json(value: Any) -> str:
    return json.dumps(value)


# ------------------------------------------------------------------ checkout


def _held_quantities(res: inventory.Reservation) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in res.lines:
        if line.open_quantity:
            out[line.sku] = out.get(line.sku, 0) + line.open_quantity
    return out


async def _order_reservation(
    session: AsyncSession, row: Any, lines: Sequence[CartLine], *, actor: str
) -> inventory.Reservation:
    """The reservation the order adopts, without a TTL (an order's stock never expires).

    A live hold that covers exactly the lines is handed over as it is
    (inventory.retarget: no counter moves, no stock row locked). Otherwise the
    hold, if any, is released and the lines are reserved now, in this
    transaction (our released units stay locked against others in between)."""
    wanted: dict[str, int] = {}
    for x in lines:
        wanted[x.sku] = wanted.get(x.sku, 0) + x.quantity
    reference = f"cart:{row.id}"
    if row.hold_reservation_id is not None:
        if row.hold_expires_at is None or row.hold_expires_at > row.now:
            try:
                # retarget locks the hold and re-checks that it is active and unexpired.
                res = await inventory.retarget(
                    session, row.hold_reservation_id, reference=reference, ttl=None, actor=actor
                )
            except FailedPrecondition as err:
                # Expired or released meanwhile (the sweeper won): reserve below.
                if err.reason not in ("RESERVATION_EXPIRED", "RESERVATION_NOT_ACTIVE"):
                    raise
            else:
                if _held_quantities(res) == wanted:
                    return res
                # Partly released elsewhere (InventoryService): given back below, then reserved.
        await _release_if_held(session, row, reason="cart checked out", actor=actor)
    return await inventory.reserve(
        session,
        [inventory.LineRequest(sku, q) for sku, q in wanted.items()],
        reference=reference,
        ttl=None,
        actor=actor,
        source="cart",
    )


# Checkout runs on the driver connection (inside the session's transaction):
# it is the hot path, and every statement here runs while rows are locked.
#
# One statement bumps the cart (locking it) and reads its lines and their
# purchase limits. Reading the lines in the bump's snapshot is safe: every
# change of lines bumps the cart in its own transaction, so a concurrent
# change either committed before this snapshot or makes the bump match nothing.


def _checkout_bump(claiming: bool) -> str:
    """With `claiming`, the statement first makes the RPC's idempotency claim
    ($4..$7) and changes nothing unless the key is ours; it then always
    returns one row (`claimed`, and the cart columns when bumped)."""
    claim = f"{idempotency.claim_cte(4)}," if claiming else ""
    guard = "AND EXISTS (SELECT FROM claim)" if claiming else ""
    head = "(SELECT count(*) FROM claim) > 0 AS claimed," if claiming else ""
    source = "(SELECT) one LEFT JOIN b ON true" if claiming else "b"
    return f"""
    WITH {claim} b AS (
        UPDATE carts.carts SET version = version + 1, updated_at = now()
        WHERE id = $1 AND channel = $2 AND version = $3 {guard}
        RETURNING {_COLS}
    ), l AS (
        SELECT line_id, sku, quantity, unit_price_minor, line_no FROM carts.cart_lines WHERE cart_id = $1
    ), pl AS (
        SELECT sku, min_quantity, order_multiple, max_per_order, max_per_customer, updated_at
        FROM carts.purchase_limits WHERE channel = $2 AND sku IN (SELECT sku FROM l)
    )
    SELECT {head} b.*,
        ARRAY(SELECT line_id FROM l ORDER BY line_no) AS line_ids,
        ARRAY(SELECT sku FROM l ORDER BY line_no) AS line_skus,
        ARRAY(SELECT quantity FROM l ORDER BY line_no) AS line_quantities,
        ARRAY(SELECT unit_price_minor FROM l ORDER BY line_no) AS line_prices,
        ARRAY(SELECT row(sku, min_quantity, order_multiple, max_per_order, max_per_customer, updated_at)
              FROM pl ORDER BY sku) AS limits
    FROM {source}
"""


_CHECKOUT_BUMP = _checkout_bump(claiming=False)
_CHECKOUT_BUMP_CLAIMING = _checkout_bump(claiming=True)

# The purchase rows, the conversion and its event in one statement.
_CONVERT = DriverStatement(
    f"""
    WITH p AS (
        INSERT INTO carts.purchases (channel, customer_ref, sku, quantity, cart_id, order_id)
        SELECT :channel, :customer_ref, t.s, t.q, :cart_id, :order_id
        FROM unnest(CAST(:skus AS text[]), CAST(:quantities AS bigint[])) AS t(s, q)
    ), c AS (
        UPDATE carts.carts SET state = 'converted', order_id = :order_id, hold_reservation_id = NULL,
            hold_ttl_us = NULL, hold_expires_at = NULL
        WHERE id = :cart_id
    ), {outbox.cte()}
    SELECT 1
"""
)


class _CartRow(SimpleNamespace):
    """A cart row read on the driver connection, with the attribute access of a SQLAlchemy row."""


def _cart_row(record: Any) -> Any:
    row = _CartRow(**dict(record))
    if isinstance(row.shortages, str):  # jsonb arrives as text on the driver connection
        row.shortages = json.loads(row.shortages)
    return row


def _money_or_zero(m: Money | None, currency: str) -> Money:
    return m if m is not None else Money(currency, 0)


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
) -> CheckoutResult:
    """One transaction: any refusal leaves the cart, its hold and stock as they were.

    `claim`: the RPC's idempotency claim, made by the first statement (see
    idempotency.Claim); KeyTaken when its request_id was used before."""
    v = Violations()
    check_text(v, "external_order_id", external_order_id, 128)
    for i, p in enumerate(payments):
        for name in ("tender_id", "method", "gateway_reference"):
            check_text(v, f"payments[{i}].{name}", getattr(p, name), 256)
    v.raise_if_any("the checkout request is invalid")
    v = Violations()
    check_version(v, version)
    v.raise_if_any("the request is invalid")
    cid = _parse_id(cart_id)
    conn = await driver_connection(session)
    if claim is None:
        record = await conn.fetchrow(_CHECKOUT_BUMP, cid, channel.slug, version)
    else:
        record = await conn.fetchrow(_CHECKOUT_BUMP_CLAIMING, cid, channel.slug, version, *claim.params())
        assert record is not None
        claim.made(record["claimed"])  # KeyTaken when the request_id was used before
        if record["id"] is None:
            record = None
    if record is None:
        raise await _bump_refused(session, cart_id, cid, version, channel.slug)
    row = _cart_row(record)
    check_can_checkout(cart_id, CartState(row.state), row.approval_required)
    cur = row.currency
    lines = [
        CartLine(line_id, sku, int(q), Money(cur, int(p)))
        for line_id, sku, q, p in zip(
            row.line_ids, row.line_skus, row.line_quantities, row.line_prices, strict=True
        )
    ]
    if not lines:
        raise FailedPrecondition("CART_EMPTY", f"cart {cart_id} has no lines", metadata={"cart_id": cart_id})
    await _enforce_limits(
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
    sub = sum(x.line_total.amount_minor for x in lines)
    t, s, d = (_money_or_zero(m, cur) for m in (tax, shipping, discount))
    intent = order.Intent(
        intent_id=str(row.id),
        source_system=SOURCE_SYSTEM,
        lines=tuple(order.LineIn(x.line_id, x.sku, x.quantity, x.unit_price) for x in lines),
        totals=order.TotalsIn(
            subtotal=Money(cur, sub),
            tax=t,
            shipping=s,
            discount=d,
            grand_total=Money(cur, sub + t.amount_minor + s.amount_minor - d.amount_minor),
        ),
        payments=tuple(
            order.PaymentIn(p.tender_id, p.method, p.captured, p.gateway_reference) for p in payments
        ),
        external_order_id=external_order_id,
        customer_ref=row.customer_ref,
    )
    submitted = await order.submit_intent(
        session, intent, channel=channel, actor=actor, reservation_id=str(res.id)
    )
    if not submitted.created:
        # Only possible if the cart's intent was accepted before; never reuse it silently.
        raise FailedPrecondition(
            "CART_CONVERTED",
            f"cart {cart_id} was already turned into order {submitted.order.id}",
            metadata={"cart_id": cart_id, "order_id": submitted.order.id},
        )
    order_id = submitted.order.id
    # One statement for the purchase rows, the conversion and its event: this
    # runs while the stock rows are locked, so every round trip counts.
    converted = _cart_event(
        "cart.converted", row.id, channel.slug, order_id=order_id, reservation_id=str(res.id)
    )
    await _CONVERT.execute(
        conn,
        {
            "channel": channel.slug,
            "customer_ref": row.customer_ref,
            "cart_id": row.id,
            "order_id": order_id,
            "skus": [x.sku for x in lines],
            "quantities": [x.quantity for x in lines],
            **outbox.params(session, [converted]),
        },
    )
    cart = Cart(
        id=str(row.id),
        channel=row.channel,
        customer_ref=row.customer_ref,
        currency=cur,
        version=int(row.version),
        state=CartState.CONVERTED,
        lines=tuple(lines),
        approval_required=row.approval_required,
        hold=NO_HOLD,
        approval=_approval(row),
        order_id=order_id,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
    return CheckoutResult(cart, order_id, str(res.id))
