"""What AuditStock and RepairStock read: each stock level's counters next to the
figures they derive from (domain/inventory/audit.py decides what a drift is),
and the per-level ledger checkpoints that spare an audit the whole history."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# The ledger's sums of the levels in `lv` (sku, warehouse_code, on_hand, reserved):
# a level's checkpoint (`trusted`: which ones count; none for a full re-sum) plus
# its ledger rows after the checkpoint's id (all of them without one), and the
# last ledger id those sums run through.
_SUMS = """
    sums AS MATERIALIZED (
        SELECT lv.sku, lv.warehouse_code, lv.on_hand, lv.reserved,
            CAST(coalesce(c.on_hand, 0) + coalesce(g.on_hand, 0) AS bigint) AS ledger_on_hand,
            CAST(coalesce(c.reserved, 0) + coalesce(g.reserved, 0) AS bigint) AS ledger_reserved,
            c.through_id, coalesce(g.last_id, c.through_id) AS last_id, c.resummed_at
        FROM lv
        LEFT JOIN LATERAL (
            -- LIMIT keeps this a primary-key lookup per level: a plain join lets the
            -- planner hash the whole table for every page.
            SELECT through_id, on_hand, reserved, resummed_at FROM inventory.ledger_checkpoints c
            WHERE c.sku = lv.sku AND c.warehouse_code = lv.warehouse_code AND {trusted} LIMIT 1
        ) c ON true
        LEFT JOIN LATERAL (
            SELECT sum(on_hand_delta) AS on_hand, sum(reserved_delta) AS reserved, max(id) AS last_id
            FROM inventory.ledger m
            WHERE m.sku = lv.sku AND m.warehouse_code = lv.warehouse_code AND m.id > coalesce(c.through_id, 0)
        ) g ON true
    )"""

# The audit job moves each level's checkpoint to the sums it just took, through
# the highest ledger id of the level its snapshot sees. Why no row of the level
# with a lower id can commit later: every writer of ledger rows (ledger.ctes,
# through ledger.write, reservation_store.write_granted and sync_store's batch)
# draws the rows' ids (nextval, in the statement that inserts them) while its
# transaction holds the level's row lock in inventory.stock_levels, taken by an
# earlier statement (lock_levels, load_for_plan, the guarded UPDATE of
# stock.py, locked_figures here) and held until commit. Two transactions that
# write rows of one level hold its lock one after the other; the later one takes
# it after the earlier one ended (PostgreSQL shows a transaction as ended to new
# snapshots before it releases its locks) and only then draws its ids, and the
# sequence has no cache (ids follow the order they are drawn in). So per level,
# id order is commit order: a row of the level the snapshot cannot see has an id
# above every row of the level it sees (docs/events.md "Order" makes the same
# argument for events; the checkpoint tests show what a writer that drew its id
# before the lock would cost). A checkpoint replaces another only when its last
# full re-sum is later, or the same one and its id further on: an audit that
# started from an older checkpoint never undoes what a full re-sum (or a
# repair) found. Rows in key order: concurrent audits lock them in one order.
_ADVANCE = """, advanced AS (
        INSERT INTO inventory.ledger_checkpoints AS c
            (sku, warehouse_code, through_id, on_hand, reserved, resummed_at)
        SELECT sku, warehouse_code, last_id, ledger_on_hand, ledger_reserved, coalesce(resummed_at, now())
        FROM sums WHERE last_id IS DISTINCT FROM through_id
        ORDER BY sku, warehouse_code
        ON CONFLICT (sku, warehouse_code) DO UPDATE
        SET through_id = excluded.through_id, on_hand = excluded.on_hand, reserved = excluded.reserved,
            resummed_at = excluded.resummed_at
        WHERE (excluded.resummed_at, excluded.through_id) > (c.resummed_at, c.through_id)
    )"""

# The figures of the levels of `sums`: the ledger's sums, the open holds of
# active reservations, the lots' remaining units, and whether each kind drifts
# (the one definition of a drift; domain/inventory/audit.py reads the flags);
# `n` is a level's place in the page. Only the levels with a drift of the kinds
# checked come back, and the page's last level (its key and `n`, the page's
# size, carry the scan on): a page of 500 agreeing levels is one row for the
# server, not 500.
_FIGURES = """, figures AS (
        SELECT f.sku, f.warehouse_code, f.on_hand, f.reserved, f.ledger_on_hand, f.ledger_reserved,
            coalesce((SELECT sum(rl.quantity - rl.fulfilled - rl.released)
                      FROM inventory.reservation_lines rl
                      JOIN inventory.reservations r ON r.id = rl.reservation_id AND r.state = 'active'
                      WHERE rl.sku = f.sku AND rl.warehouse_code = f.warehouse_code AND rl.tracked
                        AND rl.fulfilled + rl.released < rl.quantity), 0) AS open_reserved,
            coalesce((SELECT sum(remaining_quantity) FROM inventory.lots x
                      WHERE x.sku = f.sku AND x.warehouse_code = f.warehouse_code
                        AND x.remaining_quantity > 0), 0) AS lots_remaining,
            row_number() OVER (ORDER BY f.sku, f.warehouse_code) AS n,
            count(*) OVER () AS levels
        FROM sums f
    ), judged AS (
        SELECT *, on_hand <> ledger_on_hand AS on_hand_drifts, reserved <> open_reserved AS reserved_drifts,
            lots_remaining > on_hand AS lots_drifts
        FROM figures
    )
    SELECT sku, warehouse_code, on_hand, reserved, ledger_on_hand, ledger_reserved, open_reserved,
        lots_remaining, on_hand_drifts, reserved_drifts, lots_drifts, n
    FROM judged WHERE {drifting} OR n = levels
    ORDER BY n"""

KINDS = ("on_hand", "reserved", "lots")


def _statement(levels: str, *, whole_ledger: bool, advance: bool, kinds: Sequence[str] = KINDS) -> str:
    """The figures of `levels` (a SELECT of sku, warehouse_code, on_hand, reserved) that
    drift in one of `kinds`, and of the last level: `whole_ledger` re-sums every level's
    whole ledger; `advance` writes the checkpoints and trusts only those re-summed in full
    within :full_after (an interval)."""
    trusted = (
        "false"
        if whole_ledger
        else "c.resummed_at > now() - CAST(:full_after AS interval)"
        if advance
        else "true"
    )
    return (
        f"WITH lv AS MATERIALIZED ({levels}),"
        + _SUMS.format(trusted=trusted)
        + (_ADVANCE if advance else "")
        + _FIGURES.format(drifting=" OR ".join(f"{k}_drifts" for k in kinds if k in KINDS) or "false")
    )


_LOCK = text(
    "SELECT 1 FROM inventory.stock_levels WHERE sku = :sku AND warehouse_code = :wh FOR NO KEY UPDATE"
)
# A repair compares with the whole ledger: a checkpoint would hide an edit of an old row.
_ONE = text(
    _statement(
        """SELECT sku, warehouse_code, on_hand, reserved FROM inventory.stock_levels
           WHERE sku = :sku AND warehouse_code = :wh""",
        whole_ledger=True,
        advance=False,
    )
)

# A repair's movement closes the level's ledger sums under the level's lock (no
# row of the level is uncommitted): they are its checkpoint, re-summed in full.
_CHECKPOINT = text(
    """
    INSERT INTO inventory.ledger_checkpoints AS c (sku, warehouse_code, through_id, on_hand, reserved, resummed_at)
    VALUES (:sku, :wh, :through_id, :on_hand, :reserved, now())
    ON CONFLICT (sku, warehouse_code) DO UPDATE
    SET through_id = excluded.through_id, on_hand = excluded.on_hand, reserved = excluded.reserved,
        resummed_at = excluded.resummed_at
    WHERE (excluded.resummed_at, excluded.through_id) > (c.resummed_at, c.through_id)
    """
)

_THRESHOLD = text(
    """
    SELECT i.low_stock_threshold AS threshold,
           (SELECT coalesce(sum(s.on_hand - s.reserved), 0) FROM inventory.stock_levels s
            WHERE s.sku = i.sku) AS total_available
    FROM inventory.items i WHERE i.sku = :sku
    """
)


async def figures_page(
    session: AsyncSession,
    *,
    skus: list[str],
    warehouse_codes: list[str],
    after: tuple[str, str] | None,
    limit: int,
    kinds: Sequence[str],
    whole_ledger: bool = False,
    advance: timedelta | None = None,
) -> list[Any]:
    """The figures of the levels that drift in one of `kinds` among the next `limit`
    levels ordered by (sku, warehouse_code) after a key, and of the last of those levels
    (`n`: a level's place among them; the last one's is how many there were).
    The ledger's sums start from the levels' checkpoints, or from nothing with `whole_ledger`.
    `advance`: also move the checkpoints to the sums taken (the caller commits),
    re-summing in full the levels whose last full re-sum is older than this."""
    where = ["true"]
    params: dict[str, Any] = {"n": limit}
    if skus:
        where.append("s.sku = ANY(CAST(:skus AS text[]))")
        params["skus"] = skus
    if warehouse_codes:
        where.append("s.warehouse_code = ANY(CAST(:whs AS text[]))")
        params["whs"] = warehouse_codes
    if after is not None:
        where.append("(s.sku, s.warehouse_code) > (:after_sku, :after_wh)")
        params["after_sku"], params["after_wh"] = after
    if advance is not None:
        params["full_after"] = advance
    levels = f"""SELECT s.sku, s.warehouse_code, s.on_hand, s.reserved FROM inventory.stock_levels s
                 WHERE {" AND ".join(where)} ORDER BY s.sku, s.warehouse_code LIMIT :n"""
    sql = text(_statement(levels, whole_ledger=whole_ledger, advance=advance is not None, kinds=kinds))
    return list((await session.execute(sql, params)).all())


async def locked_figures(session: AsyncSession, sku: str, warehouse_code: str) -> Any | None:
    """One level's figures, over its whole ledger, with the level row locked (no
    counter moves until commit); None when there is no such level. The figures
    are read by a second statement: one that waited for the lock would still read
    the reservations as they were before the wait (READ COMMITTED takes a
    statement's snapshot when it starts)."""
    params = {"sku": sku, "wh": warehouse_code}
    if (await session.execute(_LOCK, params)).first() is None:
        return None
    return (await session.execute(_ONE, params)).one()


async def checkpoint_level(
    session: AsyncSession, sku: str, warehouse_code: str, *, through_id: int, on_hand: int, reserved: int
) -> None:
    """Record the whole ledger's sums of a level locked by locked_figures, through
    `through_id`, its last ledger row."""
    await session.execute(
        _CHECKPOINT,
        {
            "sku": sku,
            "wh": warehouse_code,
            "through_id": through_id,
            "on_hand": on_hand,
            "reserved": reserved,
        },
    )


async def threshold_facts(session: AsyncSession, sku: str) -> Any:
    """The item's low-stock threshold and the SKU's total availability."""
    return (await session.execute(_THRESHOLD, {"sku": sku})).one()
