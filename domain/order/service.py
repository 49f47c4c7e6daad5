"""Order service functions: `async def f(session, ...)`, one transaction owned by the caller."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, insert, select, update
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from domain.order.inventory_port import DEFAULT_INVENTORY, InventoryPort, StockLine
from domain.order.models import (
    OrderLineRow,
    OrderRow,
    PaymentRow,
    RefundRow,
    ShipmentLineRow,
    ShipmentRow,
    StatusEntryRow,
)
from domain.order.rules import (
    TRANSITION_TARGETS,
    Intent,
    Severity,
    State,
    StatusIn,
    canonical_content,
    check_transition,
    content_hash,
    differing_fields,
    validate_intent,
    validate_status,
)
from domain.shared import outbox
from domain.shared.caller import Caller, ChannelRef
from domain.shared.db import DriverStatement, driver_connection
from domain.shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    Violations,
)
from domain.shared.money import Money
from domain.shared.outbox import Event
from domain.shared.pagination import decode_token, encode_token, page_size

# Outbox topics (WatchOrderEvents tails these).
CREATED = "order.created"
TRANSITIONED = "order.transitioned"
STATUS_APPENDED = "order.status_appended"
STATUS_CLOSED = "order.status_closed"
TOPICS = (CREATED, TRANSITIONED, STATUS_APPENDED, STATUS_CLOSED)


# ---------------------------------------------------------------- read models


@dataclass(frozen=True)
class Line:
    line_id: str
    sku: str
    quantity: int
    unit_price: Money
    shipped_quantity: int
    refunded_quantity: int

    @property
    def line_total(self) -> Money:
        return Money(self.unit_price.currency, self.unit_price.amount_minor * self.quantity)

    @property
    def remaining_quantity(self) -> int:
        return self.quantity - self.shipped_quantity


@dataclass(frozen=True)
class Tender:
    tender_id: str
    method: str
    captured: Money
    gateway_reference: str
    refunded: Money


@dataclass(frozen=True)
class Totals:
    subtotal: Money
    tax: Money
    shipping: Money
    discount: Money
    grand_total: Money


@dataclass(frozen=True)
class Order:
    id: str
    channel: str
    source_system: str
    intent_id: str
    external_order_id: str
    customer_ref: str
    currency: str
    state: State
    lines: tuple[Line, ...]
    totals: Totals
    payments: tuple[Tender, ...]
    submitted_at: datetime
    created_at: datetime
    updated_at: datetime
    reservation_id: str | None
    blocked: bool

    @property
    def captured(self) -> Money:
        return Money(self.currency, sum(p.captured.amount_minor for p in self.payments))


@dataclass(frozen=True)
class SubmitResult:
    order: Order
    created: bool


@dataclass(frozen=True)
class StatusEntry:
    id: int
    order_id: str
    code: str
    module: str
    category: str
    severity: Severity
    payload: dict[str, Any]
    recorded_at: datetime
    written_by: str
    created_at: datetime
    closed_at: datetime | None
    closed_by: str | None
    close_note: str | None

    @property
    def open(self) -> bool:
        return self.closed_at is None


@dataclass(frozen=True)
class StatusSummary:
    order_id: str
    state: State
    latest_by_module: tuple[StatusEntry, ...]
    open_blocking: tuple[StatusEntry, ...]


@dataclass(frozen=True)
class Shipment:
    id: str
    order_id: str
    lines: tuple[tuple[str, int], ...]
    tracking_number: str
    carrier: str
    created_at: datetime


@dataclass(frozen=True)
class ShipmentStatus:
    order_id: str
    state: State
    lines: tuple[Line, ...]
    shipments: tuple[Shipment, ...]


@dataclass(frozen=True)
class RefundRecord:
    order_id: str
    refund_id: str
    lines: dict[str, int]
    amounts: dict[str, int]
    created_at: datetime


# ---------------------------------------------------------------- helpers


def _parse_id(order_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(order_id)
    except (ValueError, AttributeError, TypeError) as exc:
        raise NotFound(
            "ORDER_NOT_FOUND", f"order {order_id!r} does not exist", metadata={"order_id": order_id}
        ) from exc


def _not_found(order_id: str) -> NotFound:
    return NotFound("ORDER_NOT_FOUND", f"order {order_id!r} does not exist", metadata={"order_id": order_id})


def _entry(row: StatusEntryRow) -> StatusEntry:
    return StatusEntry(
        id=row.id,
        order_id=str(row.order_id),
        code=row.code,
        module=row.module,
        category=row.category,
        severity=Severity(row.severity),
        payload=dict(row.payload),
        recorded_at=row.recorded_at,
        written_by=row.written_by,
        created_at=row.created_at,
        closed_at=row.closed_at,
        closed_by=row.closed_by,
        close_note=row.close_note,
    )


def entry_from_payload(d: Mapping[str, Any]) -> StatusEntry:
    """The entry an order status event carries (built by _entry_events)."""
    return StatusEntry(
        id=int(d["id"]),
        order_id=str(d["order_id"]),
        code=str(d["code"]),
        module=str(d["module"]),
        category=str(d["category"]),
        severity=Severity(d["severity"]),
        payload=dict(d["payload"]),
        recorded_at=datetime.fromisoformat(d["recorded_at"]),
        written_by=str(d["written_by"]),
        created_at=datetime.fromisoformat(d["created_at"]),
        closed_at=datetime.fromisoformat(d["closed_at"]) if d.get("closed_at") else None,
        closed_by=d.get("closed_by"),
        close_note=d.get("close_note"),
    )


_BLOCKED = exists().where(
    StatusEntryRow.order_id == OrderRow.id,
    StatusEntryRow.severity == Severity.BLOCKING.value,
    StatusEntryRow.closed_at.is_(None),
)


async def _load(session: AsyncSession, row: OrderRow) -> Order:
    lines = (
        await session.execute(
            select(OrderLineRow).where(OrderLineRow.order_id == row.id).order_by(OrderLineRow.position)
        )
    ).scalars()
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
    return _order(row, list(lines), list(pays), blocked)


def _order(row: OrderRow, lines: list[OrderLineRow], pays: list[PaymentRow], blocked: bool) -> Order:
    c = row.currency
    return Order(
        id=str(row.id),
        channel=row.channel,
        source_system=row.source_system,
        intent_id=row.intent_id,
        external_order_id=row.external_order_id,
        customer_ref=row.customer_ref,
        currency=c,
        state=State(row.state),
        lines=tuple(
            Line(
                li.line_id,
                li.sku,
                li.quantity,
                Money(c, li.unit_price_minor),
                li.shipped_quantity,
                li.refunded_quantity,
            )
            for li in lines
        ),
        totals=Totals(
            Money(c, row.subtotal_minor),
            Money(c, row.tax_minor),
            Money(c, row.shipping_minor),
            Money(c, row.discount_minor),
            Money(c, row.grand_total_minor),
        ),
        payments=tuple(
            Tender(
                p.tender_id,
                p.method,
                Money(c, p.captured_minor),
                p.gateway_reference,
                Money(c, p.refunded_minor),
            )
            for p in pays
        ),
        submitted_at=row.submitted_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
        reservation_id=row.reservation_id,
        blocked=blocked,
    )


async def _row(session: AsyncSession, order_id: str, channel: str | None, *, lock: bool = False) -> OrderRow:
    stmt = select(OrderRow).where(OrderRow.id == _parse_id(order_id))
    if channel is not None:
        # Another channel's order is indistinguishable from a missing one.
        stmt = stmt.where(OrderRow.channel == channel)
    if lock:
        stmt = stmt.with_for_update()
    row = (await session.execute(stmt)).scalar_one_or_none()
    if row is None:
        raise _not_found(order_id)
    return row


@dataclass(frozen=True)
class _EntrySpec:
    code: str
    written_by: str
    severity: Severity = Severity.INFO
    category: str = ""
    payload: dict[str, Any] | None = None
    recorded_at: datetime | None = None


async def _append(
    session: AsyncSession,
    order: OrderRow,
    code: str,
    *,
    written_by: str,
    severity: Severity = Severity.INFO,
    category: str = "",
    payload: dict[str, Any] | None = None,
    recorded_at: datetime | None = None,
    events_before: Sequence[Event] = (),
) -> StatusEntry:
    """Appends an entry and its event; `events_before` go into the same outbox insert (one round trip)."""
    (entry,) = await _append_many(
        session,
        order,
        [_EntrySpec(code, written_by, severity, category, payload, recorded_at)],
        events_before=events_before,
    )
    return entry


async def _append_many(
    session: AsyncSession,
    order: OrderRow | _OrderHead,
    specs: Sequence[_EntrySpec],
    *,
    events_before: Sequence[Event] = (),
) -> list[StatusEntry]:
    """Appends entries in order with their events (`events_before` first): one statement."""
    conn = await driver_connection(session)
    written = await _APPEND.fetch(conn, _entry_params(session, order, specs, events_before))
    return [
        StatusEntry(
            id=w["id"],
            order_id=str(order.id),
            code=x.code,
            module=x.code.split(":", 1)[0],
            category=x.category,
            severity=x.severity,
            payload=x.payload or {},
            recorded_at=w["recorded_at"],
            written_by=x.written_by,
            created_at=w["created_at"],
            closed_at=None,
            closed_by=None,
            close_note=None,
        )
        for x, w in zip(specs, written, strict=True)
    ]


# ---------------------------------------------------------------- hot path (driver connection)


@dataclass(frozen=True)
class _OrderHead:
    """What appending entries needs of an order (no ORM row on the hot path)."""

    id: uuid.UUID
    channel: str


def _iso_sql(column: str) -> str:
    """SQL for datetime.isoformat() of a timestamptz read through asyncpg (UTC):
    microseconds only when not zero, offset +00:00; NULL stays NULL."""
    utc = f"({column} AT TIME ZONE 'UTC')"
    return (
        f"""(to_char({utc}, 'YYYY-MM-DD"T"HH24:MI:SS')"""
        f" || CASE WHEN extract(microseconds FROM {column})::bigint % 1000000 = 0 THEN ''"
        f" ELSE to_char({utc}, '.US') END || '+00:00')"
    )


def _entry_events(rows: str, topic: str) -> str:
    """The order status events: one `topic` event per status entry row of the
    CTE `rows` (all its columns), in id order, for outbox.cte's `derived`. Their
    payload is built here only: {"order_id", "entry"} with the entry as
    entry_from_payload reads it (timestamps as datetime.isoformat writes them)."""
    r = rows
    return f"""
        SELECT row_number() OVER (ORDER BY {r}.id), '{topic}', 'order', {r}.order_id::text, CAST(:channel AS text),
            jsonb_build_object('order_id', {r}.order_id::text, 'entry', jsonb_build_object(
                'id', {r}.id, 'order_id', {r}.order_id::text, 'code', {r}.code, 'module', {r}.module,
                'category', {r}.category, 'severity', {r}.severity, 'payload', {r}.payload,
                'recorded_at', {_iso_sql(f"{r}.recorded_at")}, 'written_by', {r}.written_by,
                'created_at', {_iso_sql(f"{r}.created_at")}, 'closed_at', {_iso_sql(f"{r}.closed_at")},
                'closed_by', {r}.closed_by, 'close_note', {r}.close_note))
        FROM {r}"""


def _entry_ctes(order_id: str, *, after: str = "") -> str:
    """CTEs `s` (status entries from the `_entry_params` arrays, inserted in
    array order, so their ids follow it) and `ev` (the outbox: the events of
    `_entry_params` first, then one order.status_appended per entry). `after`:
    CTEs the entries depend on ("o" when the order is inserted by the same
    statement: no entry and no event when it was not)."""
    source = f"{after}, " if after else ""
    return f"""s AS (
        INSERT INTO orders.status_entries
            (order_id, code, module, category, severity, payload, recorded_at, written_by)
        SELECT {order_id}, e.code, e.module, e.category, e.severity, e.payload, coalesce(e.recorded_at, now()),
               e.written_by
        FROM {source}unnest(CAST(:e_code AS text[]), CAST(:e_module AS text[]), CAST(:e_category AS text[]),
                    CAST(:e_severity AS text[]), CAST(:e_payload AS jsonb[]), CAST(:e_recorded_at AS timestamptz[]),
                    CAST(:e_written_by AS text[]))
             WITH ORDINALITY AS e(code, module, category, severity, payload, recorded_at, written_by, n)
        ORDER BY e.n
        RETURNING *
    ), {outbox.cte("ev", derived=_entry_events("s", STATUS_APPENDED), when=f"EXISTS (SELECT FROM {after})" if after else "")}"""


# Entries of an existing order; returns them in id (= spec) order.
_APPEND = DriverStatement(
    f"""
    WITH {_entry_ctes("CAST(:order_id AS uuid)")}
    SELECT id, recorded_at, created_at FROM s ORDER BY id
    """
)

_INSERT_INTENT = DriverStatement(
    f"""
    WITH o AS (
        INSERT INTO orders.orders (id, channel, source_system, intent_id, external_order_id, customer_ref,
            currency, subtotal_minor, tax_minor, shipping_minor, discount_minor, grand_total_minor, state,
            content_hash, content, reservation_id, submitted_at)
        VALUES (:order_id, :channel, :source_system, :intent_id, :external_order_id, :customer_ref, :currency,
                :subtotal, :tax, :shipping, :discount, :grand_total, :state, :content_hash,
                CAST(:content AS jsonb), :reservation_id, coalesce(CAST(:submitted_at AS timestamptz), now()))
        ON CONFLICT DO NOTHING
        RETURNING id, submitted_at, created_at, updated_at
    ), l AS (
        INSERT INTO orders.order_lines (order_id, line_id, position, sku, quantity, unit_price_minor)
        SELECT o.id, x.line_id, x.n - 1, x.sku, x.quantity, x.price
        FROM o, unnest(CAST(:line_ids AS text[]), CAST(:line_skus AS text[]), CAST(:line_quantities AS bigint[]),
                       CAST(:line_prices AS bigint[]))
            WITH ORDINALITY AS x(line_id, sku, quantity, price, n)
    ), p AS (
        INSERT INTO orders.payments (order_id, tender_id, position, method, captured_minor, gateway_reference)
        SELECT o.id, x.tender_id, x.n - 1, x.method, x.captured, x.ref
        FROM o, unnest(CAST(:tender_ids AS text[]), CAST(:tender_methods AS text[]),
                       CAST(:tender_captured AS bigint[]), CAST(:tender_refs AS text[]))
            WITH ORDINALITY AS x(tender_id, method, captured, ref, n)
    ), {_entry_ctes("o.id", after="o")}
    SELECT o.submitted_at, o.created_at, o.updated_at FROM o
    """
)

_SET_RESERVATION = DriverStatement(
    f"""
    WITH u AS (
        UPDATE orders.orders SET reservation_id = :reservation_id, updated_at = now()
        WHERE id = CAST(:order_id AS uuid)
    ), {_entry_ctes("CAST(:order_id AS uuid)")}
    SELECT count(*) FROM s
    """
)


# Closes an entry (locked by the caller) with its order.status_closed event.
_CLOSE = DriverStatement(
    f"""
    WITH c AS (
        UPDATE orders.status_entries SET closed_at = now(), closed_by = :closed_by, close_note = :note
        WHERE id = :entry_id AND closed_at IS NULL
        RETURNING *
    ), {outbox.cte("ev", derived=_entry_events("c", STATUS_CLOSED))}
    SELECT closed_at, closed_by, close_note FROM c
    """
)


def _entry_params(
    session: AsyncSession,
    order: OrderRow | _OrderHead,
    specs: Sequence[_EntrySpec],
    before: Sequence[Event] = (),
) -> dict[str, Any]:
    """The parameters of `_entry_ctes`: the entries as arrays, the order's id and
    channel, and the outbox's (`before`: the order's own events, written first)."""
    for e in before:
        assert (e.aggregate_type, e.aggregate_id, e.channel) == ("order", str(order.id), order.channel)
    return {
        "e_code": [x.code for x in specs],
        "e_module": [x.code.split(":", 1)[0] for x in specs],
        "e_category": [x.category for x in specs],
        "e_severity": [x.severity.value for x in specs],
        "e_payload": [json.dumps(x.payload or {}) for x in specs],
        "e_recorded_at": [x.recorded_at for x in specs],
        "e_written_by": [x.written_by for x in specs],
        "order_id": order.id,
        "channel": order.channel,
        **outbox.params(session, before, name="ev", derived_rows=len(specs)),
    }


async def _reserve_new(
    session: AsyncSession,
    head: _OrderHead,
    wanted: list[tuple[str, int]],
    *,
    actor: str,
    inventory: InventoryPort,
) -> str:
    """`_reserve` for an order just inserted: the order update and its entry in one statement."""
    demand = _sum_by_sku(wanted)
    res = await inventory.reserve(session, demand, reference=f"order:{head.id}", actor=actor)
    payload: dict[str, Any] = {
        "reservation_id": res.reservation_id,
        "lines": [{"sku": s.sku, "quantity": s.quantity} for s in demand],
    }
    if res.backordered:
        payload["backordered"] = [{"sku": k, "quantity": v} for k, v in sorted(res.backordered.items())]
        spec = _EntrySpec(
            "inventory:reservation_backordered",
            actor,
            Severity.WARNING,
            category="inventory",
            payload=payload,
        )
    else:
        spec = _EntrySpec("inventory:reservation_confirmed", actor, category="inventory", payload=payload)
    conn = await driver_connection(session)
    await _SET_RESERVATION.fetch(
        conn, {**_entry_params(session, head, [spec]), "reservation_id": res.reservation_id}
    )
    return res.reservation_id


async def _update_order(session: AsyncSession, row: OrderRow, **values: Any) -> None:
    # Core UPDATE ... RETURNING, then mark the loaded row as current without
    # making it dirty (a later flush would write it again).
    result = (
        await session.execute(
            update(OrderRow)
            .where(OrderRow.id == row.id)
            .values(updated_at=func.now(), **values)
            .returning(OrderRow.state, OrderRow.reservation_id, OrderRow.updated_at)
            .execution_options(synchronize_session=False)
        )
    ).one()
    for key in ("state", "reservation_id", "updated_at"):
        set_committed_value(row, key, getattr(result, key))


async def _set_state(
    session: AsyncSession, row: OrderRow, target: State, *, actor: str, reason: str = ""
) -> None:
    previous = row.state
    await _update_order(session, row, state=target.value)
    transitioned = Event(
        TRANSITIONED,
        "order",
        str(row.id),
        {"order_id": str(row.id), "from": previous, "to": target.value},
        row.channel,
    )
    payload: dict[str, Any] = {"from": previous}
    if reason:
        payload["reason"] = reason
    await _append(
        session, row, f"order:{target.value}", written_by=actor, payload=payload, events_before=[transitioned]
    )


async def _lines(session: AsyncSession, order_id: uuid.UUID) -> list[OrderLineRow]:
    return list(
        (
            await session.execute(
                select(OrderLineRow).where(OrderLineRow.order_id == order_id).order_by(OrderLineRow.position)
            )
        ).scalars()
    )


def _sum_by_sku(items: Sequence[tuple[str, int]]) -> list[StockLine]:
    # One StockLine per SKU, in first-mention order: inventory sums demand per SKU anyway.
    totals: dict[str, int] = {}
    for sku, qty in items:
        totals[sku] = totals.get(sku, 0) + qty
    return [StockLine(sku, q) for sku, q in totals.items() if q > 0]


async def _reserve(
    session: AsyncSession,
    row: OrderRow,
    wanted: list[tuple[str, int]],
    *,
    actor: str,
    inventory: InventoryPort,
) -> None:
    demand = _sum_by_sku(wanted)
    res = await inventory.reserve(session, demand, reference=f"order:{row.id}", actor=actor)
    await _update_order(session, row, reservation_id=res.reservation_id)
    payload: dict[str, Any] = {
        "reservation_id": res.reservation_id,
        "lines": [{"sku": s.sku, "quantity": s.quantity} for s in demand],
    }
    if res.backordered:
        payload["backordered"] = [{"sku": k, "quantity": v} for k, v in sorted(res.backordered.items())]
        await _append(
            session, row, "inventory:reservation_backordered", written_by=actor, severity=Severity.WARNING,
            category="inventory", payload=payload,
        )  # fmt: skip
    else:
        await _append(
            session,
            row,
            "inventory:reservation_confirmed",
            written_by=actor,
            category="inventory",
            payload=payload,
        )


# ---------------------------------------------------------------- intents


async def submit_intent(
    session: AsyncSession,
    intent: Intent,
    *,
    channel: ChannelRef,
    actor: str,
    reserve_inventory: bool = False,
    reservation_id: str | None = None,
    inventory: InventoryPort = DEFAULT_INVENTORY,
) -> SubmitResult:
    """Creates the canonical order for an intent, or returns the one it already created.

    `reservation_id` adopts a reservation the caller already holds for these
    lines (a cart's hold turned into the order's); `reserve_inventory`
    reserves now. Both happen in the caller's transaction.
    """
    validate_intent(intent, channel.currency)
    if reserve_inventory and reservation_id:
        raise InvalidArgument(
            "INVALID_ORDER_INTENT",
            "reserve_inventory and an existing reservation are exclusive",
            field_violations=[
                FieldViolation("reserve_inventory", "must be false when adopting a reservation")
            ],
        )
    content = canonical_content(intent, channel.slug)
    digest = content_hash(content)
    order_id = uuid.uuid4()
    t = intent.totals
    specs = [
        _EntrySpec(
            "order:submitted",
            actor,
            category="lifecycle",
            payload={
                "source_system": intent.source_system,
                "intent_id": intent.intent_id,
                "external_order_id": intent.external_order_id,
                "grand_total_minor": t.grand_total.amount_minor,
                "currency": channel.currency,
            },
        )
    ]
    if reservation_id:
        specs.append(
            _EntrySpec(
                "inventory:reservation_confirmed",
                actor,
                category="inventory",
                payload={"reservation_id": reservation_id, "adopted": True},
            )
        )
    head = _OrderHead(order_id, channel.slug)
    created = Event(
        CREATED,
        "order",
        str(order_id),
        {"order_id": str(order_id), "state": State.PENDING.value},
        channel.slug,
    )
    # The order, its lines, payments, entries and events in one statement (checkout
    # holds locks meanwhile). No conflict target: a clash on the intent key or
    # on the external id both end here; the loser waits for the winner's
    # commit, then sees its row.
    conn = await driver_connection(session)
    rows = await _INSERT_INTENT.fetch(
        conn,
        {
            **_entry_params(session, head, specs, [created]),
            "source_system": intent.source_system,
            "intent_id": intent.intent_id,
            "external_order_id": intent.external_order_id,
            "customer_ref": intent.customer_ref,
            "currency": channel.currency,
            "subtotal": t.subtotal.amount_minor,
            "tax": t.tax.amount_minor,
            "shipping": t.shipping.amount_minor,
            "discount": t.discount.amount_minor,
            "grand_total": t.grand_total.amount_minor,
            "state": State.PENDING.value,
            "content_hash": digest,
            "content": json.dumps(content),
            "reservation_id": reservation_id,
            "submitted_at": intent.submitted_at,
            "line_ids": [li.line_id for li in intent.lines],
            "line_skus": [li.sku for li in intent.lines],
            "line_quantities": [li.quantity for li in intent.lines],
            "line_prices": [li.unit_price.amount_minor for li in intent.lines],
            "tender_ids": [p.tender_id for p in intent.payments],
            "tender_methods": [p.method for p in intent.payments],
            "tender_captured": [p.captured.amount_minor for p in intent.payments],
            "tender_refs": [p.gateway_reference for p in intent.payments],
        },
    )
    if not rows:
        return await _existing_intent(session, intent, channel, content, digest)
    inserted = rows[0]
    reserved_id = reservation_id
    if not reservation_id and reserve_inventory:
        wanted = [(li.sku, li.quantity) for li in intent.lines]
        reserved_id = await _reserve_new(session, head, wanted, actor=actor, inventory=inventory)
    # Everything is known: build the answer without reading the rows back.
    c = channel.currency
    order = Order(
        id=str(order_id),
        channel=channel.slug,
        source_system=intent.source_system,
        intent_id=intent.intent_id,
        external_order_id=intent.external_order_id,
        customer_ref=intent.customer_ref,
        currency=c,
        state=State.PENDING,
        lines=tuple(Line(li.line_id, li.sku, li.quantity, li.unit_price, 0, 0) for li in intent.lines),
        totals=Totals(t.subtotal, t.tax, t.shipping, t.discount, t.grand_total),
        payments=tuple(
            Tender(p.tender_id, p.method, p.captured, p.gateway_reference, Money(c, 0))
            for p in intent.payments
        ),
        submitted_at=inserted["submitted_at"],
        created_at=inserted["created_at"],
        # Every write of this transaction stamps now(): the reservation's update too.
        updated_at=inserted["updated_at"],
        reservation_id=reserved_id,
        blocked=False,
    )
    return SubmitResult(order, created=True)


async def _existing_intent(
    session: AsyncSession, intent: Intent, channel: ChannelRef, content: dict[str, Any], digest: bytes
) -> SubmitResult:
    row = (
        await session.execute(
            select(OrderRow).where(
                OrderRow.source_system == intent.source_system, OrderRow.intent_id == intent.intent_id
            )
        )
    ).scalar_one_or_none()
    if row is None:
        raise AlreadyExists(
            "EXTERNAL_ORDER_ID_TAKEN",
            f"another intent of {intent.source_system!r} already created order {intent.external_order_id!r}",
            metadata={"source_system": intent.source_system, "external_order_id": intent.external_order_id},
            field_violations=[FieldViolation("intent.external_order_id", "already used by another intent")],
        )
    if row.content_hash == digest:
        return SubmitResult(await _load(session, row), created=False)
    # Never describe another channel's order beyond the fact that the key is taken.
    diff = ["intent.channel"] if row.channel != channel.slug else differing_fields(row.content, content)
    raise AlreadyExists(
        "INTENT_CONFLICT",
        f"intent {intent.intent_id!r} of {intent.source_system!r} was already accepted with different content",
        metadata={
            "source_system": intent.source_system,
            "intent_id": intent.intent_id,
            "differing_fields": ",".join(diff),
            **({"order_id": str(row.id)} if row.channel == channel.slug else {}),
        },
        field_violations=[
            FieldViolation(p, "differs from the intent already accepted under this key") for p in diff
        ],
    )


# ---------------------------------------------------------------- reads


async def get_order(session: AsyncSession, order_id: str, *, channel: str | None) -> Order:
    """The order; `channel=None` only for trusted internal callers (workflows)."""
    return await _load(session, await _row(session, order_id, channel))


async def get_order_by_external_id(
    session: AsyncSession, source_system: str, external_order_id: str, *, channel: str
) -> Order:
    if not source_system or not external_order_id:
        v = Violations()
        if not source_system:
            v.add("source_system", "is required")
        if not external_order_id:
            v.add("external_order_id", "is required")
        v.raise_if_any("source_system and external_order_id are required")
    row = (
        await session.execute(
            select(OrderRow).where(
                OrderRow.channel == channel,
                OrderRow.source_system == source_system,
                OrderRow.external_order_id == external_order_id,
            )
        )
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(
            "ORDER_NOT_FOUND",
            f"no order {external_order_id!r} from {source_system!r}",
            metadata={"source_system": source_system, "external_order_id": external_order_id},
        )
    return await _load(session, row)


@dataclass(frozen=True)
class OrderFilter:
    states: tuple[State, ...] = ()
    customer_ref: str = ""
    source_system: str = ""
    start: datetime | None = None
    end: datetime | None = None
    blocked_only: bool = False


async def list_orders(
    session: AsyncSession, *, channel: str, filters: OrderFilter, size: int, token: str
) -> tuple[list[Order], str]:
    """Newest first, keyset-paginated on (created_at, id)."""
    n = page_size(size)
    fingerprint = {
        "channel": channel,
        "states": sorted(s.value for s in filters.states),
        "customer_ref": filters.customer_ref,
        "source_system": filters.source_system,
        "start": filters.start.isoformat() if filters.start else None,
        "end": filters.end.isoformat() if filters.end else None,
        "blocked": filters.blocked_only,
    }
    after = decode_token(token, fingerprint)
    stmt = select(OrderRow, _BLOCKED.label("blocked")).where(OrderRow.channel == channel)
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
    if after is not None:
        try:
            at, last_id = datetime.fromisoformat(after[0]), uuid.UUID(after[1])
        except (ValueError, TypeError, IndexError) as exc:
            raise InvalidArgument(
                "INVALID_PAGE_TOKEN", "page_token is not a token this service issued"
            ) from exc
        stmt = stmt.where((OrderRow.created_at < at) | and_(OrderRow.created_at == at, OrderRow.id < last_id))
    stmt = stmt.order_by(OrderRow.created_at.desc(), OrderRow.id.desc()).limit(n + 1)
    rows = list((await session.execute(stmt)).all())
    more = len(rows) > n
    rows = rows[:n]
    if not rows:
        return [], ""
    ids = [r[0].id for r in rows]
    lines: dict[uuid.UUID, list[OrderLineRow]] = {i: [] for i in ids}
    for li in (
        await session.execute(
            select(OrderLineRow).where(OrderLineRow.order_id.in_(ids)).order_by(OrderLineRow.position)
        )
    ).scalars():
        lines[li.order_id].append(li)
    pays: dict[uuid.UUID, list[PaymentRow]] = {i: [] for i in ids}
    for p in (
        await session.execute(
            select(PaymentRow).where(PaymentRow.order_id.in_(ids)).order_by(PaymentRow.position)
        )
    ).scalars():
        pays[p.order_id].append(p)
    orders = [_order(r, lines[r.id], pays[r.id], bool(b)) for r, b in rows]
    last = rows[-1][0]
    return orders, encode_token([last.created_at.isoformat(), str(last.id)], fingerprint) if more else ""


# ---------------------------------------------------------------- status history


async def append_status(
    session: AsyncSession, order_id: str, entry: StatusIn, *, channel: str, caller: Caller
) -> StatusEntry:
    validate_status(entry, caller.status_namespaces)
    # The order lock orders a BLOCKING append against a concurrent shipment.
    row = await _row(session, order_id, channel, lock=True)
    return await _append(
        session,
        row,
        entry.code,
        written_by=caller.subject,
        severity=entry.severity,
        category=entry.category,
        payload=entry.payload,
        recorded_at=entry.recorded_at,
    )


async def close_status(
    session: AsyncSession, order_id: str, entry_id: int, note: str, *, channel: str, caller: Caller
) -> StatusEntry:
    row = await _row(session, order_id, channel, lock=True)
    entry = (
        await session.execute(
            select(StatusEntryRow)
            .where(StatusEntryRow.id == entry_id, StatusEntryRow.order_id == row.id)
            .with_for_update()
        )
    ).scalar_one_or_none()
    if entry is None:
        raise NotFound(
            "STATUS_ENTRY_NOT_FOUND",
            f"order {order_id} has no status entry {entry_id}",
            metadata={"order_id": order_id, "entry_id": str(entry_id)},
        )
    # Closing follows the same namespace rule as writing.
    validate_status(StatusIn(code=entry.code), caller.status_namespaces)
    if entry.closed_at is not None:
        raise FailedPrecondition(
            "STATUS_ALREADY_CLOSED",
            f"status entry {entry_id} was already closed",
            metadata={"order_id": order_id, "entry_id": str(entry_id)},
        )
    if len(note) > 1000:
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            "note is too long",
            field_violations=[FieldViolation("note", "at most 1000 characters")],
        )
    conn = await driver_connection(session)
    (closed,) = await _CLOSE.fetch(
        conn,
        {
            "entry_id": entry_id,
            "closed_by": caller.subject,
            "note": note,
            "channel": row.channel,
            **outbox.params(session, name="ev", derived_rows=1),
        },
    )
    return replace(
        _entry(entry),
        closed_at=closed["closed_at"],
        closed_by=closed["closed_by"],
        close_note=closed["close_note"],
    )


async def list_status_history(
    session: AsyncSession, order_id: str, *, channel: str, module: str = "", size: int = 0, token: str = ""
) -> tuple[list[StatusEntry], str]:
    row = await _row(session, order_id, channel)
    n = page_size(size)
    filters = {"order": order_id, "module": module}
    after = decode_token(token, filters)
    stmt = select(StatusEntryRow).where(StatusEntryRow.order_id == row.id)
    if module:
        stmt = stmt.where(StatusEntryRow.module == module)
    if after is not None:
        stmt = stmt.where(StatusEntryRow.id > int(after))
    rows = list((await session.execute(stmt.order_by(StatusEntryRow.id).limit(n + 1))).scalars())
    more = len(rows) > n
    rows = rows[:n]
    return [_entry(r) for r in rows], encode_token(rows[-1].id, filters) if more else ""


async def status_summary(session: AsyncSession, order_id: str, *, channel: str) -> StatusSummary:
    row = await _row(session, order_id, channel)
    latest = (
        await session.execute(
            select(StatusEntryRow)
            .where(StatusEntryRow.order_id == row.id)
            .ext(distinct_on(StatusEntryRow.module))
            .order_by(StatusEntryRow.module, StatusEntryRow.id.desc())
        )
    ).scalars()
    blocking = await _open_blocking(session, row.id)
    return StatusSummary(str(row.id), State(row.state), tuple(_entry(e) for e in latest), tuple(blocking))


async def _open_blocking(session: AsyncSession, order_id: uuid.UUID) -> list[StatusEntry]:
    rows = (
        await session.execute(
            select(StatusEntryRow)
            .where(
                StatusEntryRow.order_id == order_id,
                StatusEntryRow.severity == Severity.BLOCKING.value,
                StatusEntryRow.closed_at.is_(None),
            )
            .order_by(StatusEntryRow.id)
        )
    ).scalars()
    return [_entry(r) for r in rows]


# ---------------------------------------------------------------- lifecycle


async def transition(
    session: AsyncSession,
    order_id: str,
    target: State,
    *,
    channel: str,
    actor: str,
    reason: str = "",
    tracking_number: str = "",
    carrier: str = "",
    inventory: InventoryPort = DEFAULT_INVENTORY,
) -> Order:
    if target not in TRANSITION_TARGETS:
        raise InvalidArgument(
            "INVALID_TARGET_STATE",
            f"TransitionOrder cannot target {target.value}",
            field_violations=[
                FieldViolation("target_state", "must be PROCESSING, SHIPPED, DELIVERED or CANCELLED; "
                               "partial shipments go through ShipOrderItems")
            ],
        )  # fmt: skip
    if len(reason) > 1000:
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            "reason is too long",
            field_violations=[FieldViolation("reason", "at most 1000 characters")],
        )
    row = await _row(session, order_id, channel, lock=True)
    current = State(row.state)
    check_transition(order_id, current, target)
    if target is State.SHIPPED:
        lines = await _lines(session, row.id)
        remaining = [
            (li.line_id, li.quantity - li.shipped_quantity)
            for li in lines
            if li.shipped_quantity < li.quantity
        ]
        await _ship(
            session, row, lines, remaining, tracking_number, carrier, actor=actor, inventory=inventory
        )
        return await _load(session, row)
    if target is State.PROCESSING and row.reservation_id is None:
        wanted = [(li.sku, li.quantity - li.shipped_quantity) for li in await _lines(session, row.id)]
        await _reserve(session, row, wanted, actor=actor, inventory=inventory)
    if target is State.CANCELLED and row.reservation_id is not None:
        await inventory.release(
            session, row.reservation_id, reason=f"order {order_id} cancelled", actor=actor
        )
        await _append(
            session, row, "inventory:released", written_by=actor, category="inventory",
            payload={"reservation_id": row.reservation_id},
        )  # fmt: skip
    await _set_state(session, row, target, actor=actor, reason=reason)
    return await _load(session, row)


async def ship_items(
    session: AsyncSession,
    order_id: str,
    lines: Sequence[tuple[str, int]],
    *,
    channel: str,
    actor: str,
    tracking_number: str = "",
    carrier: str = "",
    inventory: InventoryPort = DEFAULT_INVENTORY,
) -> tuple[Order, Shipment]:
    v = Violations()
    if not lines:
        v.add("lines", "ship at least one line")
    seen: set[str] = set()
    for i, (line_id, qty) in enumerate(lines):
        if line_id in seen:
            v.add(f"lines[{i}].line_id", f"line {line_id!r} appears twice")
        seen.add(line_id)
        if qty <= 0:
            v.add(f"lines[{i}].quantity", "must be positive")
    if len(tracking_number) > 128:
        v.add("tracking_number", "at most 128 characters")
    if len(carrier) > 64:
        v.add("carrier", "at most 64 characters")
    v.raise_if_any("the shipment is invalid")
    row = await _row(session, order_id, channel, lock=True)
    current = State(row.state)
    if current not in (State.PROCESSING, State.PARTIALLY_SHIPPED):
        raise FailedPrecondition(
            "INVALID_STATE_TRANSITION",
            f"order {order_id} is {current.value}; only processing or partially shipped orders ship",
            metadata={"order_id": order_id, "state": current.value},
        )
    shipment = await _ship(
        session,
        row,
        await _lines(session, row.id),
        list(lines),
        tracking_number,
        carrier,
        actor=actor,
        inventory=inventory,
    )
    return await _load(session, row), shipment


async def _ship(
    session: AsyncSession,
    row: OrderRow,
    order_lines: list[OrderLineRow],
    wanted: list[tuple[str, int]],
    tracking_number: str,
    carrier: str,
    *,
    actor: str,
    inventory: InventoryPort,
) -> Shipment:
    order_id = str(row.id)
    blocking = await _open_blocking(session, row.id)
    if blocking:
        raise FailedPrecondition(
            "ORDER_BLOCKED",
            f"order {order_id} has open blocking status entries: " + ", ".join(e.code for e in blocking),
            metadata={"order_id": order_id, "codes": ",".join(e.code for e in blocking)},
            precondition_violations=[
                PreconditionViolation(
                    "BLOCKING_STATUS", f"orders/{order_id}/status/{e.id}", f"{e.code} is open"
                )
                for e in blocking
            ],
        )
    if row.reservation_id is None:
        raise FailedPrecondition(
            "NO_RESERVATION",
            f"order {order_id} holds no reservation to ship from",
            metadata={"order_id": order_id},
        )
    by_id = {li.line_id: li for li in order_lines}
    v = Violations()
    over: list[PreconditionViolation] = []
    for i, (line_id, qty) in enumerate(wanted):
        li = by_id.get(line_id)
        if li is None:
            v.add(f"lines[{i}].line_id", f"order has no line {line_id!r}")
        elif qty > li.quantity - li.shipped_quantity:
            over.append(
                PreconditionViolation(
                    "QUANTITY_EXCEEDS_REMAINING",
                    f"orders/{order_id}/lines/{line_id}",
                    f"asked {qty}, {li.quantity - li.shipped_quantity} left to ship",
                )
            )
    v.raise_if_any("the shipment is invalid")
    if over:
        raise FailedPrecondition(
            "QUANTITY_EXCEEDS_REMAINING",
            "a line would ship more than was ordered",
            metadata={"order_id": order_id},
            precondition_violations=over,
        )
    for line_id, qty in wanted:
        # Conditional, so the counter can never pass the ordered quantity.
        done = (
            await session.execute(
                update(OrderLineRow)
                .where(
                    OrderLineRow.order_id == row.id,
                    OrderLineRow.line_id == line_id,
                    OrderLineRow.shipped_quantity + qty <= OrderLineRow.quantity,
                )
                .values(shipped_quantity=OrderLineRow.shipped_quantity + qty)
                .returning(OrderLineRow.shipped_quantity)
                .execution_options(synchronize_session=False)
            )
        ).scalar_one_or_none()
        if done is None:
            raise FailedPrecondition(
                "QUANTITY_EXCEEDS_REMAINING",
                f"line {line_id} would ship more than ordered",
                metadata={"order_id": order_id},
            )
    shipment_id = uuid.uuid4()
    await inventory.fulfil(
        session,
        row.reservation_id,
        _sum_by_sku([(by_id[lid].sku, q) for lid, q in wanted]),
        reference=f"shipment:{shipment_id}",
        actor=actor,
    )
    created = (
        await session.execute(
            insert(ShipmentRow)
            .values(
                id=shipment_id,
                order_id=row.id,
                tracking_number=tracking_number,
                carrier=carrier,
                created_by=actor,
            )
            .returning(ShipmentRow.created_at)
        )
    ).scalar_one()
    await session.execute(
        insert(ShipmentLineRow),
        [{"shipment_id": shipment_id, "line_id": lid, "quantity": q} for lid, q in wanted],
    )
    shipment = Shipment(str(shipment_id), order_id, tuple(wanted), tracking_number, carrier, created)
    await _append(
        session, row, "order:items_shipped", written_by=actor, category="fulfilment",
        payload={"shipment_id": str(shipment_id), "tracking_number": tracking_number, "carrier": carrier,
                 "lines": [{"line_id": lid, "quantity": q} for lid, q in wanted]},
    )  # fmt: skip
    remaining = (
        await session.execute(
            select(func.coalesce(func.sum(OrderLineRow.quantity - OrderLineRow.shipped_quantity), 0)).where(
                OrderLineRow.order_id == row.id
            )
        )
    ).scalar_one()
    target = State.SHIPPED if int(remaining) == 0 else State.PARTIALLY_SHIPPED
    if target.value != row.state:
        check_transition(order_id, State(row.state), target)
        await _set_state(session, row, target, actor=actor)
    else:
        await _update_order(session, row)
    return shipment


async def shipment_status(session: AsyncSession, order_id: str, *, channel: str) -> ShipmentStatus:
    row = await _row(session, order_id, channel)
    order = await _load(session, row)
    shipments = list(
        (
            await session.execute(
                select(ShipmentRow)
                .where(ShipmentRow.order_id == row.id)
                .order_by(ShipmentRow.created_at, ShipmentRow.id)
            )
        ).scalars()
    )
    lines: dict[uuid.UUID, list[tuple[str, int]]] = {s.id: [] for s in shipments}
    if shipments:
        for sl in (
            await session.execute(
                select(ShipmentLineRow)
                .where(ShipmentLineRow.shipment_id.in_(list(lines)))
                .order_by(ShipmentLineRow.line_id)
            )
        ).scalars():
            lines[sl.shipment_id].append((sl.line_id, sl.quantity))
    return ShipmentStatus(
        order.id,
        order.state,
        order.lines,
        tuple(
            Shipment(str(s.id), order.id, tuple(lines[s.id]), s.tracking_number, s.carrier, s.created_at)
            for s in shipments
        ),
    )


# ---------------------------------------------------------------- refunds (for the refund module)


async def record_refund(
    session: AsyncSession,
    order_id: str,
    refund_id: str,
    lines: Mapping[str, int],
    amounts: Mapping[str, int],
    *,
    actor: str,
    channel: str | None = None,
) -> RefundRecord:
    """Records refunded quantities per line and refunded amounts per tender.

    Idempotent per (order, refund_id): recording the same refund again
    returns the first record and changes nothing; other content under the
    same id is ALREADY_EXISTS (REFUND_CONFLICT). Never lets a line's refunded
    quantity exceed its ordered quantity, nor a tender's refunded amount
    exceed what it captured (FAILED_PRECONDITION, REFUND_EXCEEDS_REFUNDABLE).
    """
    v = Violations()
    if not refund_id or len(refund_id) > 128:
        v.add("refund_id", "must be 1 to 128 characters")
    for lid, q in lines.items():
        if q <= 0:
            v.add(f"lines[{lid}]", "quantity must be positive")
    for tid, a in amounts.items():
        if a <= 0:
            v.add(f"amounts[{tid}]", "amount must be positive")
    if not lines and not amounts:
        v.add("lines", "record at least one line or amount")
    v.raise_if_any("the refund is invalid")
    row = await _row(session, order_id, channel, lock=True)
    body = {"lines": dict(sorted(lines.items())), "amounts": dict(sorted(amounts.items()))}
    digest = content_hash(body)
    existing = await session.get(RefundRow, (row.id, refund_id))
    if existing is not None:
        if existing.content_hash != digest:
            raise AlreadyExists(
                "REFUND_CONFLICT",
                f"refund {refund_id} was already recorded with other lines or amounts",
                metadata={"order_id": order_id, "refund_id": refund_id},
            )
        return RefundRecord(
            order_id, refund_id, dict(existing.lines), dict(existing.amounts), existing.created_at
        )
    # Checked before anything is written (the order lock keeps the counters
    # still), so a refused refund leaves no trace even if the caller goes on.
    have_lines = {li.line_id: li for li in await _lines(session, row.id)}
    have_pays = {
        p.tender_id: p
        for p in (await session.execute(select(PaymentRow).where(PaymentRow.order_id == row.id))).scalars()
    }
    over: list[PreconditionViolation] = []
    for lid, q in sorted(lines.items()):
        li = have_lines.get(lid)
        if li is None or li.refunded_quantity + q > li.quantity:
            left = "unknown line" if li is None else f"{li.quantity - li.refunded_quantity} refundable"
            over.append(
                PreconditionViolation(
                    "REFUND_EXCEEDS_REFUNDABLE", f"orders/{order_id}/lines/{lid}", f"{q} asked, {left}"
                )
            )
    for tid, a in sorted(amounts.items()):
        pay = have_pays.get(tid)
        if pay is None or pay.refunded_minor + a > pay.captured_minor:
            left = (
                "unknown tender" if pay is None else f"{pay.captured_minor - pay.refunded_minor} refundable"
            )
            over.append(
                PreconditionViolation(
                    "REFUND_EXCEEDS_REFUNDABLE", f"orders/{order_id}/payments/{tid}", f"{a} asked, {left}"
                )
            )
    if over:
        raise FailedPrecondition(
            "REFUND_EXCEEDS_REFUNDABLE",
            "the refund exceeds what is refundable",
            metadata={"order_id": order_id, "refund_id": refund_id},
            precondition_violations=over,
        )
    for lid, q in sorted(lines.items()):
        # Conditional all the same: the counter can never pass the ordered quantity.
        await _bump(
            session,
            update(OrderLineRow)
            .where(
                OrderLineRow.order_id == row.id,
                OrderLineRow.line_id == lid,
                OrderLineRow.refunded_quantity + q <= OrderLineRow.quantity,
            )
            .values(refunded_quantity=OrderLineRow.refunded_quantity + q)
            .returning(OrderLineRow.line_id),
        )
    for tid, a in sorted(amounts.items()):
        await _bump(
            session,
            update(PaymentRow)
            .where(
                PaymentRow.order_id == row.id,
                PaymentRow.tender_id == tid,
                PaymentRow.refunded_minor + a <= PaymentRow.captured_minor,
            )
            .values(refunded_minor=PaymentRow.refunded_minor + a)
            .returning(PaymentRow.tender_id),
        )
    created = (
        await session.execute(
            insert(RefundRow)
            .values(order_id=row.id, refund_id=refund_id, content_hash=digest, lines=body["lines"],
                    amounts=body["amounts"], recorded_by=actor)
            .returning(RefundRow.created_at)
        )
    ).scalar_one()  # fmt: skip
    await _append(
        session, row, "order:refund_recorded", written_by=actor, category="refund",
        payload={"refund_id": refund_id, **body},
    )  # fmt: skip
    return RefundRecord(order_id, refund_id, body["lines"], body["amounts"], created)


async def _bump(session: AsyncSession, stmt: Any) -> None:
    if (
        await session.execute(stmt.execution_options(synchronize_session=False))
    ).scalar_one_or_none() is None:
        # Unreachable while the order row is locked; refuse rather than overshoot.
        raise FailedPrecondition("REFUND_EXCEEDS_REFUNDABLE", "a refund counter changed concurrently")


async def list_refunds(
    session: AsyncSession, order_id: str, *, channel: str | None = None
) -> list[RefundRecord]:
    row = await _row(session, order_id, channel)
    rows = (
        await session.execute(
            select(RefundRow).where(RefundRow.order_id == row.id).order_by(RefundRow.created_at)
        )
    ).scalars()
    return [RefundRecord(order_id, r.refund_id, dict(r.lines), dict(r.amounts), r.created_at) for r in rows]


async def record_manual_adjustment(
    session: AsyncSession, order_id: str, note: str, details: dict[str, Any], *, channel: str, actor: str
) -> StatusEntry:
    """A correction is recorded as `order:manually_adjusted`, never by rewriting the order."""
    if not note.strip():
        raise InvalidArgument(
            "INVALID_STATUS_ENTRY",
            "a manual adjustment needs a note",
            field_violations=[FieldViolation("note", "required")],
        )
    row = await _row(session, order_id, channel, lock=True)
    return await _append(
        session, row, "order:manually_adjusted", written_by=actor, category="correction",
        payload={"note": note, **details},
    )  # fmt: skip
