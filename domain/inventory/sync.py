"""SyncStock ingestion: batches of WMS/ERP events applied exactly once, set-based.

One batch = one transaction, four round trips in the common case:

1. lock the source's cursor row (batches of one source apply one at a time,
   in order, on any replica; every writer of a source's claims, watermarks
   and cursor holds this lock);
2. validate each event on its own (malformed, negative SET, unknown
   warehouse, unknown SKU under the `reject` policy): a bad event is rejected
   with a reason and never fails its batch;
3. one lookup: warehouses, items, and the batch's event ids already claimed
   by the source (duplicates; a replayed rejection answers with its recorded
   reason);
4. lock the affected stock levels in (sku, warehouse) order with their SET
   watermarks, and run the events in order in memory (stale SETs, stock rules
   identical to apply_stock_change: never below 0, never below reserved unless
   the item allows backorders);
5. write everything in ONE statement whatever the batch size: the
   conditional UPDATE of the levels (compare-and-set on the locked rows'
   counters), ledger+outbox rows (type `sync`, through ledger.ctes),
   the claims of the new event ids with their outcome, watermarks and the
   cursor (lots, for RECEIVEs with a unit cost, follow).

The caller commits; an ack is sent only after that commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.inventory import ledger
from domain.inventory.stock_rules import Policy, may_set_on_hand
from domain.inventory.types import Cost
from domain.inventory.validation import MAX_QUANTITY, MAX_TEXT, WAREHOUSE_CODE, normalize_sku
from domain.shared import outbox
from domain.shared.db import DriverStatement, driver_connection
from domain.shared.errors import InvalidArgument
from domain.shared.money import is_currency

if TYPE_CHECKING:
    import asyncpg  # a run-time import would be repeated in Temporal's workflow sandbox (crash)

KINDS = ("set", "adjust", "receive")
UNKNOWN_SKU_POLICIES = ("create", "reject")
MAX_SOURCE = 128
MAX_EVENT_ID = 128
MAX_BATCH = 10_000


class SyncEvent(NamedTuple):
    """One event of a batch (a NamedTuple: thousands are built per batch)."""

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
    sku = normalize_sku(e.sku) if e.kind in KINDS else None
    err = _problem(e, sku)
    if err is not None:
        return None, err
    assert sku is not None
    if sku != e.sku:
        e = e._replace(sku=sku)
    return e, None


def _problem(e: SyncEvent, sku: str | None) -> EventError | None:
    """The first rule `e` breaks, given its normalised SKU (None when invalid)."""

    def bad(reason: str, message: str) -> EventError:
        return EventError(e.event_id, reason, message)

    kind = e.kind
    if kind not in KINDS:
        return bad("UNKNOWN_KIND", "kind must be SET, ADJUST or RECEIVE")
    if sku is None:
        return bad("INVALID_SKU", "sku must be 1 to 128 printable characters")
    if not WAREHOUSE_CODE.match(e.warehouse_code):
        return bad("INVALID_WAREHOUSE_CODE", "warehouse_code must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
    q = e.quantity
    if kind == "set" and q < 0:
        return bad("NEGATIVE_QUANTITY", "a SET quantity must not be negative")
    if kind == "receive" and q <= 0:
        return bad("INVALID_QUANTITY", "a RECEIVE quantity must be positive")
    if kind == "adjust" and q == 0:
        return bad("INVALID_QUANTITY", "an ADJUST quantity must not be 0")
    if abs(q) > MAX_QUANTITY:
        return bad("INVALID_QUANTITY", f"quantity must be at most {MAX_QUANTITY} in magnitude")
    if kind == "set" and e.occurred_us is None:
        return bad("MISSING_OCCURRED_AT", "a SET needs occurred_at (it orders SETs)")
    if len(e.reason) > MAX_TEXT or "\0" in e.reason:
        return bad("INVALID_REASON", f"reason must be at most {MAX_TEXT} characters, without NUL")
    cost = e.unit_cost
    if cost is not None:
        if kind != "receive":
            return bad("UNEXPECTED_UNIT_COST", "unit_cost is only for RECEIVE")
        if not is_currency(cost.currency) or not 0 <= cost.amount_minor <= MAX_QUANTITY:
            return bad("INVALID_UNIT_COST", "unit_cost needs a supported currency and a non-negative amount")
    return None


# Hot statements run on the asyncpg connection under the session (driver_connection):
# typed arrays + unnest cost the server less than JSON documents, and joins against
# unnest() stay cheap under the generic plans of prepared statements (a
# `col = ANY($n)` filter there is a linear search per row).

_LOCK_SOURCE = "SELECT 1 FROM inventory.sync_sources WHERE source = $1 FOR UPDATE"
# A separate statement from the lock above, so the next lock's snapshot sees a
# row another transaction just inserted.
_NEW_SOURCE = "INSERT INTO inventory.sync_sources (source) VALUES ($1) ON CONFLICT DO NOTHING"

# Warehouses ('w'), items ('i') and the ids of this batch already claimed by the
# source (their outcome 'a' / 's' / 'r'), in one round trip. Claims read here are
# stable: every writer of a source's claims holds its cursor lock.
_LOOKUP = """
    SELECT 'w' AS k, w.code AS key, false AS track, false AS bo, 0::bigint AS maxbo, 0::bigint AS thr,
           NULL::text AS reason, NULL::text AS message
      FROM inventory.warehouses w WHERE w.code = ANY($1::text[])
    UNION ALL
    SELECT 'i', i.sku, i.track_inventory, i.allow_backorder, i.max_backorder, i.low_stock_threshold, NULL, NULL
      FROM unnest($2::text[]) AS x(sku) JOIN inventory.items i ON i.sku = x.sku
    UNION ALL
    SELECT CAST(e.outcome AS text), e.event_id, false, false, 0, 0, e.reason, e.message
      FROM unnest($4::text[]) AS x(id) JOIN inventory.sync_events e ON e.source = $3 AND e.event_id = x.id
"""

_CREATE_ITEMS = """
    INSERT INTO inventory.items (sku, track_inventory)
    SELECT s, true FROM unnest($1::text[]) AS s ORDER BY s
    ON CONFLICT DO NOTHING
"""

_ITEMS = """
    SELECT 'i' AS k, i.sku, i.track_inventory, i.allow_backorder, i.max_backorder, i.low_stock_threshold
    FROM unnest($1::text[]) AS x(sku) JOIN inventory.items i ON i.sku = x.sku
"""

_ENSURE_LEVELS = """
    INSERT INTO inventory.stock_levels (sku, warehouse_code)
    SELECT s, w FROM unnest($1::text[], $2::text[]) AS t(s, w)
    ORDER BY s, w
    ON CONFLICT DO NOTHING
"""

# Every level of the affected SKUs (the totals decide the below-threshold
# flag), locked in one global order so concurrent writers cannot deadlock on
# them among themselves, with this source's SET watermark of each.
_LOCK_LEVELS = """
    SELECT l.sku, l.warehouse_code, l.on_hand, l.reserved, m.last_set_us
    FROM unnest($1::text[]) AS x(sku)
    JOIN inventory.stock_levels l ON l.sku = x.sku
    LEFT JOIN inventory.sync_watermarks m
           ON m.source = $2 AND m.sku = l.sku AND m.warehouse_code = l.warehouse_code
    ORDER BY l.sku, l.warehouse_code
    FOR NO KEY UPDATE OF l
"""

# Everything a batch writes, in one statement:
# - upd: compare-and-set on counters read under the row lock above (a row
#   changes only if it still holds exactly what the computation started from);
# - src/l/o: ledger rows and their outbox events (ledger.ctes of _MOVEMENTS),
#   ids drawn in input order;
# - c: the claims of every new keyed event id with its final outcome: the
#   applied ones are the ledger rows' references, the others come with their
#   outcome (plain INSERT: the lookup under the cursor lock found none of them;
#   a claim that exists anyway fails the batch rather than apply an event twice);
# - marks/wu/wi: SET watermarks, updated or inserted (the lock query saw which
#   exist; only holders of the cursor lock write them); a: the cursor.
_MOVEMENTS = """
        SELECT t.sku, t.wh, 'sync' AS type, t.ohb, t.oha, t.r AS rb, t.r AS ra, t.reason,
               CAST(:source AS text) AS source, CAST(:actor AS text) AS actor, t.ref, CAST(NULL AS uuid) AS rid,
               t.cost, t.cur, t.below, t.ord
        FROM unnest(CAST(:l_sku AS text[]), CAST(:l_wh AS text[]), CAST(:l_ohb AS bigint[]),
                    CAST(:l_oha AS bigint[]), CAST(:l_r AS bigint[]), CAST(:l_reason AS text[]),
                    CAST(:l_ref AS text[]), CAST(:l_cost AS bigint[]), CAST(:l_cur AS text[]),
                    CAST(:l_below AS boolean[]))
             WITH ORDINALITY AS t(sku, wh, ohb, oha, r, reason, ref, cost, cur, below, ord)"""

_WRITE = DriverStatement(
    """
    WITH upd AS (
        UPDATE inventory.stock_levels s
        SET on_hand = v.new, updated_at = now()
        FROM unnest(CAST(:v_sku AS text[]), CAST(:v_wh AS text[]), CAST(:v_old AS bigint[]),
                    CAST(:v_new AS bigint[]), CAST(:v_reserved AS bigint[]))
             AS v(sku, wh, old, new, reserved)
        WHERE s.sku = v.sku AND s.warehouse_code = v.wh AND s.on_hand = v.old AND s.reserved = v.reserved
        RETURNING 1
    ), """
    + ledger.ctes(_MOVEMENTS)
    + """, c AS (
        INSERT INTO inventory.sync_events (source, event_id, outcome, reason, message)
        SELECT :source, ref, 'a', NULL, NULL FROM src
        UNION ALL
        SELECT :source, t.id, CAST(t.o AS "char"), t.r, t.m
        FROM unnest(CAST(:c_id AS text[]), CAST(:c_outcome AS text[]), CAST(:c_reason AS text[]),
                    CAST(:c_message AS text[])) AS t(id, o, r, m)
    ), marks AS (
        SELECT * FROM unnest(CAST(:m_sku AS text[]), CAST(:m_wh AS text[]), CAST(:m_us AS bigint[]),
                             CAST(:m_known AS boolean[])) AS t(sku, wh, us, known)
    ), wu AS (
        UPDATE inventory.sync_watermarks m SET last_set_us = greatest(m.last_set_us, t.us)
        FROM marks t
        WHERE t.known AND m.source = :source AND m.sku = t.sku AND m.warehouse_code = t.wh
    ), wi AS (
        INSERT INTO inventory.sync_watermarks (source, sku, warehouse_code, last_set_us)
        SELECT :source, t.sku, t.wh, t.us FROM marks t WHERE NOT t.known
    ), a AS (
        UPDATE inventory.sync_sources
        SET last_event_id = :last_event_id, events_seen = events_seen + :seen,
            events_applied = events_applied + :applied, updated_at = now()
        WHERE source = :source
        RETURNING source, last_event_id, events_seen, events_applied, updated_at
    )
    SELECT (SELECT count(*) FROM upd) AS updated,
           (SELECT coalesce(array_agg(id ORDER BY ord) FILTER (WHERE cost IS NOT NULL), '{}') FROM src) AS lot_ids,
           a.source, a.last_event_id, a.events_seen, a.events_applied, a.updated_at
    FROM a
"""
)

_LOTS = """
    INSERT INTO inventory.lots (sku, warehouse_code, received_quantity, remaining_quantity,
                                unit_cost_minor, currency, ledger_id)
    SELECT sku, wh, qty, qty, cost, cur, lid
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::bigint[])
         AS t(sku, wh, qty, cost, cur, lid)
"""

_CURSOR = text(
    """
    SELECT source, last_event_id, events_seen, events_applied, updated_at
    FROM inventory.sync_sources WHERE source = :source
    """
)


def _cursor(row: Any) -> Cursor:
    return Cursor(
        row["source"],
        row["last_event_id"],
        int(row["events_seen"]),
        int(row["events_applied"]),
        row["updated_at"],
    )


async def get_cursor(session: AsyncSession, source: str) -> Cursor:
    """Where a source stands; an unknown source starts from the beginning."""
    source = check_source(source)
    row = (await session.execute(_CURSOR, {"source": source})).mappings().one_or_none()
    return _cursor(row) if row is not None else Cursor(source, "", 0, 0, None)


# An item as the lookups return it (asyncpg records, used as they come):
# (kind, sku, track_inventory, allow_backorder, max_backorder, low_stock_threshold).
_TRACK, _BACKORDER, _MAX_BACKORDER, _THRESHOLD = 2, 3, 4, 5


def _policy(item: Any) -> Policy:
    return Policy(
        bool(item[_TRACK]), bool(item[_BACKORDER]), int(item[_MAX_BACKORDER]), int(item[_THRESHOLD])
    )


@dataclass(slots=True)
class _Writes:
    """Column arrays of the batch's write statement."""

    # Ledger + outbox rows, in event order.
    sku: list[str] = field(default_factory=list)
    wh: list[str] = field(default_factory=list)
    ohb: list[int] = field(default_factory=list)
    oha: list[int] = field(default_factory=list)
    reserved: list[int] = field(default_factory=list)
    reason: list[str] = field(default_factory=list)
    ref: list[str] = field(default_factory=list)
    cost: list[int | None] = field(default_factory=list)
    cur: list[str | None] = field(default_factory=list)
    below: list[bool] = field(default_factory=list)
    # Claims of the events not applied (stale or rejected).
    claim_id: list[str] = field(default_factory=list)
    claim_outcome: list[str] = field(default_factory=list)
    claim_reason: list[str | None] = field(default_factory=list)
    claim_message: list[str | None] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A batch after every check that needs no database (`prepare`): the SyncStock
    servicer prepares the next batch while the current one is in its transaction."""

    size: int
    last_event_id: str
    # Repeats of an id earlier in the batch (the first occurrence wins).
    duplicate: int
    # Events without a usable id: reported, but cannot be recorded.
    invalid_ids: list[EventError]
    # Keyed event ids (first occurrences), in order.
    order: list[str]
    # Normalised events that passed validation, in order.
    valid: list[SyncEvent]
    # Ids rejected by validation.
    rejected: dict[str, EventError]
    skus: list[str]
    warehouses: list[str]


def prepare(events: Sequence[SyncEvent]) -> PreparedBatch:
    """Pure validation of a batch; in-batch duplicates (first occurrence wins)."""
    if not 1 <= len(events) <= MAX_BATCH:
        raise InvalidArgument(
            "INVALID_BATCH", f"a batch holds 1 to {MAX_BATCH} events", metadata={"events": str(len(events))}
        )
    seen_ids: set[str] = set()
    valid: list[SyncEvent] = []
    pre: dict[str, EventError] = {}
    order: list[str] = []
    invalid: list[EventError] = []
    duplicate = 0
    for e in events:
        eid = e.event_id
        if eid in seen_ids:
            duplicate += 1
            continue
        if not 1 <= len(eid) <= MAX_EVENT_ID or "\0" in eid:
            # Not claimable (PostgreSQL text cannot hold NUL): rejected, never stored.
            invalid.append(
                EventError(eid, "INVALID_EVENT_ID", "event_id must be 1 to 128 characters, without NUL")
            )
            continue
        seen_ids.add(eid)
        order.append(eid)
        # validate_event, without a result tuple per event.
        sku = normalize_sku(e.sku) if e.kind in KINDS else None
        err = _problem(e, sku)
        if err is not None:
            pre[eid] = err
        elif sku == e.sku:
            valid.append(e)
        else:
            assert sku is not None
            valid.append(e._replace(sku=sku))
    return PreparedBatch(
        len(events),
        events[-1].event_id,
        duplicate,
        invalid,
        order,
        valid,
        pre,
        list({e.sku for e in valid}),
        list({e.warehouse_code for e in valid}),
    )


async def apply_batch(
    session: AsyncSession,
    source: str,
    events: Sequence[SyncEvent] | PreparedBatch,
    *,
    unknown_sku: str = "create",
    actor: str = "",
) -> BatchResult:
    """Apply one batch (events, or a batch already `prepare`d) in the caller's
    transaction (see the module docstring)."""
    source = check_source(source)
    check_policy(unknown_sku)
    batch = events if isinstance(events, PreparedBatch) else prepare(events)
    conn = await driver_connection(session)
    if await conn.fetchval(_LOCK_SOURCE, source) is None:
        await conn.execute(_NEW_SOURCE, source)
        await conn.fetchval(_LOCK_SOURCE, source)
    res = BatchResult(
        duplicate=batch.duplicate, rejected=len(batch.invalid_ids), errors=list(batch.invalid_ids)
    )
    valid = batch.valid
    order = batch.order
    pre = dict(batch.rejected)
    skus = batch.skus
    whs = batch.warehouses

    # 3. Warehouses and items referenced by the valid events, and earlier claims.
    known_wh: set[str] = set()
    items: dict[str, Any] = {}
    recorded: dict[str, tuple[str, str, str]] = {}
    if order:
        for r in await conn.fetch(_LOOKUP, whs, skus, source, order):
            k = r[0]
            if k == "i":
                items[r[1]] = r
            elif k == "w":
                known_wh.add(r[1])
            else:
                recorded[r[1]] = (k, r[6] or "", r[7] or "")
    for e in valid:
        if e.warehouse_code not in known_wh:
            pre[e.event_id] = EventError(
                e.event_id, "UNKNOWN_WAREHOUSE", f"warehouse {e.warehouse_code!r} does not exist"
            )
        elif e.sku not in items and unknown_sku == "reject":
            pre[e.event_id] = EventError(
                e.event_id, "UNKNOWN_SKU", f"inventory item {e.sku!r} does not exist"
            )
    w = _Writes()
    for eid in order:
        rec = recorded.get(eid)
        if rec is not None:
            if rec[0] == "r":
                # A replayed rejection answers the same.
                res.rejected += 1
                res.errors.append(EventError(eid, rec[1], rec[2]))
            else:
                res.duplicate += 1
        elif eid in pre:
            err = pre[eid]
            res.rejected += 1
            res.errors.append(err)
            w.claim_id.append(eid)
            w.claim_outcome.append("r")
            w.claim_reason.append(err.reason)
            w.claim_message.append(err.message)
    todo = [e for e in valid if e.event_id not in recorded and e.event_id not in pre]

    # 4. Apply in memory; 5. write everything in one statement.
    level_rows: tuple[list[str], list[str], list[int], list[int], list[int]] = ([], [], [], [], [])
    marks: tuple[list[str], list[str], list[int], list[bool]] = ([], [], [], [])
    lots: list[SyncEvent] = []
    if todo:
        level_rows, marks, lots = await _apply(conn, source, todo, items, res, w)
    v_sku, v_wh, v_old, v_new, v_reserved = level_rows
    m_sku, m_wh, m_us, m_known = marks
    rows = await _WRITE.fetch(
        conn,
        {
            "v_sku": v_sku,
            "v_wh": v_wh,
            "v_old": v_old,
            "v_new": v_new,
            "v_reserved": v_reserved,
            "l_sku": w.sku,
            "l_wh": w.wh,
            "l_ohb": w.ohb,
            "l_oha": w.oha,
            "l_r": w.reserved,
            "l_reason": w.reason,
            "l_ref": w.ref,
            "l_cost": w.cost,
            "l_cur": w.cur,
            "l_below": w.below,
            "source": source,
            "actor": actor,
            "c_id": w.claim_id,
            "c_outcome": w.claim_outcome,
            "c_reason": w.claim_reason,
            "c_message": w.claim_message,
            "m_sku": m_sku,
            "m_wh": m_wh,
            "m_us": m_us,
            "m_known": m_known,
            "last_event_id": batch.last_event_id,
            "seen": batch.size,
            "applied": res.applied,
            # The ledger rows' events (ledger.ctes): the watchers wake after commit.
            **outbox.params(session, derived_rows=len(w.sku)),
        },
    )
    row = rows[0]
    if row["updated"] != len(level_rows[0]):
        # Cannot happen while the rows are locked; refuse rather than write a wrong ledger.
        raise RuntimeError("stock levels changed under a sync batch's lock")
    if lots:
        lot_ids = row["lot_ids"]
        await conn.execute(
            _LOTS,
            [e.sku for e in lots],
            [e.warehouse_code for e in lots],
            [e.quantity for e in lots],
            [e.unit_cost.amount_minor if e.unit_cost else 0 for e in lots],
            [e.unit_cost.currency if e.unit_cost else "" for e in lots],
            list(lot_ids),
        )
    res.cursor = _cursor(row)
    return res


async def _apply(
    conn: asyncpg.Connection[Any],
    source: str,
    todo: list[SyncEvent],
    items: dict[str, Any],
    res: BatchResult,
    w: _Writes,
) -> tuple[
    tuple[list[str], list[str], list[int], list[int], list[int]],
    tuple[list[str], list[str], list[int], list[bool]],
    list[SyncEvent],
]:
    # Levels are keyed by "sku NUL warehouse" (neither can hold NUL): strings, unlike
    # tuples, are not tracked by the garbage collector, which thousands of
    # short-lived containers per batch keep busy.
    skus = list({e.sku for e in todo})
    missing = [s for s in skus if s not in items]
    if missing:
        # Policy "create": an unknown SKU becomes a tracked item with defaults.
        await conn.execute(_CREATE_ITEMS, missing)
        for r in await conn.fetch(_ITEMS, missing):
            items[r[1]] = r
    # Locked rows (sku, warehouse_code, on_hand, reserved, watermark) by key, in lock order.
    rows: dict[str, Any] = {}
    # Keys of the levels of SKUs with more than one level (their total decides `below`).
    groups: dict[str, list[str]] = {}
    for attempt in range(2):
        rows.clear()
        groups.clear()
        prev_sku = prev_key = ""
        for r in await conn.fetch(_LOCK_LEVELS, skus, source):
            sku = r[0]
            key = sku + "\0" + r[1]
            rows[key] = r
            if sku == prev_sku:  # rows come ordered by sku
                group = groups.get(sku)
                if group is None:
                    groups[sku] = [prev_key, key]
                else:
                    group.append(key)
            prev_sku = sku
            prev_key = key
        missing_keys = {e.sku + "\0" + e.warehouse_code for e in todo}.difference(rows)
        if not missing_keys or attempt:
            break
        # First change of a SKU in a warehouse: create its level, then lock again.
        pairs = [k.split("\0") for k in missing_keys]
        await conn.execute(_ENSURE_LEVELS, [p[0] for p in pairs], [p[1] for p in pairs])
    # Current on_hand and SET watermark of the levels this batch changed.
    on_hand: dict[str, int] = {}
    marks: dict[str, int] = {}
    lots: list[SyncEvent] = []
    policies: dict[str, Policy] = {}
    applied = 0
    for e in todo:
        sku = e.sku
        key = sku + "\0" + e.warehouse_code
        row = rows[key]
        old = on_hand.get(key)
        if old is None:
            old = row[2]
        reserved = row[3]
        occurred = e.occurred_us
        if e.kind == "set":
            mark = marks.get(key, row[4])
            assert occurred is not None
            if mark is not None and occurred < mark:
                res.stale += 1
                w.claim_id.append(e.event_id)
                w.claim_outcome.append("s")
                w.claim_reason.append(None)
                w.claim_message.append(None)
                continue
            new = e.quantity
        else:
            new = old + e.quantity
        item = items[sku]
        policy = policies.get(sku)
        if policy is None:
            policy = policies[sku] = _policy(item)
        if not may_set_on_hand(new, old, reserved, policy):
            if new < 0:
                err = EventError(
                    e.event_id, "INSUFFICIENT_STOCK", f"on_hand {old} of {sku!r} would go below 0"
                )
            else:
                err = EventError(
                    e.event_id,
                    "STOCK_RESERVED",
                    f"on_hand of {sku!r} would be {new}, below the {reserved} reserved units",
                )
            res.rejected += 1
            res.errors.append(err)
            w.claim_id.append(e.event_id)
            w.claim_outcome.append("r")
            w.claim_reason.append(err.reason)
            w.claim_message.append(err.message)
            continue
        if e.kind == "set":
            assert occurred is not None
            marks[key] = occurred
        on_hand[key] = new
        group = groups.get(sku)
        if group is None:
            total = new - reserved
        else:
            total = sum(on_hand.get(k, rows[k][2]) - rows[k][3] for k in group)
        threshold: int = item[_THRESHOLD]
        w.sku.append(sku)
        w.wh.append(e.warehouse_code)
        w.ohb.append(old)
        w.oha.append(new)
        w.reserved.append(reserved)
        w.reason.append(e.reason)
        w.ref.append(e.event_id)
        w.below.append(threshold > 0 and total <= threshold)  # is_below_threshold, inlined
        if e.unit_cost is not None:
            w.cost.append(e.unit_cost.amount_minor * e.quantity)
            w.cur.append(e.unit_cost.currency)
            lots.append(e)
        else:
            w.cost.append(None)
            w.cur.append(None)
        applied += 1
    res.applied += applied
    # In lock order (the rows are locked already).
    changed = [rows[k] for k in rows if k in on_hand and on_hand[k] != rows[k][2]]
    level_rows = (
        [r[0] for r in changed],
        [r[1] for r in changed],
        [r[2] for r in changed],
        [on_hand[r[0] + "\0" + r[1]] for r in changed],
        [r[3] for r in changed],
    )
    mark_rows = [rows[k] for k in marks]
    mark_cols = (
        [r[0] for r in mark_rows],
        [r[1] for r in mark_rows],
        list(marks.values()),
        [r[4] is not None for r in mark_rows],
    )
    return level_rows, mark_cols, lots
