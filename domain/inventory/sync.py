"""SyncStock ingestion: batches of WMS/ERP events applied exactly once, set-based.

One batch = one transaction:

1. lock the source's cursor row (batches of one source apply one at a time,
   in order, on any replica);
2. validate each event on its own (malformed, negative SET, unknown
   warehouse, unknown SKU under the `reject` policy): a bad event is rejected
   with a reason and never fails its batch;
3. claim the event ids with one multi-row `INSERT ... ON CONFLICT DO NOTHING
   RETURNING`: ids that come back are new, the others were seen before
   (duplicates; a replayed rejection answers with its recorded reason);
4. lock the affected stock levels in (sku, warehouse) order, read the SET
   watermarks, and run the events in order in memory (stale SETs, stock rules
   identical to apply_stock_change: never below 0, never below reserved unless
   the item allows backorders);
5. write everything with a handful of statements whatever the batch size: one
   conditional UPDATE of the levels (compare-and-set on the locked rows'
   counters), one ledger+outbox statement (type `sync`, the payload of ledger.write), lots,
   watermarks, outcomes and the cursor.

The caller commits; an ack is sent only after that commit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.inventory import ledger
from domain.inventory.types import Cost, is_below_threshold
from domain.inventory.validation import MAX_QUANTITY, MAX_TEXT, WAREHOUSE_CODE, normalize_sku
from domain.shared import outbox
from domain.shared.errors import InvalidArgument
from domain.shared.money import is_currency

KINDS = ("set", "adjust", "receive")
UNKNOWN_SKU_POLICIES = ("create", "reject")
MAX_SOURCE = 128
MAX_EVENT_ID = 128
MAX_BATCH = 10_000
LEDGER_TYPE = "sync"


@dataclass(frozen=True, slots=True)
class SyncEvent:
    event_id: str
    sku: str
    warehouse_code: str
    # "set" | "adjust" | "receive"; anything else is rejected as UNKNOWN_KIND.
    kind: str
    quantity: int
    reason: str = ""
    # occurred_at in microseconds since the Unix epoch; None when unset.
    occurred_us: int | None = None
    unit_cost: Cost | None = None


@dataclass(frozen=True, slots=True)
class EventError:
    event_id: str
    reason: str
    message: str


@dataclass(frozen=True)
class Cursor:
    source: str
    last_event_id: str
    events_seen: int
    events_applied: int
    updated_at: datetime | None


@dataclass
class BatchResult:
    applied: int = 0
    duplicate: int = 0
    stale: int = 0
    rejected: int = 0
    errors: list[EventError] = field(default_factory=list)
    cursor: Cursor | None = None


def check_source(source: str) -> str:
    if not 1 <= len(source) <= MAX_SOURCE or not source.isprintable() or source != source.strip():
        raise InvalidArgument(
            "INVALID_SOURCE",
            "the sync source must be 1 to 128 printable characters",
            metadata={"field": "source"},
        )
    return source


def check_policy(policy: str) -> str:
    if policy not in UNKNOWN_SKU_POLICIES:
        raise ValueError(f"unknown SKU policy {policy!r}: expected one of {UNKNOWN_SKU_POLICIES}")
    return policy


def validate_event(e: SyncEvent) -> tuple[SyncEvent | None, EventError | None]:
    """Pure checks of one event: (normalised event, None) or (None, error)."""

    def bad(reason: str, message: str) -> tuple[None, EventError]:
        return None, EventError(e.event_id, reason, message)

    if e.kind not in KINDS:
        return bad("UNKNOWN_KIND", "kind must be SET, ADJUST or RECEIVE")
    sku = normalize_sku(e.sku)
    if sku is None:
        return bad("INVALID_SKU", "sku must be 1 to 128 printable characters")
    if not WAREHOUSE_CODE.match(e.warehouse_code):
        return bad("INVALID_WAREHOUSE_CODE", "warehouse_code must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
    q = e.quantity
    if e.kind == "set" and q < 0:
        return bad("NEGATIVE_QUANTITY", "a SET quantity must not be negative")
    if e.kind == "receive" and q <= 0:
        return bad("INVALID_QUANTITY", "a RECEIVE quantity must be positive")
    if e.kind == "adjust" and q == 0:
        return bad("INVALID_QUANTITY", "an ADJUST quantity must not be 0")
    if abs(q) > MAX_QUANTITY:
        return bad("INVALID_QUANTITY", f"quantity must be at most {MAX_QUANTITY} in magnitude")
    if e.kind == "set" and e.occurred_us is None:
        return bad("MISSING_OCCURRED_AT", "a SET needs occurred_at (it orders SETs)")
    if len(e.reason) > MAX_TEXT:
        return bad("INVALID_REASON", f"reason must be at most {MAX_TEXT} characters")
    if e.unit_cost is not None:
        if e.kind != "receive":
            return bad("UNEXPECTED_UNIT_COST", "unit_cost is only for RECEIVE")
        if not is_currency(e.unit_cost.currency) or not 0 <= e.unit_cost.amount_minor <= MAX_QUANTITY:
            return bad("INVALID_UNIT_COST", "unit_cost needs a supported currency and a non-negative amount")
    if sku != e.sku:
        e = SyncEvent(e.event_id, sku, e.warehouse_code, e.kind, q, e.reason, e.occurred_us, e.unit_cost)
    return e, None


_NEW_SOURCE = text("INSERT INTO inventory.sync_sources (source) VALUES (:source) ON CONFLICT DO NOTHING")
# A separate statement so its snapshot sees a row another transaction just inserted.
_LOCK_SOURCE = text("SELECT source FROM inventory.sync_sources WHERE source = :source FOR UPDATE")

_LOOKUP = text(
    """
    SELECT 'w' AS k, code AS key, false AS track, false AS bo, 0::bigint AS maxbo, 0::bigint AS thr
      FROM inventory.warehouses WHERE code = ANY(CAST(:whs AS text[]))
    UNION ALL
    SELECT 'i', sku, track_inventory, allow_backorder, max_backorder, low_stock_threshold
      FROM inventory.items WHERE sku = ANY(CAST(:skus AS text[]))
    """
)

# Hot-path statements take their rows as ONE json document (json_to_recordset):
# binding thousands of array elements costs more in the driver than the SQL.
_CLAIM = text(
    """
    WITH ins AS (
        INSERT INTO inventory.sync_events (source, event_id, outcome, reason, message)
        SELECT :source, t.id, CAST(t.o AS "char"), t.r, t.m
        FROM json_to_recordset(CAST(:rows AS json)) AS t(id text, o text, r text, m text)
        ON CONFLICT DO NOTHING
        RETURNING event_id
    )
    SELECT coalesce(array_agg(event_id), '{}') FROM ins
    """
)

_RECORDED = text(
    """
    SELECT event_id, CAST(outcome AS text) AS outcome, reason, message FROM inventory.sync_events
    WHERE source = :source AND event_id = ANY(CAST(:ids AS text[]))
    """
)

_CREATE_ITEMS = text(
    """
    INSERT INTO inventory.items (sku, track_inventory)
    SELECT s, true FROM unnest(CAST(:skus AS text[])) AS s
    ON CONFLICT DO NOTHING
    """
)

_ITEMS = text(
    """
    SELECT sku, track_inventory, allow_backorder, max_backorder, low_stock_threshold
    FROM inventory.items WHERE sku = ANY(CAST(:skus AS text[]))
    """
)

_ENSURE_LEVELS = text(
    """
    INSERT INTO inventory.stock_levels (sku, warehouse_code)
    SELECT s, w FROM unnest(CAST(:skus AS text[]), CAST(:whs AS text[])) AS t(s, w)
    ORDER BY s, w
    ON CONFLICT DO NOTHING
    """
)

# Every level of the affected SKUs (the totals decide the below-threshold
# flag), locked in one global order so concurrent writers cannot deadlock on
# them among themselves.
_LOCK_LEVELS = text(
    """
    SELECT sku, warehouse_code, on_hand, reserved FROM inventory.stock_levels
    WHERE sku = ANY(CAST(:skus AS text[]))
    ORDER BY sku, warehouse_code
    FOR NO KEY UPDATE
    """
)

_WATERMARKS = text(
    """
    SELECT sku, warehouse_code, last_set_us FROM inventory.sync_watermarks
    WHERE source = :source AND sku = ANY(CAST(:skus AS text[]))
    """
)

# Compare-and-set on counters read under the row lock above: the row changes
# only if it still holds exactly what the computation started from.
_UPDATE_LEVELS = text(
    """
    UPDATE inventory.stock_levels s
    SET on_hand = v.new, updated_at = now()
    FROM json_to_recordset(CAST(:rows AS json)) AS v(sku text, wh text, old bigint, new bigint, reserved bigint)
    WHERE s.sku = v.sku AND s.warehouse_code = v.wh AND s.on_hand = v.old AND s.reserved = v.reserved
    """
)

# Ledger rows and their outbox events in one statement, like ledger.write (same
# payload) without building a Movement per row. Ids are drawn in input order.
_WRITE = text(
    """
    WITH src AS MATERIALIZED (
        SELECT nextval('inventory.ledger_id_seq') AS id, t.*
        FROM ROWS FROM (json_to_recordset(CAST(:rows AS json))
             AS (sku text, wh text, ohb bigint, oha bigint, r bigint, reason text, ref text, cost bigint,
                 cur text, below boolean)) WITH ORDINALITY AS t(sku, wh, ohb, oha, r, reason, ref, cost, cur, below, ord)
    ), l AS (
        INSERT INTO inventory.ledger (id, sku, warehouse_code, type, on_hand_before, on_hand_after,
            reserved_before, reserved_after, reason, source, actor, reference, cost_minor, cost_currency)
        SELECT id, sku, wh, 'sync', ohb, oha, r, r, reason, :source, :actor, ref, cost, cur
        FROM src ORDER BY ord
    ), o AS (
        INSERT INTO platform.outbox (topic, aggregate_type, aggregate_id, payload)
        SELECT :topic, 'sku', sku, jsonb_build_object(
            'ledger_id', id, 'sku', sku, 'warehouse_code', wh, 'type', 'sync',
            'on_hand_delta', oha - ohb, 'reserved_delta', 0,
            'on_hand', oha, 'reserved', r, 'available', oha - r,
            'reason', reason, 'source', :source, 'reference', ref,
            'reservation_id', NULL, 'below_threshold', below)
        FROM src ORDER BY ord
    )
    SELECT coalesce(array_agg(id ORDER BY ord) FILTER (WHERE cost IS NOT NULL), '{}') FROM src
    """
)

_LOTS = text(
    """
    INSERT INTO inventory.lots (sku, warehouse_code, received_quantity, remaining_quantity,
                                unit_cost_minor, currency, ledger_id)
    SELECT sku, wh, qty, qty, cost, cur, lid
    FROM json_to_recordset(CAST(:rows AS json)) AS t(sku text, wh text, qty bigint, cost bigint, cur text, lid bigint)
    """
)

_UPSERT_WATERMARKS = text(
    """
    INSERT INTO inventory.sync_watermarks (source, sku, warehouse_code, last_set_us)
    SELECT :source, t.sku, t.wh, t.us FROM json_to_recordset(CAST(:rows AS json)) AS t(sku text, wh text, us bigint)
    ON CONFLICT (source, sku, warehouse_code)
    DO UPDATE SET last_set_us = greatest(inventory.sync_watermarks.last_set_us, EXCLUDED.last_set_us)
    """
)

_SET_OUTCOMES = text(
    """
    UPDATE inventory.sync_events e SET outcome = CAST(t.o AS "char"), reason = t.r, message = t.m
    FROM json_to_recordset(CAST(:rows AS json)) AS t(id text, o text, r text, m text)
    WHERE e.source = :source AND e.event_id = t.id
    """
)

_ADVANCE = text(
    """
    UPDATE inventory.sync_sources
    SET last_event_id = :last, events_seen = events_seen + :seen,
        events_applied = events_applied + :applied, updated_at = now()
    WHERE source = :source
    RETURNING source, last_event_id, events_seen, events_applied, updated_at
    """
)

_CURSOR = text(
    """
    SELECT source, last_event_id, events_seen, events_applied, updated_at
    FROM inventory.sync_sources WHERE source = :source
    """
)


def _cursor(row: Any) -> Cursor:
    return Cursor(
        row.source, row.last_event_id, int(row.events_seen), int(row.events_applied), row.updated_at
    )


async def get_cursor(session: AsyncSession, source: str) -> Cursor:
    """Where a source stands; an unknown source starts from the beginning."""
    source = check_source(source)
    row = (await session.execute(_CURSOR, {"source": source})).one_or_none()
    return _cursor(row) if row is not None else Cursor(source, "", 0, 0, None)


@dataclass
class _Item:
    track: bool
    backorder: bool
    max_backorder: int
    threshold: int


def _allowed(new: int, old: int, reserved: int, item: _Item) -> bool:
    """The stock rule of apply_stock_change, for one level."""
    if new < 0:
        return False
    if new >= old or new >= reserved or not item.track:
        return True
    return item.backorder and (item.max_backorder == 0 or reserved - new <= item.max_backorder)


async def apply_batch(
    session: AsyncSession,
    source: str,
    events: Sequence[SyncEvent],
    *,
    unknown_sku: str = "create",
    actor: str = "",
) -> BatchResult:
    """Apply one batch in the caller's transaction (see the module docstring)."""
    source = check_source(source)
    check_policy(unknown_sku)
    if not 1 <= len(events) <= MAX_BATCH:
        raise InvalidArgument(
            "INVALID_BATCH", f"a batch holds 1 to {MAX_BATCH} events", metadata={"events": str(len(events))}
        )
    await session.execute(_NEW_SOURCE, {"source": source})
    await session.execute(_LOCK_SOURCE, {"source": source})
    res = BatchResult()

    # 2. Pure validation; in-batch duplicates (first occurrence wins).
    seen_ids: set[str] = set()
    valid: list[SyncEvent] = []
    # Claims: event id -> (outcome, reason, message) known before applying.
    pre: dict[str, EventError] = {}
    order: list[str] = []
    for e in events:
        if not 1 <= len(e.event_id) <= MAX_EVENT_ID:
            # No usable key: reported, but cannot be recorded.
            res.rejected += 1
            res.errors.append(
                EventError(e.event_id, "INVALID_EVENT_ID", "event_id must be 1 to 128 characters")
            )
            continue
        if e.event_id in seen_ids:
            res.duplicate += 1
            continue
        seen_ids.add(e.event_id)
        order.append(e.event_id)
        ok, err = validate_event(e)
        if err is not None:
            pre[e.event_id] = err
        else:
            assert ok is not None
            valid.append(ok)

    # Warehouses and items referenced by the valid events.
    skus = sorted({e.sku for e in valid})
    whs = sorted({e.warehouse_code for e in valid})
    known_wh: set[str] = set()
    items: dict[str, _Item] = {}
    if valid:
        for r in (await session.execute(_LOOKUP, {"whs": whs, "skus": skus})).all():
            if r.k == "w":
                known_wh.add(r.key)
            else:
                items[r.key] = _Item(bool(r.track), bool(r.bo), int(r.maxbo), int(r.thr))
    candidates: list[SyncEvent] = []
    for e in valid:
        if e.warehouse_code not in known_wh:
            pre[e.event_id] = EventError(
                e.event_id, "UNKNOWN_WAREHOUSE", f"warehouse {e.warehouse_code!r} does not exist"
            )
        elif e.sku not in items and unknown_sku == "reject":
            pre[e.event_id] = EventError(
                e.event_id, "UNKNOWN_SKU", f"inventory item {e.sku!r} does not exist"
            )
        else:
            candidates.append(e)

    # 3. Claim every keyed event id at once.
    claim_ids = order
    new_ids: set[str] = set()
    if claim_ids:
        rows = [
            {"id": i, "o": "r", "r": pre[i].reason, "m": pre[i].message} if i in pre else {"id": i, "o": "a"}
            for i in claim_ids
        ]
        inserted = (await session.execute(_CLAIM, {"source": source, "rows": _json(rows)})).scalar_one()
        new_ids = set(inserted)
    dup_ids = [i for i in claim_ids if i not in new_ids]
    if dup_ids:
        for r in (await session.execute(_RECORDED, {"source": source, "ids": dup_ids})).all():
            if r.outcome == "r":
                # A replayed rejection answers the same.
                res.rejected += 1
                res.errors.append(EventError(r.event_id, r.reason or "", r.message or ""))
            else:
                res.duplicate += 1
    for i in claim_ids:
        if i in new_ids and i in pre:
            res.rejected += 1
            res.errors.append(pre[i])
    todo = [e for e in candidates if e.event_id in new_ids]

    late: list[EventError] = []
    stale_ids: list[str] = []
    applied_ids: list[str] = []
    if todo:
        await _apply(session, source, todo, items, res, late, stale_ids, applied_ids, actor)
    if late or stale_ids:
        outcome_rows = [{"id": e.event_id, "o": "r", "r": e.reason, "m": e.message} for e in late]
        outcome_rows += [{"id": i, "o": "s"} for i in stale_ids]
        await session.execute(_SET_OUTCOMES, {"source": source, "rows": _json(outcome_rows)})
    last = events[-1].event_id
    row = (
        await session.execute(
            _ADVANCE, {"source": source, "last": last, "seen": len(events), "applied": res.applied}
        )
    ).one()
    res.cursor = _cursor(row)
    return res


async def _apply(
    session: AsyncSession,
    source: str,
    todo: list[SyncEvent],
    items: dict[str, _Item],
    res: BatchResult,
    late: list[EventError],
    stale_ids: list[str],
    applied_ids: list[str],
    actor: str,
) -> None:
    skus = sorted({e.sku for e in todo})
    missing = [s for s in skus if s not in items]
    if missing:
        # Policy "create": an unknown SKU becomes a tracked item with defaults.
        await session.execute(_CREATE_ITEMS, {"skus": missing})
        for r in (await session.execute(_ITEMS, {"skus": missing})).all():
            items[r.sku] = _Item(
                bool(r.track_inventory),
                bool(r.allow_backorder),
                int(r.max_backorder),
                int(r.low_stock_threshold),
            )
    pairs = sorted({(e.sku, e.warehouse_code) for e in todo})
    levels: dict[tuple[str, str], list[int]] = {}
    per_sku: dict[str, list[tuple[str, str]]] = {}
    for attempt in range(2):
        levels.clear()
        per_sku.clear()
        for r in (await session.execute(_LOCK_LEVELS, {"skus": skus})).all():
            levels[(r.sku, r.warehouse_code)] = [int(r.on_hand), int(r.reserved)]
            per_sku.setdefault(r.sku, []).append((r.sku, r.warehouse_code))
        missing_pairs = [p for p in pairs if p not in levels]
        if not missing_pairs or attempt:
            break
        # First change of a SKU in a warehouse: create its level, then lock again.
        await session.execute(
            _ENSURE_LEVELS, {"skus": [p[0] for p in missing_pairs], "whs": [p[1] for p in missing_pairs]}
        )
    original = {k: v[0] for k, v in levels.items()}
    marks: dict[tuple[str, str], int] = {
        (r.sku, r.warehouse_code): int(r.last_set_us)
        for r in (await session.execute(_WATERMARKS, {"source": source, "skus": skus})).all()
    }
    new_marks: dict[tuple[str, str], int] = {}
    drafts: list[dict[str, Any]] = []
    lots: list[SyncEvent] = []
    for e in todo:
        key = (e.sku, e.warehouse_code)
        item = items[e.sku]
        level = levels[key]
        old, reserved = level
        if e.kind == "set":
            mark = marks.get(key)
            assert e.occurred_us is not None
            if mark is not None and e.occurred_us < mark:
                res.stale += 1
                stale_ids.append(e.event_id)
                continue
            new = e.quantity
        else:
            new = old + e.quantity
        if not _allowed(new, old, reserved, item):
            if new < 0:
                err = EventError(
                    e.event_id, "INSUFFICIENT_STOCK", f"on_hand {old} of {e.sku!r} would go below 0"
                )
            else:
                err = EventError(
                    e.event_id,
                    "STOCK_RESERVED",
                    f"on_hand of {e.sku!r} would be {new}, below the {reserved} reserved units",
                )
            res.rejected += 1
            res.errors.append(err)
            late.append(err)
            continue
        if e.kind == "set":
            marks[key] = new_marks[key] = e.occurred_us  # type: ignore[assignment]
        level[0] = new
        group = per_sku[e.sku]
        total = new - reserved if len(group) == 1 else sum(levels[k][0] - levels[k][1] for k in group)
        row: dict[str, Any] = {
            "sku": e.sku,
            "wh": e.warehouse_code,
            "ohb": old,
            "oha": new,
            "r": reserved,
            "reason": e.reason,
            "ref": e.event_id,
            "below": is_below_threshold(total, item.threshold),
        }
        if e.unit_cost is not None:
            row["cost"] = e.unit_cost.amount_minor * e.quantity
            row["cur"] = e.unit_cost.currency
            lots.append(e)
        drafts.append(row)
        applied_ids.append(e.event_id)
    res.applied += len(drafts)
    if not drafts:
        return
    changed = [k for k in sorted(levels) if levels[k][0] != original[k]]
    if changed:
        rows = [
            {"sku": k[0], "wh": k[1], "old": original[k], "new": levels[k][0], "reserved": levels[k][1]}
            for k in changed
        ]
        result = await session.execute(_UPDATE_LEVELS, {"rows": _json(rows)})
        if (getattr(result, "rowcount", -1) or 0) != len(changed):
            # Cannot happen while the rows are locked; refuse rather than write a wrong ledger.
            raise RuntimeError("stock levels changed under a sync batch's lock")
    lot_ledger_ids = (
        await session.execute(
            _WRITE, {"rows": _json(drafts), "source": source, "actor": actor, "topic": ledger.TOPIC}
        )
    ).scalar_one()
    # Outbox rows written by hand: wake the watchers after commit.
    outbox.mark_written(session)
    if lots:
        lot_rows = [
            {
                "sku": e.sku,
                "wh": e.warehouse_code,
                "qty": e.quantity,
                "cost": e.unit_cost.amount_minor if e.unit_cost else 0,
                "cur": e.unit_cost.currency if e.unit_cost else "",
                "lid": lid,
            }
            for e, lid in zip(lots, lot_ledger_ids, strict=True)
        ]
        await session.execute(_LOTS, {"rows": _json(lot_rows)})
    if new_marks:
        wm_rows = [{"sku": k[0], "wh": k[1], "us": new_marks[k]} for k in sorted(new_marks)]
        await session.execute(_UPSERT_WATERMARKS, {"source": source, "rows": _json(wm_rows)})


def _json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, separators=(",", ":"), ensure_ascii=False)
