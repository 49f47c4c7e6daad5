"""Status entries and the events that carry them.

An entry is never written without its `order.status_appended` event, nor
closed without its `order.status_closed` event: both are written here, in
the caller's transaction. The SubmitOrderIntent hot path (`insert_intent`,
`set_reservation`) runs on the session's asyncpg connection: the order, its
lines, payments, entries and events in one statement.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.models import OrderRow, StatusEntryRow
from domain.order.rules import Intent, Severity, State
from domain.order.types import STATUS_APPENDED, STATUS_CLOSED, StatusEntry, entry_payload
from domain.shared.caller import ChannelRef
from domain.shared.db import driver_connection
from domain.shared.outbox import Event, emit_many, mark_written

if TYPE_CHECKING:
    # Not at run time: Temporal's workflow sandbox re-imports domain modules (see domain.shared.db).
    import asyncpg


@dataclass(frozen=True)
class EntrySpec:
    """An entry to append: what the caller decides; ids and times come from the database."""

    code: str
    written_by: str
    severity: Severity = Severity.INFO
    category: str = ""
    payload: dict[str, Any] | None = None
    recorded_at: datetime | None = None


@dataclass(frozen=True)
class OrderHead:
    """What appending entries needs of an order (no ORM row on the hot path)."""

    id: uuid.UUID
    channel: str


def to_entry(row: StatusEntryRow) -> StatusEntry:
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


async def append_entry(
    session: AsyncSession,
    order: OrderRow,
    spec: EntrySpec,
    *,
    events_before: Sequence[Event] = (),
) -> StatusEntry:
    """Appends an entry and its event; `events_before` go into the same outbox insert (one round trip)."""
    (entry,) = await append_entries(session, order, [spec], events_before=events_before)
    return entry


async def append_entries(
    session: AsyncSession,
    order: OrderRow,
    specs: Sequence[EntrySpec],
    *,
    events_before: Sequence[Event] = (),
) -> list[StatusEntry]:
    """Appends entries in order with their events: one multi-row insert for the
    entries and one outbox insert (`events_before` first), two round trips."""
    values = [
        {
            "order_id": order.id,
            "code": x.code,
            "module": x.code.split(":", 1)[0],
            "category": x.category,
            "severity": x.severity.value,
            "payload": x.payload or {},
            "recorded_at": x.recorded_at or func.now(),
            "written_by": x.written_by,
        }
        for x in specs
    ]
    # Core insert returning plain columns: no ORM object for a write-once row.
    # Ids come from one sequence in VALUES order, so sorting by id pairs them with specs.
    written = sorted(
        (
            await session.execute(
                insert(StatusEntryRow)
                .values(values)
                .returning(StatusEntryRow.id, StatusEntryRow.recorded_at, StatusEntryRow.created_at)
            )
        ).all(),
        key=lambda r: r.id,
    )
    entries = [
        _appended(order, x, w.id, w.recorded_at, w.created_at) for x, w in zip(specs, written, strict=True)
    ]
    await emit_many(session, [*events_before, *(_appended_event(order, e) for e in entries)])
    return entries


def _appended(
    order: OrderRow, spec: EntrySpec, entry_id: int, recorded_at: datetime, created_at: datetime
) -> StatusEntry:
    """The entry `spec` became, with what the database gave it."""
    return StatusEntry(
        id=entry_id,
        order_id=str(order.id),
        code=spec.code,
        module=spec.code.split(":", 1)[0],
        category=spec.category,
        severity=spec.severity,
        payload=spec.payload or {},
        recorded_at=recorded_at,
        written_by=spec.written_by,
        created_at=created_at,
        closed_at=None,
        closed_by=None,
        close_note=None,
    )


def _appended_event(order: OrderRow, entry: StatusEntry) -> Event:
    return Event(
        STATUS_APPENDED,
        "order",
        str(order.id),
        {"order_id": str(order.id), "entry": entry_payload(entry)},
        order.channel,
    )


async def entry_for_update(
    session: AsyncSession, order_id: uuid.UUID, entry_id: int
) -> StatusEntryRow | None:
    """The order's entry `entry_id`, locked, or None."""
    stmt = (
        select(StatusEntryRow)
        .where(StatusEntryRow.id == entry_id, StatusEntryRow.order_id == order_id)
        .with_for_update()
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def close_entry(
    session: AsyncSession, order: OrderRow, entry_id: int, *, closed_by: str, note: str
) -> StatusEntry:
    """Closes an open entry (locked by the caller) and writes its event."""
    closed = (
        await session.execute(
            update(StatusEntryRow)
            .where(StatusEntryRow.id == entry_id, StatusEntryRow.closed_at.is_(None))
            .values(closed_at=func.now(), closed_by=closed_by, close_note=note)
            .returning(StatusEntryRow)
            .execution_options(synchronize_session=False)
        )
    ).scalar_one()
    await session.refresh(closed)
    result = to_entry(closed)
    await emit_many(
        session,
        [
            Event(
                STATUS_CLOSED,
                "order",
                str(order.id),
                {"order_id": str(order.id), "entry": entry_payload(result)},
                order.channel,
            )
        ],
    )
    return result


async def history_page(
    session: AsyncSession, order_id: uuid.UUID, *, module: str, after_id: int | None, size: int
) -> tuple[list[StatusEntry], bool]:
    """Up to `size` entries in id order (of `module` only, when given) after
    `after_id`, and whether more follow."""
    stmt = select(StatusEntryRow).where(StatusEntryRow.order_id == order_id)
    if module:
        stmt = stmt.where(StatusEntryRow.module == module)
    if after_id is not None:
        stmt = stmt.where(StatusEntryRow.id > after_id)
    rows = list((await session.execute(stmt.order_by(StatusEntryRow.id).limit(size + 1))).scalars())
    return [to_entry(r) for r in rows[:size]], len(rows) > size


async def latest_per_module(session: AsyncSession, order_id: uuid.UUID) -> list[StatusEntry]:
    """The newest entry of each module, by module name."""
    stmt = (
        select(StatusEntryRow)
        .where(StatusEntryRow.order_id == order_id)
        .ext(distinct_on(StatusEntryRow.module))
        .order_by(StatusEntryRow.module, StatusEntryRow.id.desc())
    )
    return [to_entry(e) for e in (await session.execute(stmt)).scalars()]


async def open_blocking(session: AsyncSession, order_id: uuid.UUID) -> list[StatusEntry]:
    """The order's BLOCKING entries not closed yet, oldest first."""
    stmt = (
        select(StatusEntryRow)
        .where(
            StatusEntryRow.order_id == order_id,
            StatusEntryRow.severity == Severity.BLOCKING.value,
            StatusEntryRow.closed_at.is_(None),
        )
        .order_by(StatusEntryRow.id)
    )
    return [to_entry(r) for r in (await session.execute(stmt)).scalars()]


# ---------------------------------------------------------------- hot path (driver connection)


# Status entries from parallel arrays, inserted in array order (ids from one
# sequence follow it); returned sorted by id, so they pair with the specs.
_ENTRY_ARRAYS = """unnest($e1::text[], $e2::text[], $e3::text[], $e4::text[], $e5::jsonb[], $e6::timestamptz[],
                       $e7::text[]) WITH ORDINALITY AS e(code, module, category, severity, payload, recorded_at,
                                                         written_by, n)"""
_ENTRY_INSERT = """INSERT INTO orders.status_entries
           (order_id, code, module, category, severity, payload, recorded_at, written_by)
        SELECT {order_id}, e.code, e.module, e.category, e.severity, e.payload, coalesce(e.recorded_at, now()),
               e.written_by
        FROM {source}
        ORDER BY e.n
        RETURNING id, recorded_at, created_at"""


def _iso_sql(column: str) -> str:
    """SQL for datetime.isoformat() of a timestamptz read through asyncpg (UTC):
    microseconds only when not zero, offset +00:00."""
    utc = f"({column} AT TIME ZONE 'UTC')"
    return (
        f"""(to_char({utc}, 'YYYY-MM-DD"T"HH24:MI:SS')"""
        f" || CASE WHEN extract(microseconds FROM {column})::bigint % 1000000 = 0 THEN ''"
        f" ELSE to_char({utc}, '.US') END || '+00:00')"
    )


# The events of the entries just inserted (s), in the same statement: each
# payload is the template built in Python (entry_payload) with the entry's
# id and timestamps set from the inserted row. `before` events come first.
_ENTRY_EVENTS = f"""INSERT INTO platform.outbox (topic, aggregate_type, aggregate_id, channel, payload)
        SELECT y.topic, 'order', $e8, $e9, y.payload FROM (
            SELECT b.n AS k, b.topic, b.payload
            FROM {{before}} unnest($e10::text[], $e11::jsonb[]) WITH ORDINALITY AS b(topic, payload, n)
            UNION ALL
            SELECT 1000000 + w.n, '{STATUS_APPENDED}',
                   jsonb_set(jsonb_set(jsonb_set(w.payload,
                       '{{{{entry,id}}}}', to_jsonb(w.id)),
                       '{{{{entry,recorded_at}}}}', to_jsonb({_iso_sql("w.recorded_at")})),
                       '{{{{entry,created_at}}}}', to_jsonb({_iso_sql("w.created_at")}))
            FROM (SELECT s.id, s.recorded_at, s.created_at, t.payload, t.n
                  FROM (SELECT s.*, row_number() OVER (ORDER BY s.id) AS n FROM s) s
                  JOIN unnest($e12::jsonb[]) WITH ORDINALITY AS t(payload, n) ON t.n = s.n) w
        ) y
        ORDER BY y.k"""


def _numbered(sql: str, first: int) -> str:
    """$e1..$e12 -> $<first>..$<first+11> (the entry parameters follow a statement's own)."""
    for i in range(12, 0, -1):
        sql = sql.replace(f"$e{i}", f"${first + i - 1}")
    return sql


_INSERT_INTENT = _numbered(
    f"""
    WITH o AS (
        INSERT INTO orders.orders (id, channel, source_system, intent_id, external_order_id, customer_ref,
            currency, subtotal_minor, tax_minor, shipping_minor, discount_minor, grand_total_minor, state,
            content_hash, content, reservation_id, submitted_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15::jsonb, $16,
                coalesce($17::timestamptz, now()))
        ON CONFLICT DO NOTHING
        RETURNING id, submitted_at, created_at, updated_at
    ), l AS (
        INSERT INTO orders.order_lines (order_id, line_id, position, sku, quantity, unit_price_minor)
        SELECT o.id, x.line_id, x.n - 1, x.sku, x.quantity, x.price
        FROM o, unnest($18::text[], $19::text[], $20::bigint[], $21::bigint[])
            WITH ORDINALITY AS x(line_id, sku, quantity, price, n)
    ), p AS (
        INSERT INTO orders.payments (order_id, tender_id, position, method, captured_minor, gateway_reference)
        SELECT o.id, x.tender_id, x.n - 1, x.method, x.captured, x.ref
        FROM o, unnest($22::text[], $23::text[], $24::bigint[], $25::text[])
            WITH ORDINALITY AS x(tender_id, method, captured, ref, n)
    ), s AS (
        {_ENTRY_INSERT.format(order_id="o.id", source="o, " + _ENTRY_ARRAYS)}
    ), ev AS (
        {_ENTRY_EVENTS.format(before="o,")}
    )
    SELECT o.submitted_at, o.created_at, o.updated_at FROM o
    """,
    26,
)

_SET_RESERVATION = _numbered(
    f"""
    WITH u AS (
        UPDATE orders.orders SET reservation_id = $2, updated_at = now() WHERE id = $1
    ), s AS (
        {_ENTRY_INSERT.format(order_id="$1::uuid", source=_ENTRY_ARRAYS)}
    ), ev AS (
        {_ENTRY_EVENTS.format(before="")}
    )
    SELECT count(*) FROM s
    """,
    3,
)


_TEMPLATE_TIME = datetime(2000, 1, 1, tzinfo=UTC)  # replaced in SQL by the row's own


def _entry_params(head: OrderHead, specs: Sequence[EntrySpec], before: Sequence[Event] = ()) -> list[Any]:
    """$e1..$e12: the entries as arrays, then what their events need."""
    templates = [
        {
            "order_id": str(head.id),
            "entry": entry_payload(
                StatusEntry(
                    id=0,
                    order_id=str(head.id),
                    code=x.code,
                    module=x.code.split(":", 1)[0],
                    category=x.category,
                    severity=x.severity,
                    payload=x.payload or {},
                    recorded_at=_TEMPLATE_TIME,
                    written_by=x.written_by,
                    created_at=_TEMPLATE_TIME,
                    closed_at=None,
                    closed_by=None,
                    close_note=None,
                )
            ),
        }
        for x in specs
    ]
    for e in before:
        assert (e.aggregate_type, e.aggregate_id, e.channel) == ("order", str(head.id), head.channel)
    return [
        [x.code for x in specs],
        [x.code.split(":", 1)[0] for x in specs],
        [x.category for x in specs],
        [x.severity.value for x in specs],
        [json.dumps(x.payload or {}) for x in specs],
        [x.recorded_at for x in specs],
        [x.written_by for x in specs],
        str(head.id),
        head.channel,
        [e.topic for e in before],
        [json.dumps(e.payload) for e in before],
        [json.dumps(t) for t in templates],
    ]


async def insert_intent(
    session: AsyncSession,
    head: OrderHead,
    intent: Intent,
    *,
    channel: ChannelRef,
    content: dict[str, Any],
    digest: bytes,
    reservation_id: str | None,
    specs: Sequence[EntrySpec],
    before: Sequence[Event],
) -> asyncpg.Record | None:
    """Inserts the order of `intent` with its lines, payments, entries and
    events (`before` first) in one statement: its (submitted_at, created_at,
    updated_at), or None when an order already holds the intent key or the
    external id (no conflict target: after the winner's commit)."""
    t = intent.totals
    conn = await driver_connection(session)
    inserted: asyncpg.Record | None = await conn.fetchrow(
        _INSERT_INTENT,
        head.id,
        channel.slug,
        intent.source_system,
        intent.intent_id,
        intent.external_order_id,
        intent.customer_ref,
        channel.currency,
        t.subtotal.amount_minor,
        t.tax.amount_minor,
        t.shipping.amount_minor,
        t.discount.amount_minor,
        t.grand_total.amount_minor,
        State.PENDING.value,
        digest,
        json.dumps(content),
        reservation_id,
        intent.submitted_at,
        [li.line_id for li in intent.lines],
        [li.sku for li in intent.lines],
        [li.quantity for li in intent.lines],
        [li.unit_price.amount_minor for li in intent.lines],
        [p.tender_id for p in intent.payments],
        [p.method for p in intent.payments],
        [p.captured.amount_minor for p in intent.payments],
        [p.gateway_reference for p in intent.payments],
        *_entry_params(head, specs, before),
    )
    if inserted is not None:
        mark_written(session)
    return inserted


async def set_reservation(
    session: AsyncSession, head: OrderHead, reservation_id: str, spec: EntrySpec
) -> None:
    """Records the reservation on an order inserted by this transaction, with its entry, in one statement."""
    conn = await driver_connection(session)
    await conn.execute(_SET_RESERVATION, head.id, reservation_id, *_entry_params(head, [spec]))
    mark_written(session)
