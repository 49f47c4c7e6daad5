"""Status entries and the events that carry them.

An entry is never written without its `order.status_appended` event, nor
closed without its `order.status_closed` event: both are written here, in
the caller's transaction, by the same statement as the entry. Their payloads
are built by one SQL builder (`_entry_events`) for every path, and written by
the one outbox writer (domain.shared.outbox.cte). The writing statements
(`append_entries`, `close_entry`, and the SubmitOrderIntent hot path
`insert_intent`, `set_reservation`: the order, its lines, payments, entries and
events in one statement) run on the session's asyncpg connection.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.models import OrderRow, StatusEntryRow
from domain.order.rules import Intent, Severity, State
from domain.order.types import STATUS_APPENDED, STATUS_CLOSED, StatusEntry
from domain.shared import outbox
from domain.shared.caller import ChannelRef
from domain.shared.db import DriverStatement, driver_connection
from domain.shared.outbox import Event

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
    order: OrderRow | OrderHead,
    spec: EntrySpec,
    *,
    events_before: Sequence[Event] = (),
) -> StatusEntry:
    """Appends an entry and its event; `events_before` are written first, by the same statement."""
    (entry,) = await append_entries(session, order, [spec], events_before=events_before)
    return entry


async def append_entries(
    session: AsyncSession,
    order: OrderRow | OrderHead,
    specs: Sequence[EntrySpec],
    *,
    events_before: Sequence[Event] = (),
) -> list[StatusEntry]:
    """Appends entries in order with their events (`events_before` first): one statement."""
    conn = await driver_connection(session)
    written = await _APPEND.fetch(conn, _entry_params(session, order, specs, events_before))
    return [
        _appended(order, x, w["id"], w["recorded_at"], w["created_at"])
        for x, w in zip(specs, written, strict=True)
    ]


def _appended(
    order: OrderRow | OrderHead, spec: EntrySpec, entry_id: int, recorded_at: datetime, created_at: datetime
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
    session: AsyncSession, order: OrderRow, entry: StatusEntryRow, *, closed_by: str, note: str
) -> StatusEntry:
    """Closes the open entry `entry` (locked by the caller) with its event, in one statement."""
    conn = await driver_connection(session)
    (closed,) = await _CLOSE.fetch(
        conn,
        {
            "entry_id": entry.id,
            "closed_by": closed_by,
            "note": note,
            "channel": order.channel,
            **outbox.params(session, name="ev", derived_rows=1),
        },
    )
    return replace(
        to_entry(entry),
        closed_at=closed["closed_at"],
        closed_by=closed["closed_by"],
        close_note=closed["close_note"],
    )


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
    when = f"EXISTS (SELECT FROM {after})" if after else ""
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
    ), {outbox.cte("ev", derived=_entry_events("s", STATUS_APPENDED), when=when)}"""


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
            content_hash, content, reservation_id, submitted_at, reissued_from_order_id, reissue_reason,
            inventory_risk)
        VALUES (:order_id, :channel, :source_system, :intent_id, :external_order_id, :customer_ref, :currency,
                :subtotal, :tax, :shipping, :discount, :grand_total, :state, :content_hash,
                CAST(:content AS jsonb), :reservation_id, coalesce(CAST(:submitted_at AS timestamptz), now()),
                CAST(:reissued_from AS uuid), :reissue_reason, :inventory_risk)
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
        UPDATE orders.orders SET reservation_id = :reservation_id, inventory_risk = :inventory_risk,
            updated_at = now()
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
    order: OrderRow | OrderHead,
    specs: Sequence[EntrySpec],
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


async def insert_intent(
    session: AsyncSession,
    head: OrderHead,
    intent: Intent,
    *,
    channel: ChannelRef,
    content: dict[str, Any],
    digest: bytes,
    reservation_id: str | None,
    inventory_risk: bool,
    specs: Sequence[EntrySpec],
    before: Sequence[Event],
) -> asyncpg.Record | None:
    """Inserts the order of `intent` with its lines, payments, entries and
    events (`before` first) in one statement: its (submitted_at, created_at,
    updated_at), or None when an order already holds the intent key or the
    external id (no conflict target: after the winner's commit)."""
    t = intent.totals
    conn = await driver_connection(session)
    rows = await _INSERT_INTENT.fetch(
        conn,
        {
            **_entry_params(session, head, specs, before),
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
            "reissued_from": intent.reissued_from or None,
            "reissue_reason": intent.reissue_reason,
            "inventory_risk": inventory_risk,
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
    return rows[0] if rows else None


async def set_reservation(
    session: AsyncSession, head: OrderHead, reservation_id: str, spec: EntrySpec, *, inventory_risk: bool
) -> None:
    """Records the reservation (and whether it leaves the order at risk) on an
    order inserted by this transaction, with its entry, in one statement."""
    conn = await driver_connection(session)
    await _SET_RESERVATION.fetch(
        conn,
        {
            **_entry_params(session, head, [spec]),
            "reservation_id": reservation_id,
            "inventory_risk": inventory_risk,
        },
    )
