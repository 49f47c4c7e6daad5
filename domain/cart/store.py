"""Every statement of the cart module (schema `carts`).

Data access. SQL text with named parameters (`:name`) everywhere: run through
the session as text() statements, except CheckoutCart's two statements
(`bump_for_checkout`, `convert`), which run on the session's asyncpg
connection (domain.shared.db.driver_connection, same transaction) because
checkout holds stock rows locked meanwhile. Rows come back with attribute
access (`row.state`) either way.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.cart.rules import ApprovedLine, CartState, Limit, LineDraft, Shortage, approved_total
from domain.cart.types import CartLine
from domain.platform import idempotency
from domain.shared import outbox
from domain.shared.db import DriverStatement, driver_connection
from domain.shared.money import Money
from domain.shared.outbox import Event

if TYPE_CHECKING:
    # Not at run time: Temporal's workflow sandbox re-imports domain modules (see domain.shared.db).
    import asyncpg

# A cart row as every read of it returns it, with the database's now().
CART_COLUMNS = """id, channel, customer_ref, currency, version, state, approval_required, created_by, next_line_no,
           hold_reservation_id, hold_ttl_us, hold_expires_at, submitted_by, submitted_at, submit_note,
           decision, decided_by, decided_at, decision_reason, shortages, order_id, created_at, updated_at,
           approved_grand_total_minor, approved_lines, now() AS now"""

# ------------------------------------------------------------------ carts

_BUMP_VERSION = text(
    f"""UPDATE carts.carts SET version = version + 1, updated_at = now()
        WHERE id = :cart_id AND channel = :channel AND version = :version RETURNING {CART_COLUMNS}"""
)
_CURRENT_VERSION = text("SELECT version FROM carts.carts WHERE id = :cart_id AND channel = :channel")
_CART = text(f"SELECT {CART_COLUMNS} FROM carts.carts WHERE id = :cart_id AND channel = :channel")


async def bump_version(session: AsyncSession, cart_id: uuid.UUID, channel: str, version: int) -> Any:
    """The cart row with its version bumped (and locked) when it is at `version`, or None."""
    params = {"cart_id": cart_id, "channel": channel, "version": version}
    return (await session.execute(_BUMP_VERSION, params)).one_or_none()


async def current_version(session: AsyncSession, cart_id: uuid.UUID, channel: str) -> int | None:
    params = {"cart_id": cart_id, "channel": channel}
    version: int | None = (await session.execute(_CURRENT_VERSION, params)).scalar_one_or_none()
    return version


async def cart_row(session: AsyncSession, cart_id: uuid.UUID, channel: str) -> Any:
    """The cart row, or None."""
    return (await session.execute(_CART, {"cart_id": cart_id, "channel": channel})).one_or_none()


async def database_now(session: AsyncSession) -> datetime:
    now: datetime = (await session.execute(text("SELECT now()"))).scalar_one()
    return now


async def insert_cart(
    session: AsyncSession,
    cart_id: uuid.UUID,
    *,
    channel: str,
    customer_ref: str,
    currency: str,
    approval_required: bool,
    created_by: str,
    drafts: Sequence[LineDraft],
) -> None:
    """A new cart with its lines numbered ln-1, ln-2, ... in order."""
    await session.execute(
        text(
            """INSERT INTO carts.carts (id, channel, customer_ref, currency, approval_required, created_by,
                                       next_line_no)
               VALUES (:cart_id, :channel, :customer_ref, :currency, :approval_required, :created_by,
                       :next_line_no)"""
        ),
        {
            "cart_id": cart_id,
            "channel": channel,
            "customer_ref": customer_ref,
            "currency": currency,
            "approval_required": approval_required,
            "created_by": created_by,
            "next_line_no": len(drafts) + 1,
        },
    )
    if drafts:
        await session.execute(
            text(
                """INSERT INTO carts.cart_lines (cart_id, line_id, line_no, sku, quantity, unit_price_minor)
                   SELECT :cart_id, 'ln-' || line_no, line_no, sku, quantity, unit_price_minor
                   FROM unnest(CAST(:skus AS text[]), CAST(:quantities AS bigint[]),
                               CAST(:unit_prices AS bigint[]))
                        WITH ORDINALITY AS new_line(sku, quantity, unit_price_minor, line_no)"""
            ),
            {
                "cart_id": cart_id,
                "skus": [d.sku for d in drafts],
                "quantities": [d.quantity for d in drafts],
                "unit_prices": [d.unit_price.amount_minor for d in drafts],
            },
        )


async def carts_page(
    session: AsyncSession,
    *,
    channel: str,
    customer_ref: str,
    state: CartState | None,
    before: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[Any]:
    """Up to `limit` cart rows newest first by (created_at, id), after the keyset position `before`."""
    where = ["channel = :channel"]
    params: dict[str, Any] = {"channel": channel, "limit": limit}
    if customer_ref:
        where.append("customer_ref = :customer_ref")
        params["customer_ref"] = customer_ref
    if state is not None:
        where.append("state = :state")
        params["state"] = state.value
    if before is not None:
        params["before_created_at"], params["before_id"] = before
        where.append("(created_at, id) < (:before_created_at, :before_id)")
    sql = (
        f"SELECT {CART_COLUMNS} FROM carts.carts WHERE {' AND '.join(where)}"
        " ORDER BY created_at DESC, id DESC LIMIT :limit"
    )
    return list((await session.execute(text(sql), params)).all())


async def reopen(session: AsyncSession, cart_id: uuid.UUID) -> None:
    """A rejected or approved cart becomes active again (an edit starts over)."""
    await session.execute(
        text("UPDATE carts.carts SET state = 'active' WHERE id = :cart_id"), {"cart_id": cart_id}
    )


# ------------------------------------------------------------------ lines

_LINES = text(
    """SELECT cart_id, line_id, sku, quantity, unit_price_minor FROM carts.cart_lines
       WHERE cart_id = ANY(CAST(:cart_ids AS uuid[])) ORDER BY cart_id, line_no"""
)


async def lines_of(
    session: AsyncSession, cart_ids: Sequence[uuid.UUID], currency: dict[uuid.UUID, str]
) -> dict[uuid.UUID, list[CartLine]]:
    """The lines of each cart in line order, priced in its currency."""
    out: dict[uuid.UUID, list[CartLine]] = {i: [] for i in cart_ids}
    if not cart_ids:
        return out
    for r in (await session.execute(_LINES, {"cart_ids": list(cart_ids)})).all():
        out[r.cart_id].append(
            CartLine(r.line_id, r.sku, int(r.quantity), Money(currency[r.cart_id], int(r.unit_price_minor)))
        )
    return out


async def line_count(session: AsyncSession, cart_id: uuid.UUID) -> int:
    stmt = text("SELECT count(*) FROM carts.cart_lines WHERE cart_id = :cart_id")
    return int((await session.execute(stmt, {"cart_id": cart_id})).scalar_one())


async def line_count_and_line_of(
    session: AsyncSession, cart_id: uuid.UUID, sku: str
) -> tuple[int, str | None]:
    """How many lines the cart has, and the line that already holds `sku` (or None)."""
    stmt = text(
        """SELECT count(*) AS line_count, max(line_id) FILTER (WHERE sku = :sku) AS sku_line_id
           FROM carts.cart_lines WHERE cart_id = :cart_id"""
    )
    row = (await session.execute(stmt, {"cart_id": cart_id, "sku": sku})).one()
    return int(row.line_count), row.sku_line_id


async def insert_line(session: AsyncSession, cart_id: uuid.UUID, line_no: int, draft: LineDraft) -> str:
    """Adds line `ln-<line_no>` and advances the cart's next line number; the new line's id."""
    line_id = f"ln-{line_no}"
    await session.execute(
        text(
            """INSERT INTO carts.cart_lines (cart_id, line_id, line_no, sku, quantity, unit_price_minor)
               VALUES (:cart_id, :line_id, :line_no, :sku, :quantity, :unit_price)"""
        ),
        {
            "cart_id": cart_id,
            "line_id": line_id,
            "line_no": line_no,
            "sku": draft.sku,
            "quantity": draft.quantity,
            "unit_price": draft.unit_price.amount_minor,
        },
    )
    await session.execute(
        text("UPDATE carts.carts SET next_line_no = next_line_no + 1 WHERE id = :cart_id"),
        {"cart_id": cart_id},
    )
    return line_id


async def update_line(
    session: AsyncSession, cart_id: uuid.UUID, line_id: str, *, quantity: int | None, unit_price: int | None
) -> bool:
    """Sets the line's quantity and/or unit price (None: unchanged); whether the line exists."""
    result = await session.execute(
        text(
            """UPDATE carts.cart_lines SET
                   quantity = CASE WHEN :set_quantity THEN :quantity ELSE quantity END,
                   unit_price_minor = CASE WHEN :set_unit_price THEN :unit_price ELSE unit_price_minor END
               WHERE cart_id = :cart_id AND line_id = :line_id RETURNING line_id"""
        ),
        {
            "cart_id": cart_id,
            "line_id": line_id,
            "set_quantity": quantity is not None,
            "quantity": quantity or 0,
            "set_unit_price": unit_price is not None,
            "unit_price": unit_price or 0,
        },
    )
    return result.one_or_none() is not None


async def delete_line(session: AsyncSession, cart_id: uuid.UUID, line_id: str) -> bool:
    """Removes the line; whether it existed."""
    result = await session.execute(
        text(
            "DELETE FROM carts.cart_lines WHERE cart_id = :cart_id AND line_id = :line_id RETURNING line_id"
        ),
        {"cart_id": cart_id, "line_id": line_id},
    )
    return result.one_or_none() is not None


# ------------------------------------------------------------------ holds


async def set_hold(
    session: AsyncSession,
    cart_id: uuid.UUID,
    reservation_id: uuid.UUID | None,
    ttl: timedelta | None,
    expires_at: datetime | None,
) -> None:
    """Records the cart's hold (all None: no hold)."""
    await session.execute(
        text(
            """UPDATE carts.carts SET hold_reservation_id = :reservation_id, hold_ttl_us = :ttl_us,
                   hold_expires_at = :expires_at
               WHERE id = :cart_id"""
        ),
        {
            "cart_id": cart_id,
            "reservation_id": reservation_id,
            "ttl_us": None if ttl is None else ttl // timedelta(microseconds=1),
            "expires_at": expires_at,
        },
    )


# ------------------------------------------------------------------ approval


async def mark_submitted(session: AsyncSession, cart_id: uuid.UUID, *, submitted_by: str, note: str) -> None:
    """The cart waits for approval; any earlier decision is cleared."""
    await session.execute(
        text(
            """UPDATE carts.carts SET state = 'pending_approval', submitted_by = :submitted_by,
                   submitted_at = now(), submit_note = :note, decision = NULL, decided_by = NULL,
                   decided_at = NULL, decision_reason = '', shortages = '[]',
                   approved_grand_total_minor = NULL, approved_lines = NULL
               WHERE id = :cart_id"""
        ),
        {"cart_id": cart_id, "submitted_by": submitted_by, "note": note},
    )


async def record_decision(
    session: AsyncSession,
    cart_id: uuid.UUID,
    *,
    state: CartState,
    approve: bool,
    decided_by: str,
    reason: str,
    shortages: Sequence[Shortage],
    approved: Sequence[ApprovedLine] | None,
) -> None:
    """The decision; `approved`: the lines an approval approved (None for a rejection)."""
    await session.execute(
        text(
            """UPDATE carts.carts SET state = :state, decision = :decision, decided_by = :decided_by,
                   decided_at = now(), decision_reason = :reason, shortages = CAST(:shortages AS jsonb),
                   approved_grand_total_minor = :approved_total, approved_lines = CAST(:approved AS jsonb)
               WHERE id = :cart_id"""
        ),
        {
            "approved_total": None if approved is None else approved_total(approved),
            "approved": None
            if approved is None
            else json.dumps(
                [
                    {
                        "line_id": x.line_id,
                        "sku": x.sku,
                        "quantity": x.quantity,
                        "unit_price_minor": x.unit_price_minor,
                    }
                    for x in approved
                ]
            ),
            "cart_id": cart_id,
            "state": state.value,
            "decision": "approve" if approve else "reject",
            "decided_by": decided_by,
            "reason": reason,
            "shortages": json.dumps([{"sku": s.sku, "description": s.description} for s in shortages]),
        },
    )


# ------------------------------------------------------------------ purchase limits

_LIMITS = text(
    """SELECT sku, min_quantity, order_multiple, max_per_order, max_per_customer, updated_at
       FROM carts.purchase_limits WHERE channel = :channel AND sku = ANY(CAST(:skus AS text[]))"""
)
_BOUGHT = text(
    """SELECT sku, sum(quantity) AS quantity FROM carts.purchases
       WHERE channel = :channel AND customer_ref = :customer_ref AND sku = ANY(CAST(:skus AS text[]))
         AND purchased_at >= :since
       GROUP BY sku"""
)
# One advisory lock per (channel, customer, sku), taken in key order so two
# checkouts never wait on each other in a cycle. Collisions only serialize more.
_LOCK_CUSTOMER_SKUS = text(
    """SELECT count(pg_advisory_xact_lock(lock_key)) FROM (
           SELECT DISTINCT hashtextextended(:channel || chr(31) || :customer_ref || chr(31) || sku, 0) AS lock_key
           FROM unnest(CAST(:skus AS text[])) AS sku ORDER BY 1) AS lock_keys"""
)


def to_limit(r: Any) -> Limit:
    return Limit(
        r.sku,
        int(r.min_quantity),
        int(r.order_multiple),
        int(r.max_per_order),
        int(r.max_per_customer),
        r.updated_at,
    )


async def purchase_limits(session: AsyncSession, channel: str, skus: Sequence[str]) -> dict[str, Limit]:
    rows = (await session.execute(_LIMITS, {"channel": channel, "skus": list(skus)})).all()
    return {r.sku: to_limit(r) for r in rows}


async def lock_customer_skus(
    session: AsyncSession, channel: str, customer_ref: str, skus: Sequence[str]
) -> None:
    """Locks (channel, customer, sku) for each SKU until commit."""
    await session.execute(
        _LOCK_CUSTOMER_SKUS, {"channel": channel, "customer_ref": customer_ref, "skus": list(skus)}
    )


async def bought_since(
    session: AsyncSession, channel: str, customer_ref: str, skus: Sequence[str], since: datetime
) -> dict[str, int]:
    """Units of each SKU the customer bought in `channel` since `since` (SKUs never bought are absent)."""
    params = {"channel": channel, "customer_ref": customer_ref, "skus": list(skus), "since": since}
    return {r.sku: int(r.quantity) for r in (await session.execute(_BOUGHT, params)).all()}


async def upsert_purchase_limit(session: AsyncSession, channel: str, limit: Limit) -> Limit:
    row = (
        await session.execute(
            text(
                """INSERT INTO carts.purchase_limits
                       (channel, sku, min_quantity, order_multiple, max_per_order, max_per_customer)
                   VALUES (:channel, :sku, :min_quantity, :order_multiple, :max_per_order, :max_per_customer)
                   ON CONFLICT (channel, sku) DO UPDATE SET min_quantity = EXCLUDED.min_quantity,
                       order_multiple = EXCLUDED.order_multiple, max_per_order = EXCLUDED.max_per_order,
                       max_per_customer = EXCLUDED.max_per_customer, updated_at = now()
                   RETURNING sku, min_quantity, order_multiple, max_per_order, max_per_customer, updated_at"""
            ),
            {
                "channel": channel,
                "sku": limit.sku,
                "min_quantity": limit.min_quantity,
                "order_multiple": limit.order_multiple,
                "max_per_order": limit.max_per_order,
                "max_per_customer": limit.max_per_customer,
            },
        )
    ).one()
    return to_limit(row)


# ------------------------------------------------------------------ checkout (driver connection)
#
# One statement bumps the cart (locking it) and reads its lines and their
# purchase limits. Reading the lines in the bump's snapshot is safe: every
# change of lines bumps the cart in its own transaction, so a concurrent
# change either committed before this snapshot or makes the bump match nothing.


def _checkout_bump(claiming: bool) -> DriverStatement:
    """With `claiming`, the statement first makes the RPC's idempotency claim
    (its parameters follow the three named ones) and changes nothing unless the
    key is ours; it then always returns one row (`claimed`, and the cart
    columns when bumped)."""
    claim = f"{idempotency.claim_cte(4)}," if claiming else ""
    guard = "AND EXISTS (SELECT FROM claim)" if claiming else ""
    head = "(SELECT count(*) FROM claim) > 0 AS claimed," if claiming else ""
    source = "(SELECT) AS one_row LEFT JOIN bumped ON true" if claiming else "bumped"
    statement = DriverStatement(f"""
    WITH {claim} bumped AS (
        UPDATE carts.carts SET version = version + 1, updated_at = now()
        WHERE id = :cart_id AND channel = :channel AND version = :version {guard}
        RETURNING {CART_COLUMNS}
    ), lines AS (
        SELECT line_id, sku, quantity, unit_price_minor, line_no FROM carts.cart_lines WHERE cart_id = :cart_id
    ), sku_limits AS (
        SELECT sku, min_quantity, order_multiple, max_per_order, max_per_customer, updated_at
        FROM carts.purchase_limits WHERE channel = :channel AND sku IN (SELECT sku FROM lines)
    )
    SELECT {head} bumped.*,
        ARRAY(SELECT line_id FROM lines ORDER BY line_no) AS line_ids,
        ARRAY(SELECT sku FROM lines ORDER BY line_no) AS line_skus,
        ARRAY(SELECT quantity FROM lines ORDER BY line_no) AS line_quantities,
        ARRAY(SELECT unit_price_minor FROM lines ORDER BY line_no) AS line_prices,
        ARRAY(SELECT row(sku, min_quantity, order_multiple, max_per_order, max_per_customer, updated_at)
              FROM sku_limits ORDER BY sku) AS limits
    FROM {source}
""")
    assert statement.names == ("cart_id", "channel", "version")  # $1..$3; the claim's are $4..$7
    return statement


_CHECKOUT_BUMP = _checkout_bump(claiming=False)
_CHECKOUT_BUMP_CLAIMING = _checkout_bump(claiming=True)

# The purchase rows, the conversion and its event in one statement, with the
# RPC's idempotency answer (idempotency.Claim.answers; none without a request_id).
_CONVERT = DriverStatement(f"""
    WITH p AS (
        INSERT INTO carts.purchases (channel, customer_ref, sku, quantity, cart_id, order_id)
        SELECT :channel, :customer_ref, t.s, t.q, :cart_id, :order_id
        FROM unnest(CAST(:skus AS text[]), CAST(:quantities AS bigint[])) AS t(s, q)
    ), c AS (
        UPDATE carts.carts SET state = 'converted', order_id = :order_id, hold_reservation_id = NULL,
            hold_ttl_us = NULL, hold_expires_at = NULL
        WHERE id = :cart_id
    ), {outbox.cte()}, answers AS ({idempotency.BATCH_STORE})
    SELECT 1
""")


class _CartRow(SimpleNamespace):
    """A cart row read on the driver connection, with the attribute access of a SQLAlchemy row."""


def _cart_row(record: asyncpg.Record) -> Any:
    row = _CartRow(**dict(record))
    if isinstance(row.shortages, str):  # jsonb arrives as text on the driver connection
        row.shortages = json.loads(row.shortages)
    return row


async def bump_for_checkout(
    session: AsyncSession, cart_id: uuid.UUID, channel: str, version: int, claim: idempotency.Claim | None
) -> Any:
    """The cart row bumped as `bump_version` does, with its lines (line_ids,
    line_skus, line_quantities, line_prices) and their purchase limits
    (limits), or None. With `claim`, makes the RPC's idempotency claim first
    (KeyTaken when its request_id was used before)."""
    conn = await driver_connection(session)
    params: dict[str, object] = {"cart_id": cart_id, "channel": channel, "version": version}
    if claim is None:
        record = await conn.fetchrow(_CHECKOUT_BUMP.sql, *_CHECKOUT_BUMP.args(params))
    else:
        statement = _CHECKOUT_BUMP_CLAIMING
        record = await conn.fetchrow(statement.sql, *statement.args(params), *claim.params())
        assert record is not None
        claim.made(record["claimed"])  # KeyTaken when the request_id was used before
        if record["id"] is None:
            record = None
    return None if record is None else _cart_row(record)


async def convert(
    session: AsyncSession,
    row: Any,
    *,
    channel: str,
    order_id: str,
    lines: Sequence[CartLine],
    converted: Event,
    answers: idempotency.Answers,
) -> None:
    """The purchase rows, the conversion to `order_id` (the hold is the
    order's now), its event `converted` and `answers`, in one statement."""
    conn = await driver_connection(session)
    await _CONVERT.execute(
        conn,
        {
            "channel": channel,
            "customer_ref": row.customer_ref,
            "cart_id": row.id,
            "order_id": order_id,
            "skus": [x.sku for x in lines],
            "quantities": [x.quantity for x in lines],
            **outbox.params(session, [converted]),
            **answers.params(),
        },
    )
