"""The ledger and its outbox events, written together in ONE statement.

Every counter change appends a ledger row and an `inventory.stock_changed`
outbox event in the same transaction. Ledger ids are drawn in the statement
(nextval in a materialised CTE) so a multi-row write returns ids in input order
without relying on RETURNING order.

An event covers the ledger movements `first_ledger_id`..`ledger_id` of its
level: one movement (`ctes(per_level=False)`, every writer but SyncStock, the
two ids equal) or all of a statement's movements of the level (`per_level=True`,
a SyncStock batch: one event per level, the level's counters after its last
movement, the deltas summed over them).

Every caller runs these statements while its transaction holds the row locks of
the movements' levels (inventory.stock_levels), taken by an earlier statement:
per level, ledger ids then follow commit order, which the events' order
(docs/events.md) and the stock audit's checkpoints (audit_store.py) rely on.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.inventory.types import Cost, Movement
from domain.shared import outbox

TOPIC = "inventory.stock_changed"


@dataclass(frozen=True)
class Draft:
    """A movement to write; before/after are the level's counters around it."""

    sku: str
    warehouse_code: str
    type: str
    on_hand_before: int
    on_hand_after: int
    reserved_before: int
    reserved_after: int
    below_threshold: bool
    reason: str = ""
    source: str = ""
    actor: str = ""
    reference: str = ""
    reservation_id: uuid.UUID | None = None
    cost: Cost | None = None
    kit_sku: str = ""  # a component movement of this kit line of the reservation


# The inventory.stock_changed payload of `e`, its one builder: the movement (a row of
# `src`) behind the event's counters, with the first ledger id the event covers
# (first_id) and its deltas.
def _events(rows: str) -> str:
    return f"""
        SELECT e.input_order, '{TOPIC}', 'sku', e.sku, NULL, jsonb_build_object(
            'ledger_id', e.id, 'first_ledger_id', e.first_id, 'sku', e.sku, 'warehouse_code', e.warehouse_code,
            'type', e.type, 'on_hand_delta', e.on_hand_delta, 'reserved_delta', e.reserved_delta,
            'on_hand', e.on_hand_after, 'reserved', e.reserved_after, 'available', e.on_hand_after - e.reserved_after,
            'reason', e.reason, 'source', e.source, 'reference', e.reference,
            'reservation_id', e.reservation_id, 'below_threshold', e.below_threshold)
            || CASE WHEN e.kit_sku IS NULL THEN '{{}}'::jsonb ELSE jsonb_build_object('kit_sku', e.kit_sku) END
        FROM {rows} AS e"""


# One event per movement.
_EVENT_PER_MOVEMENT = _events(
    """(SELECT src.*, id AS first_id, on_hand_after - on_hand_before AS on_hand_delta,
                          reserved_after - reserved_before AS reserved_delta FROM src)"""
)

# One event per level: its last movement (highest id: ids follow input order, and a
# level's movements are applied in that order), the first id, the deltas summed.
_EVENT_PER_LEVEL = _events(
    """(SELECT s.*, g.first_id, g.on_hand_delta, g.reserved_delta
               FROM (SELECT max(id) AS last_id, min(id) AS first_id,
                            CAST(sum(on_hand_after - on_hand_before) AS bigint) AS on_hand_delta,
                            CAST(sum(reserved_after - reserved_before) AS bigint) AS reserved_delta
                     FROM src GROUP BY sku, warehouse_code) g
               JOIN src s ON s.id = g.last_id)"""
)

# The movements of `params`, one row per draft in input order.
_DRAFTS = """
        SELECT * FROM unnest(
            CAST(:ledger_sku AS text[]), CAST(:ledger_warehouse_code AS text[]), CAST(:ledger_type AS text[]),
            CAST(:ledger_on_hand_before AS bigint[]), CAST(:ledger_on_hand_after AS bigint[]),
            CAST(:ledger_reserved_before AS bigint[]), CAST(:ledger_reserved_after AS bigint[]),
            CAST(:ledger_reason AS text[]), CAST(:ledger_source AS text[]), CAST(:ledger_actor AS text[]),
            CAST(:ledger_reference AS text[]), CAST(:ledger_reservation_id AS uuid[]),
            CAST(:ledger_cost_minor AS bigint[]), CAST(:ledger_cost_currency AS text[]),
            CAST(:ledger_below_threshold AS boolean[]), CAST(:ledger_kit_sku AS text[])
        ) WITH ORDINALITY AS t(sku, warehouse_code, type, on_hand_before, on_hand_after, reserved_before,
                              reserved_after, reason, source, actor, reference, reservation_id, cost_minor,
                              cost_currency, below_threshold, kit_sku, input_order)"""


def ctes(movements: str = _DRAFTS, *, per_level: bool = False) -> str:
    """The ledger + outbox CTEs, reusable inside a larger statement (reservations
    and sync batches write everything in one statement): `src` (the movements
    with their ledger ids), `l` (the ledger rows) and `o` (their events: one per
    movement, or with `per_level` one per level covering its movements).
    `movements`: a SELECT of (sku, warehouse_code, type, on_hand_before,
    on_hand_after, reserved_before, reserved_after, reason, source, actor,
    reference, reservation_id, cost_minor, cost_currency, below_threshold,
    kit_sku, input_order), input_order giving the order; by default
    the drafts of `params`. The statement's outbox parameters come from
    `params` (or outbox.params(name="o") when `movements` is the caller's)."""
    return f"""
    src AS MATERIALIZED (
        SELECT nextval('inventory.ledger_id_seq') AS id, m.* FROM ({movements}) AS m
    ), l AS (
        INSERT INTO inventory.ledger (id, sku, warehouse_code, type, on_hand_before, on_hand_after,
            reserved_before, reserved_after, reason, source, actor, reference, reservation_id,
            cost_minor, cost_currency, kit_sku)
        SELECT id, sku, warehouse_code, type, on_hand_before, on_hand_after, reserved_before, reserved_after,
               reason, source, actor, reference, reservation_id, cost_minor, cost_currency, kit_sku
        FROM src ORDER BY input_order
    ), {outbox.cte("o", derived=_EVENT_PER_LEVEL if per_level else _EVENT_PER_MOVEMENT, events=False)}
"""


CTES = ctes()

_WRITE = text("WITH " + CTES + " SELECT id, now() AS created_at FROM src ORDER BY input_order")


def params(session: AsyncSession, drafts: Sequence[Draft]) -> dict[str, object]:
    """The parameters of CTES for `drafts` (outbox ones included: the session
    wakes the watchers after it commits)."""
    return {
        **outbox.params(session, name="o", derived_rows=len(drafts)),
        "ledger_sku": [d.sku for d in drafts],
        "ledger_warehouse_code": [d.warehouse_code for d in drafts],
        "ledger_type": [d.type for d in drafts],
        "ledger_on_hand_before": [d.on_hand_before for d in drafts],
        "ledger_on_hand_after": [d.on_hand_after for d in drafts],
        "ledger_reserved_before": [d.reserved_before for d in drafts],
        "ledger_reserved_after": [d.reserved_after for d in drafts],
        "ledger_reason": [d.reason for d in drafts],
        "ledger_source": [d.source for d in drafts],
        "ledger_actor": [d.actor for d in drafts],
        "ledger_reference": [d.reference for d in drafts],
        "ledger_reservation_id": [d.reservation_id for d in drafts],
        "ledger_cost_minor": [d.cost.amount_minor if d.cost else None for d in drafts],
        "ledger_cost_currency": [d.cost.currency if d.cost else None for d in drafts],
        "ledger_below_threshold": [d.below_threshold for d in drafts],
        "ledger_kit_sku": [d.kit_sku or None for d in drafts],
    }


async def write(session: AsyncSession, drafts: Sequence[Draft]) -> list[Movement]:
    """Append ledger rows + outbox events; returns the movements in input order."""
    if not drafts:
        return []
    rows = (await session.execute(_WRITE, params(session, drafts))).all()
    return [_movement(d, int(row[0]), row[1]) for d, row in zip(drafts, rows, strict=True)]


def _movement(d: Draft, ledger_id: int, created_at: datetime) -> Movement:
    return Movement(
        id=ledger_id,
        sku=d.sku,
        warehouse_code=d.warehouse_code,
        type=d.type,
        on_hand_before=d.on_hand_before,
        on_hand_after=d.on_hand_after,
        reserved_before=d.reserved_before,
        reserved_after=d.reserved_after,
        reason=d.reason,
        source=d.source,
        actor=d.actor,
        reference=d.reference,
        reservation_id=d.reservation_id,
        cost=d.cost,
        created_at=created_at,
        kit_sku=d.kit_sku,
    )
