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
   counters), a ledger row per applied event (type `sync`; its exactly-once
   claim, unique per source and event id) and ONE `inventory.stock_changed`
   event per level the batch moved, covering the level's ledger rows of the
   batch (through ledger.ctes, per level), the claims of the events not
   applied with their outcome, watermarks and the cursor (lots, for RECEIVEs
   with a unit cost, follow).

The caller commits; an ack is sent only after that commit. The statements
live in domain/inventory/sync_store.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy.ext.asyncio import AsyncSession

from domain.inventory import sync_store
from domain.inventory.stock_rules import Policy, may_set_on_hand
from domain.inventory.sync_store import (
    BACKORDER,
    LAST_SET_US,
    MAX_BACKORDER,
    ON_HAND,
    RESERVED,
    THRESHOLD,
    TRACK,
)
from domain.inventory.types import Cost
from domain.inventory.validation import MAX_QUANTITY, MAX_TEXT, WAREHOUSE_CODE, normalize_sku
from domain.shared.db import driver_connection
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
    row = await sync_store.read_cursor(session, source)
    return _cursor(row) if row is not None else Cursor(source, "", 0, 0, None)


def _policy(item: Any) -> Policy:
    return Policy(bool(item[TRACK]), bool(item[BACKORDER]), int(item[MAX_BACKORDER]), int(item[THRESHOLD]))


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
    await sync_store.lock_source(conn, source)
    res = BatchResult(
        duplicate=batch.duplicate, rejected=len(batch.invalid_ids), errors=list(batch.invalid_ids)
    )
    refs = sync_store.References()
    if batch.order:
        refs = await sync_store.load_references(conn, source, batch.warehouses, batch.skus, batch.order)
    rejected = _refuse_unknown_references(batch, refs, unknown_sku)
    w = sync_store.Writes()
    _settle_claimed_and_rejected(batch.order, refs.claims, rejected, res, w)
    todo = [e for e in batch.valid if e.event_id not in refs.claims and e.event_id not in rejected]
    lots: list[SyncEvent] = []
    if todo:
        lots = await _apply(conn, source, todo, refs.items, res, w)
    row = await sync_store.write_batch(
        session,
        conn,
        source,
        actor,
        w,
        last_event_id=batch.last_event_id,
        seen=batch.size,
        applied=res.applied,
    )
    if row["updated"] != len(w.level_sku):
        # Cannot happen while the rows are locked; refuse rather than write a wrong ledger.
        raise RuntimeError("stock levels changed under a sync batch's lock")
    if lots:
        await sync_store.insert_lots(
            conn,
            [e.sku for e in lots],
            [e.warehouse_code for e in lots],
            [e.quantity for e in lots],
            [e.unit_cost.amount_minor if e.unit_cost else 0 for e in lots],
            [e.unit_cost.currency if e.unit_cost else "" for e in lots],
            row["lot_ids"],
        )
    res.cursor = _cursor(row)
    return res


def _refuse_unknown_references(
    batch: PreparedBatch, refs: sync_store.References, unknown_sku: str
) -> dict[str, EventError]:
    """The batch's rejections: validation's, plus the valid events naming a warehouse
    that does not exist, a kit (no stock of its own), or (policy "reject") an item
    that does not exist."""
    rejected = dict(batch.rejected)
    for e in batch.valid:
        if e.warehouse_code not in refs.warehouses:
            rejected[e.event_id] = EventError(
                e.event_id, "UNKNOWN_WAREHOUSE", f"warehouse {e.warehouse_code!r} does not exist"
            )
        elif e.sku not in refs.items and unknown_sku == "reject":
            rejected[e.event_id] = EventError(
                e.event_id, "UNKNOWN_SKU", f"inventory item {e.sku!r} does not exist"
            )
        elif e.sku in refs.items and refs.items[e.sku][sync_store.KIT]:
            rejected[e.event_id] = EventError(
                e.event_id, "KIT_HAS_NO_STOCK", f"{e.sku!r} is a kit: its stock is its components'"
            )
    return rejected


def _settle_claimed_and_rejected(
    order: list[str],
    claimed: dict[str, tuple[str, str, str]],
    rejected: dict[str, EventError],
    res: BatchResult,
    w: sync_store.Writes,
) -> None:
    """Count the ids claimed earlier (duplicates; a replayed rejection answers the
    same) and the new rejections, which are claimed with their reason."""
    for eid in order:
        claim = claimed.get(eid)
        if claim is not None:
            if claim[0] == "r":
                res.rejected += 1
                res.errors.append(EventError(eid, claim[1], claim[2]))
            else:
                res.duplicate += 1
        elif eid in rejected:
            err = rejected[eid]
            res.rejected += 1
            res.errors.append(err)
            w.claim(eid, "r", err.reason, err.message)


async def _apply(
    conn: asyncpg.Connection[Any],
    source: str,
    todo: list[SyncEvent],
    items: dict[str, Any],
    res: BatchResult,
    w: sync_store.Writes,
) -> list[SyncEvent]:
    """Lock the levels `todo` changes, run its events in order under the stock
    rules, and add what they write to `w`; returns the events that make lots."""
    skus = list({e.sku for e in todo})
    missing = [s for s in skus if s not in items]
    if missing:
        # Policy "create": an unknown SKU becomes a tracked item with defaults.
        for r in await sync_store.create_items(conn, missing):
            items[r[1]] = r
    rows, groups = await _lock_levels(conn, source, skus, todo)
    on_hand: dict[str, int] = {}
    marks: dict[str, int] = {}
    lots = _run_events(todo, items, rows, groups, on_hand, marks, res, w)
    _add_level_writes(rows, on_hand, marks, w)
    return lots


# Levels are keyed by "sku NUL warehouse" (neither can hold NUL): strings, unlike
# tuples, are not tracked by the garbage collector, which thousands of
# short-lived containers per batch keep busy.


async def _lock_levels(
    conn: asyncpg.Connection[Any], source: str, skus: list[str], todo: list[SyncEvent]
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Lock every level of `skus` (creating the levels `todo` needs first, then
    locking again): the locked rows by key in lock order, and the keys of the
    levels of each SKU with more than one level (their total decides `below`)."""
    rows: dict[str, Any] = {}
    groups: dict[str, list[str]] = {}
    for attempt in range(2):
        rows.clear()
        groups.clear()
        prev_sku = prev_key = ""
        for r in await sync_store.lock_levels(conn, source, skus):
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
        await sync_store.ensure_levels(conn, [p[0] for p in pairs], [p[1] for p in pairs])
    return rows, groups


def _run_events(
    todo: list[SyncEvent],
    items: dict[str, Any],
    rows: dict[str, Any],
    groups: dict[str, list[str]],
    on_hand: dict[str, int],
    marks: dict[str, int],
    res: BatchResult,
    w: sync_store.Writes,
) -> list[SyncEvent]:
    """Run the events in order in memory: a stale SET or one the stock rules refuse
    is claimed with its outcome; an applied one moves `on_hand` (and `marks`, the
    SET watermarks) and adds its ledger row to `w`. Returns the events that make lots."""
    lots: list[SyncEvent] = []
    policies: dict[str, Policy] = {}
    applied = 0
    for e in todo:
        sku = e.sku
        key = sku + "\0" + e.warehouse_code
        row = rows[key]
        old = on_hand.get(key)
        if old is None:
            old = row[ON_HAND]
        reserved = row[RESERVED]
        occurred = e.occurred_us
        if e.kind == "set":
            mark = marks.get(key, row[LAST_SET_US])
            assert occurred is not None
            if mark is not None and occurred < mark:
                res.stale += 1
                w.claim(e.event_id, "s", None, None)
                continue
            new = e.quantity
        else:
            new = old + e.quantity
        item = items[sku]
        policy = policies.get(sku)
        if policy is None:
            policy = policies[sku] = _policy(item)
        if not may_set_on_hand(new, old, reserved, policy):
            err = _refusal(e, old, new, reserved)
            res.rejected += 1
            res.errors.append(err)
            w.claim(e.event_id, "r", err.reason, err.message)
            continue
        if e.kind == "set":
            assert occurred is not None
            marks[key] = occurred
        on_hand[key] = new
        group = groups.get(sku)
        if group is None:
            total = new - reserved
        else:
            total = sum(on_hand.get(k, rows[k][ON_HAND]) - rows[k][RESERVED] for k in group)
        threshold: int = item[THRESHOLD]
        w.sku.append(sku)
        w.warehouse_code.append(e.warehouse_code)
        w.on_hand_before.append(old)
        w.on_hand_after.append(new)
        w.reserved.append(reserved)
        w.reason.append(e.reason)
        w.reference.append(e.event_id)
        w.below_threshold.append(threshold > 0 and total <= threshold)  # is_below_threshold, inlined
        if e.unit_cost is not None:
            w.cost.append(e.unit_cost.amount_minor * e.quantity)
            w.currency.append(e.unit_cost.currency)
            lots.append(e)
        else:
            w.cost.append(None)
            w.currency.append(None)
        applied += 1
    res.applied += applied
    return lots


def _refusal(e: SyncEvent, old: int, new: int, reserved: int) -> EventError:
    """Why the stock rules refuse to move on_hand from `old` to `new`."""
    if new < 0:
        return EventError(e.event_id, "INSUFFICIENT_STOCK", f"on_hand {old} of {e.sku!r} would go below 0")
    return EventError(
        e.event_id,
        "STOCK_RESERVED",
        f"on_hand of {e.sku!r} would be {new}, below the {reserved} reserved units",
    )


def _add_level_writes(
    rows: dict[str, Any], on_hand: dict[str, int], marks: dict[str, int], w: sync_store.Writes
) -> None:
    """Add to `w` the levels whose on_hand changed and the SET watermarks, in lock
    order (the rows are locked already)."""
    changed = [r for k, r in rows.items() if k in on_hand and on_hand[k] != r[ON_HAND]]
    w.level_sku = [r[0] for r in changed]
    w.level_warehouse_code = [r[1] for r in changed]
    w.level_on_hand_before = [r[ON_HAND] for r in changed]
    w.level_on_hand_after = [on_hand[r[0] + "\0" + r[1]] for r in changed]
    w.level_reserved = [r[RESERVED] for r in changed]
    marked = [rows[k] for k in marks]
    w.watermark_sku = [r[0] for r in marked]
    w.watermark_warehouse_code = [r[1] for r in marked]
    w.watermark_set_us = list(marks.values())
    w.watermark_known = [r[LAST_SET_US] is not None for r in marked]
