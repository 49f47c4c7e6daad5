"""Stock levels' statements: what domain/inventory/stock.py reads and writes.

SQL text throughout; the GetStockLevel hot path (fetch_sku_stocks) runs on the
asyncpg connection (DriverStatement), everything else on the session.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.inventory.stock_rules import may_set_on_hand_sql
from domain.inventory.types import (
    Cost,
    KitComponent,
    KitPart,
    Movement,
    SkuStock,
    StockLevel,
    kit_stock,
)
from domain.inventory.validation import MAX_LEVEL
from domain.shared.db import DriverStatement

if TYPE_CHECKING:
    import asyncpg  # run-time import would be repeated in Temporal's workflow sandbox (crash)

# One statement: lock the level, apply the change if every rule holds, return
# before/after and the SKU's total availability (for the threshold flag).
# `kind`: 'delta' adds :qty to on_hand, 'set' makes it :qty.
_NEW_ON_HAND = "(CASE WHEN :is_set THEN CAST(:qty AS bigint) ELSE s.on_hand + CAST(:qty AS bigint) END)"
_CHANGE = text(
    """
    WITH old AS (
        SELECT on_hand, reserved FROM inventory.stock_levels
        WHERE sku = :sku AND warehouse_code = :wh FOR NO KEY UPDATE
    ), u AS (
        UPDATE inventory.stock_levels s
        SET on_hand = """
    + _NEW_ON_HAND
    + """, updated_at = now()
        FROM old, inventory.items i
        WHERE s.sku = :sku AND s.warehouse_code = :wh AND i.sku = s.sku AND NOT i.is_kit
          AND (CAST(:expected AS bigint) IS NULL OR s.on_hand = CAST(:expected AS bigint))
          AND """
    + _NEW_ON_HAND
    + """ <= CAST(:ceiling AS bigint)
          AND """
    + may_set_on_hand_sql(_NEW_ON_HAND)
    + """
        RETURNING old.on_hand AS on_hand_before, old.reserved AS reserved_before,
                  s.on_hand AS on_hand_after, s.reserved AS reserved_after, s.updated_at,
                  i.low_stock_threshold AS threshold
    )
    SELECT u.*, u.on_hand_after - u.reserved_after + coalesce((
        SELECT sum(x.on_hand - x.reserved) FROM inventory.stock_levels x
        WHERE x.sku = :sku AND x.warehouse_code <> :wh), 0) AS total_available
    FROM u
    """
)

_ENSURE_LEVEL = text(
    """
    INSERT INTO inventory.stock_levels (sku, warehouse_code)
    SELECT i.sku, w.code FROM inventory.items i, inventory.warehouses w
    WHERE i.sku = :sku AND w.code = :wh AND NOT i.is_kit
    ON CONFLICT DO NOTHING
    """
)

_DIAGNOSE = text(
    """
    SELECT (SELECT row(track_inventory, allow_backorder, max_backorder)::text FROM inventory.items
            WHERE sku = :sku) AS item,
           EXISTS (SELECT 1 FROM inventory.items WHERE sku = :sku AND is_kit) AS kit,
           EXISTS (SELECT 1 FROM inventory.warehouses WHERE code = :wh) AS warehouse,
           (SELECT on_hand FROM inventory.stock_levels WHERE sku = :sku AND warehouse_code = :wh) AS on_hand,
           (SELECT reserved FROM inventory.stock_levels WHERE sku = :sku AND warehouse_code = :wh) AS reserved
    """
)

_LOT = text(
    """
    INSERT INTO inventory.lots (sku, warehouse_code, lot_code, received_quantity, remaining_quantity,
                                unit_cost_minor, currency, ledger_id)
    VALUES (:sku, :wh, :lot_code, :qty, :qty, :cost, :cur, :ledger_id)
    """
)


_RESTORE_RESERVED = text(
    """
    UPDATE inventory.stock_levels SET reserved = :new, updated_at = now()
    WHERE sku = :sku AND warehouse_code = :wh AND reserved = :expected
    RETURNING on_hand, reserved, updated_at
    """
)


async def restore_reserved(
    session: AsyncSession, sku: str, warehouse_code: str, *, expected: int, new: int
) -> Any | None:
    """RepairStock's one counter write: reserved := the open holds, guarded by the
    value the caller found (None when it moved). No allowance guard: the holds
    already exist, and the counter must show them (an oversold level is reported by
    its `available`, not hidden)."""
    return (
        await session.execute(
            _RESTORE_RESERVED, {"sku": sku, "wh": warehouse_code, "expected": expected, "new": new}
        )
    ).one_or_none()


async def change_level(
    session: AsyncSession, sku: str, warehouse_code: str, *, is_set: bool, quantity: int, expected: int | None
) -> Any | None:
    """The guarded change of one level's on_hand (None when it matched no row: a rule
    refused it, or the level does not exist yet): before/after counters (on_hand_before,
    reserved_before, on_hand_after, reserved_after), updated_at, the item's threshold and the SKU's total availability after."""
    params: dict[str, Any] = {
        "sku": sku,
        "wh": warehouse_code,
        "is_set": is_set,
        "qty": quantity,
        "expected": expected,
        "ceiling": MAX_LEVEL,
    }
    return (await session.execute(_CHANGE, params)).one_or_none()


async def ensure_level(session: AsyncSession, sku: str, warehouse_code: str) -> None:
    """Create the level of an existing item in an existing warehouse, if missing."""
    await session.execute(_ENSURE_LEVEL, {"sku": sku, "wh": warehouse_code})


async def level_facts(session: AsyncSession, sku: str, warehouse_code: str) -> Any:
    """What decides why a change was refused: the item's policy (text, NULL when no
    such item), whether it is a kit, whether the warehouse exists, and the level's
    counters (NULL when none)."""
    return (await session.execute(_DIAGNOSE, {"sku": sku, "wh": warehouse_code})).one()


async def insert_lot(
    session: AsyncSession,
    sku: str,
    warehouse_code: str,
    lot_code: str,
    quantity: int,
    unit_cost: Cost,
    ledger_id: int,
) -> None:
    await session.execute(
        _LOT,
        {
            "sku": sku,
            "wh": warehouse_code,
            "lot_code": lot_code,
            "qty": quantity,
            "cost": unit_cost.amount_minor,
            "cur": unit_cost.currency,
            "ledger_id": ledger_id,
        },
    )


# ---------------------------------------------------------------- reads

# Run on the driver connection (fetch_sku_stocks): the GetStockLevel hot path.
_SKU_LEVELS = DriverStatement(
    """
    SELECT i.sku, i.low_stock_threshold, l.warehouse_code, l.on_hand, l.reserved, l.updated_at, i.is_kit
    FROM inventory.items i
    LEFT JOIN inventory.stock_levels l ON l.sku = i.sku
    WHERE i.sku = ANY(CAST(:skus AS text[]))
    ORDER BY i.sku, l.warehouse_code
    """
)
# The components of kits with their policies and levels (a kit's stock is derived from them).
_KIT_PART_LEVELS = DriverStatement(
    """
    SELECT k.kit_sku, k.component_sku, k.quantity, i.track_inventory, i.low_stock_threshold,
           l.warehouse_code, l.on_hand, l.reserved, l.updated_at
    FROM inventory.kit_components k
    JOIN inventory.items i ON i.sku = k.component_sku
    LEFT JOIN inventory.stock_levels l ON l.sku = k.component_sku
    WHERE k.kit_sku = ANY(CAST(:kits AS text[]))
    ORDER BY k.kit_sku, k.component_sku, l.warehouse_code
    """
)


async def fetch_sku_stocks(conn: asyncpg.Connection[Any], skus: list[str]) -> dict[str, SkuStock]:
    """load_sku_stocks on an asyncpg connection: the GetStockLevel hot path (one
    prepared statement, no ORM result objects; a second one only when kits are
    among the SKUs, for their components)."""
    out: dict[str, SkuStock] = {}
    kits: dict[str, int] = {}  # kit -> its threshold
    for sku, threshold, wh, on_hand, reserved, updated_at, is_kit in await _SKU_LEVELS.fetch(
        conn, {"skus": skus}
    ):
        if is_kit:
            kits[sku] = threshold
            continue
        st = out.get(sku)
        if st is None:
            st = out[sku] = SkuStock(sku, [], threshold)
        if wh is not None:
            st.levels.append(StockLevel(sku, wh, on_hand, reserved, updated_at))
    if kits:
        out.update(await _kit_stocks(conn, kits))
    return out


async def _kit_stocks(conn: asyncpg.Connection[Any], kits: dict[str, int]) -> dict[str, SkuStock]:
    parts: dict[str, dict[str, KitPart]] = {}
    for (
        kit,
        component,
        quantity,
        tracked,
        threshold,
        wh,
        on_hand,
        reserved,
        updated_at,
    ) in await _KIT_PART_LEVELS.fetch(conn, {"kits": list(kits)}):
        mine = parts.setdefault(kit, {})
        part = mine.get(component)
        if part is None:
            part = mine[component] = KitPart(
                KitComponent(component, quantity), tracked, SkuStock(component, [], threshold)
            )
        if wh is not None:
            part.stock.levels.append(StockLevel(component, wh, on_hand, reserved, updated_at))
    return {
        kit: kit_stock(kit, threshold, list(parts.get(kit, {}).values())) for kit, threshold in kits.items()
    }


_KITS_IN_RANGE = text(
    """SELECT sku FROM inventory.items
       WHERE is_kit AND sku >= :low AND (CAST(:high AS text) IS NULL OR sku <= :high)
         AND (:prefix = '' OR starts_with(sku, :prefix))
       ORDER BY sku"""
)


async def kits_in_range(session: AsyncSession, *, low: str, high: str | None, prefix: str) -> list[str]:
    """The kits with low <= sku <= high (None: no upper bound) starting with `prefix`."""
    low = max(low, prefix)
    rows = await session.execute(_KITS_IN_RANGE, {"low": low, "high": high, "prefix": prefix})
    return [r.sku for r in rows]


async def warehouse_exists(session: AsyncSession, code: str) -> bool:
    return (
        await session.execute(text("SELECT 1 FROM inventory.warehouses WHERE code = :c"), {"c": code})
    ).first() is not None


async def levels_page(
    session: AsyncSession,
    *,
    warehouse_code: str,
    sku_prefix: str,
    below_threshold_only: bool,
    backordered_only: bool,
    after: tuple[str, str] | None,
    limit: int,
    warehouse_codes: Sequence[str] | None = None,
) -> list[StockLevel]:
    """Levels ordered by (sku, warehouse_code), after a key."""
    where = ["true"]
    params: dict[str, Any] = {"n": limit}
    if warehouse_code:
        where.append("l.warehouse_code = :wh")
        params["wh"] = warehouse_code
    if warehouse_codes is not None:
        where.append("l.warehouse_code = ANY(CAST(:whs AS text[]))")
        params["whs"] = warehouse_codes
    if sku_prefix:
        # Range condition for the primary-key index, starts_with for exactness.
        where.append("l.sku >= :prefix AND starts_with(l.sku, :prefix)")
        params["prefix"] = sku_prefix
    if backordered_only:
        where.append("l.reserved > l.on_hand")
    if below_threshold_only:
        where.append(
            """EXISTS (SELECT 1 FROM inventory.items i WHERE i.sku = l.sku AND i.low_stock_threshold > 0
               AND (SELECT sum(x.on_hand - x.reserved) FROM inventory.stock_levels x WHERE x.sku = l.sku)
                   <= i.low_stock_threshold)"""
        )
    if after is not None:
        where.append("(l.sku, l.warehouse_code) > (:after_sku, :after_wh)")
        params["after_sku"], params["after_wh"] = after
    sql = text(
        f"""SELECT l.sku, l.warehouse_code, l.on_hand, l.reserved, l.updated_at
            FROM inventory.stock_levels l WHERE {" AND ".join(where)}
            ORDER BY l.sku, l.warehouse_code LIMIT :n"""
    )
    rows = (await session.execute(sql, params)).all()
    return [StockLevel(r.sku, r.warehouse_code, int(r.on_hand), int(r.reserved), r.updated_at) for r in rows]


def _movement_row(r: Any) -> Movement:
    return Movement(
        id=int(r.id),
        sku=r.sku,
        warehouse_code=r.warehouse_code,
        type=r.type,
        on_hand_before=int(r.on_hand_before),
        on_hand_after=int(r.on_hand_after),
        reserved_before=int(r.reserved_before),
        reserved_after=int(r.reserved_after),
        reason=r.reason,
        source=r.source,
        actor=r.actor,
        reference=r.reference,
        reservation_id=r.reservation_id,
        cost=Cost(int(r.cost_minor), r.cost_currency) if r.cost_minor is not None else None,
        created_at=r.created_at,
        kit_sku=r.kit_sku or "",
    )


async def movements_page(
    session: AsyncSession,
    *,
    sku: str,
    warehouse_code: str,
    types: list[str],
    reference: str,
    reservation_id: uuid.UUID | None,
    start: datetime | None,
    end: datetime | None,
    before_id: int | None,
    limit: int,
) -> list[Movement]:
    """The ledger, newest first, below an id."""
    where = ["true"]
    params: dict[str, Any] = {"n": limit}
    if sku:
        where.append("sku = :sku")
        params["sku"] = sku
    if warehouse_code:
        where.append("warehouse_code = :wh")
        params["wh"] = warehouse_code
    if types:
        where.append("type = ANY(CAST(:types AS text[]))")
        params["types"] = types
    if reference:
        where.append("reference = :ref")
        params["ref"] = reference
    if reservation_id is not None:
        where.append("reservation_id = :rid")
        params["rid"] = reservation_id
    if start is not None:
        where.append("created_at >= :start")
        params["start"] = start
    if end is not None:
        where.append("created_at < :end")
        params["end"] = end
    if before_id is not None:
        where.append("id < :after")
        params["after"] = before_id
    sql = text(
        f"""SELECT id, sku, warehouse_code, type, on_hand_before, on_hand_after, reserved_before,
                   reserved_after, reason, source, actor, reference, reservation_id, cost_minor,
                   cost_currency, created_at, kit_sku
            FROM inventory.ledger WHERE {" AND ".join(where)} ORDER BY id DESC LIMIT :n"""
    )
    return [_movement_row(r) for r in (await session.execute(sql, params)).all()]
