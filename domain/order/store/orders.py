"""Order rows with their lines and payments: finding, loading, listing, updating."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, exists, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from domain.order.models import OrderLineRow, OrderRow, PaymentRow, StatusEntryRow
from domain.order.rules import Severity, State
from domain.order.types import Line, Order, OrderFilter, Tender, Totals
from domain.shared.errors import NotFound
from domain.shared.money import Money


def not_found(order_id: str) -> NotFound:
    return NotFound("ORDER_NOT_FOUND", f"order {order_id!r} does not exist", metadata={"order_id": order_id})


def parse_id(order_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(order_id)
    except (ValueError, AttributeError, TypeError) as exc:
        raise not_found(order_id) from exc


async def order_row(
    session: AsyncSession, order_id: str, channel: str | None, *, lock: bool = False
) -> OrderRow:
    """The order's row (locked FOR UPDATE with `lock`), or ORDER_NOT_FOUND."""
    stmt = select(OrderRow).where(OrderRow.id == parse_id(order_id))
    if channel is not None:
        # Another channel's order is indistinguishable from a missing one.
        stmt = stmt.where(OrderRow.channel == channel)
    if lock:
        stmt = stmt.with_for_update()
    row = (await session.execute(stmt)).scalar_one_or_none()
    if row is None:
        raise not_found(order_id)
    return row


async def row_by_intent(session: AsyncSession, source_system: str, intent_id: str) -> OrderRow | None:
    stmt = select(OrderRow).where(OrderRow.source_system == source_system, OrderRow.intent_id == intent_id)
    return (await session.execute(stmt)).scalar_one_or_none()


async def row_by_external_id(
    session: AsyncSession, channel: str, source_system: str, external_order_id: str
) -> OrderRow | None:
    stmt = select(OrderRow).where(
        OrderRow.channel == channel,
        OrderRow.source_system == source_system,
        OrderRow.external_order_id == external_order_id,
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def order_lines(session: AsyncSession, order_id: uuid.UUID) -> list[OrderLineRow]:
    """The order's lines in position order."""
    stmt = select(OrderLineRow).where(OrderLineRow.order_id == order_id).order_by(OrderLineRow.position)
    return list((await session.execute(stmt)).scalars())


async def payments(session: AsyncSession, order_id: uuid.UUID) -> list[PaymentRow]:
    return list((await session.execute(select(PaymentRow).where(PaymentRow.order_id == order_id))).scalars())


async def load(session: AsyncSession, row: OrderRow) -> Order:
    """The order of `row` with its lines, payments and whether it is blocked."""
    lines = await order_lines(session, row.id)
    pays = (
        await session.execute(
            select(PaymentRow).where(PaymentRow.order_id == row.id).order_by(PaymentRow.position)
        )
    ).scalars()
    blocked = bool(
        (
            await session.execute(
                select(
                    exists().where(
                        StatusEntryRow.order_id == row.id,
                        StatusEntryRow.severity == Severity.BLOCKING.value,
                        StatusEntryRow.closed_at.is_(None),
                    )
                )
            )
        ).scalar()
    )
    reissues = await reissue_ids_of(session, [row.id])
    return to_order(row, lines, list(pays), blocked, reissues[row.id])


async def reissue_ids_of(session: AsyncSession, ids: list[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    """The orders reissued from each of `ids`, oldest first."""
    found: dict[uuid.UUID, list[str]] = {i: [] for i in ids}
    stmt = (
        select(OrderRow.reissued_from_order_id, OrderRow.id)
        .where(OrderRow.reissued_from_order_id.in_(ids))
        .order_by(OrderRow.created_at, OrderRow.id)
    )
    for original, reissue in (await session.execute(stmt)).all():
        if original is not None:
            found[original].append(str(reissue))
    return found


async def reissue_count(session: AsyncSession, order_id: uuid.UUID) -> int:
    stmt = select(func.count()).where(OrderRow.reissued_from_order_id == order_id)
    return int((await session.execute(stmt)).scalar_one())


def to_order(
    row: OrderRow,
    lines: list[OrderLineRow],
    pays: list[PaymentRow],
    blocked: bool,
    reissue_ids: list[str] | None = None,
) -> Order:
    currency = row.currency
    return Order(
        id=str(row.id),
        channel=row.channel,
        source_system=row.source_system,
        intent_id=row.intent_id,
        external_order_id=row.external_order_id,
        customer_ref=row.customer_ref,
        currency=currency,
        state=State(row.state),
        lines=tuple(
            Line(
                li.line_id,
                li.sku,
                li.quantity,
                Money(currency, li.unit_price_minor),
                li.shipped_quantity,
                li.refunded_quantity,
            )
            for li in lines
        ),
        totals=Totals(
            Money(currency, row.subtotal_minor),
            Money(currency, row.tax_minor),
            Money(currency, row.shipping_minor),
            Money(currency, row.discount_minor),
            Money(currency, row.grand_total_minor),
        ),
        payments=tuple(
            Tender(
                p.tender_id,
                p.method,
                Money(currency, p.captured_minor),
                p.gateway_reference,
                Money(currency, p.refunded_minor),
            )
            for p in pays
        ),
        submitted_at=row.submitted_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
        reservation_id=row.reservation_id,
        blocked=blocked,
        reissued_from_order_id=str(row.reissued_from_order_id or ""),
        reissue_reason=row.reissue_reason,
        reissue_order_ids=tuple(reissue_ids or ()),
        external_handoff_reference=row.external_handoff_reference or "",
        external_handoff_acknowledged_at=row.external_handoff_acknowledged_at,
        inventory_risk=row.inventory_risk,
    )


# An open BLOCKING entry exists for the order of the enclosing query.
_BLOCKED = exists().where(
    StatusEntryRow.order_id == OrderRow.id,
    StatusEntryRow.severity == Severity.BLOCKING.value,
    StatusEntryRow.closed_at.is_(None),
)


def _filtered(stmt: Select[OrderRow, bool], filters: OrderFilter) -> Select[OrderRow, bool]:
    if filters.states:
        stmt = stmt.where(OrderRow.state.in_([s.value for s in filters.states]))
    if filters.customer_ref:
        stmt = stmt.where(OrderRow.customer_ref == filters.customer_ref)
    if filters.source_system:
        stmt = stmt.where(OrderRow.source_system == filters.source_system)
    if filters.start:
        stmt = stmt.where(OrderRow.created_at >= filters.start)
    if filters.end:
        stmt = stmt.where(OrderRow.created_at < filters.end)
    if filters.blocked_only:
        stmt = stmt.where(_BLOCKED)
    if filters.inventory_risk_only:
        stmt = stmt.where(OrderRow.inventory_risk)
    if filters.handoff_unacknowledged_for is not None:
        stmt = stmt.where(
            OrderRow.external_handoff_acknowledged_at.is_(None),
            OrderRow.created_at <= func.now() - filters.handoff_unacknowledged_for,
        )
    return stmt


async def newest_orders(
    session: AsyncSession,
    *,
    channel: str,
    filters: OrderFilter,
    before: tuple[datetime, uuid.UUID] | None,
    size: int,
) -> tuple[list[Order], bool]:
    """Up to `size` orders of `channel` matching `filters`, newest first by
    (created_at, id), those after the keyset position `before` only; and
    whether more follow."""
    stmt = _filtered(select(OrderRow, _BLOCKED.label("blocked")).where(OrderRow.channel == channel), filters)
    if before is not None:
        at, last_id = before
        stmt = stmt.where((OrderRow.created_at < at) | and_(OrderRow.created_at == at, OrderRow.id < last_id))
    stmt = stmt.order_by(OrderRow.created_at.desc(), OrderRow.id.desc()).limit(size + 1)
    rows = list((await session.execute(stmt)).all())
    more = len(rows) > size
    rows = rows[:size]
    if not rows:
        return [], more
    ids = [r[0].id for r in rows]
    lines, pays = await _lines_and_payments(session, ids)
    reissues = await reissue_ids_of(session, ids)
    return [to_order(r, lines[r.id], pays[r.id], bool(blocked), reissues[r.id]) for r, blocked in rows], more


async def oldest_rows(
    session: AsyncSession,
    *,
    channel: str | None,
    since: datetime | None,
    after: tuple[datetime, uuid.UUID] | None,
    size: int,
) -> tuple[list[tuple[OrderRow, list[OrderLineRow], list[PaymentRow]]], bool]:
    """Up to `size` order rows with their lines and payments, oldest first by
    (created_at, id) after `after` (of `channel`, created at or after `since`,
    when given); and whether more follow."""
    stmt = select(OrderRow)
    if channel is not None:
        stmt = stmt.where(OrderRow.channel == channel)
    if since is not None:
        stmt = stmt.where(OrderRow.created_at >= since)
    if after is not None:
        at, last_id = after
        stmt = stmt.where((OrderRow.created_at > at) | and_(OrderRow.created_at == at, OrderRow.id > last_id))
    rows = list(
        (await session.execute(stmt.order_by(OrderRow.created_at, OrderRow.id).limit(size + 1))).scalars()
    )
    more = len(rows) > size
    rows = rows[:size]
    lines, pays = await _lines_and_payments(session, [r.id for r in rows])
    return [(r, lines[r.id], pays[r.id]) for r in rows], more


async def _lines_and_payments(
    session: AsyncSession, ids: list[uuid.UUID]
) -> tuple[dict[uuid.UUID, list[OrderLineRow]], dict[uuid.UUID, list[PaymentRow]]]:
    """The lines and the payments of each of `ids`, in position order."""
    lines: dict[uuid.UUID, list[OrderLineRow]] = {i: [] for i in ids}
    pays: dict[uuid.UUID, list[PaymentRow]] = {i: [] for i in ids}
    if not ids:
        return lines, pays
    stmt = select(OrderLineRow).where(OrderLineRow.order_id.in_(ids)).order_by(OrderLineRow.position)
    for li in (await session.execute(stmt)).scalars():
        lines[li.order_id].append(li)
    pay_stmt = select(PaymentRow).where(PaymentRow.order_id.in_(ids)).order_by(PaymentRow.position)
    for p in (await session.execute(pay_stmt)).scalars():
        pays[p.order_id].append(p)
    return lines, pays


async def update_order(session: AsyncSession, row: OrderRow, **values: Any) -> None:
    """Sets `values` and updated_at on the order, and on `row` as loaded."""
    # Core UPDATE ... RETURNING, then mark the loaded row as current without
    # making it dirty (a later flush would write it again).
    keys = (
        "state",
        "reservation_id",
        "updated_at",
        *(k for k in values if k not in ("state", "reservation_id")),
    )
    result = (
        await session.execute(
            update(OrderRow)
            .where(OrderRow.id == row.id)
            .values(updated_at=func.now(), **values)
            .returning(*(getattr(OrderRow, k) for k in keys))
            .execution_options(synchronize_session=False)
        )
    ).one()
    for key in keys:
        set_committed_value(row, key, getattr(result, key))


# The order's inventory risk after its reservation changed: a line still to
# ship that the reservation no longer covers (released, expired, short) or
# covers with backordered units. Only orders still to ship can be at risk.
_RISK_FROM_RESERVATIONS = text(
    """
    WITH c AS (
        SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:states AS text[]), CAST(:open AS bigint[]),
                             CAST(:backordered AS bigint[])) AS c(reservation_id, state, open, backordered)
    ), computed AS (
        SELECT o.id, (o.state IN ('pending', 'processing', 'partially_shipped') AND left_to_ship.n > 0
                      AND (c.state <> 'active' OR c.open < left_to_ship.n OR c.backordered > 0)) AS risk
        FROM orders.orders o JOIN c ON c.reservation_id = o.reservation_id
        CROSS JOIN LATERAL (SELECT coalesce(sum(quantity - shipped_quantity), 0) AS n
                            FROM orders.order_lines WHERE order_id = o.id) AS left_to_ship
    )
    UPDATE orders.orders o SET inventory_risk = computed.risk, updated_at = now()
    FROM computed WHERE o.id = computed.id AND o.inventory_risk IS DISTINCT FROM computed.risk
    """
)


async def set_risk_from_reservations(
    session: AsyncSession, changes: Sequence[tuple[str, str, int, int]]
) -> None:
    """(reservation_id, state, open quantity, backordered open quantity) of changed reservations."""
    await session.execute(
        _RISK_FROM_RESERVATIONS,
        {
            "ids": [c[0] for c in changes],
            "states": [c[1] for c in changes],
            "open": [c[2] for c in changes],
            "backordered": [c[3] for c in changes],
        },
    )


async def refresh_risk(session: AsyncSession, row: OrderRow) -> None:
    """Reads `inventory_risk` again into `row` (inventory's observer may have changed it)."""
    risk = (await session.execute(select(OrderRow.inventory_risk).where(OrderRow.id == row.id))).scalar_one()
    set_committed_value(row, "inventory_risk", risk)


async def quantity_left_to_ship(session: AsyncSession, order_id: uuid.UUID) -> int:
    stmt = select(func.coalesce(func.sum(OrderLineRow.quantity - OrderLineRow.shipped_quantity), 0)).where(
        OrderLineRow.order_id == order_id
    )
    return int((await session.execute(stmt)).scalar_one())
