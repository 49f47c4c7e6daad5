"""What AuditStock and RepairStock read: each stock level's counters next to the
figures they derive from (domain/inventory/audit.py decides what a drift is)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# The figures of the levels in `lv` (sku, warehouse_code, on_hand, reserved):
# the ledger's sums, the open holds of active reservations, the lots' remaining
# units, and what the threshold flag of a stock_changed event needs.
_FIGURES = """
    SELECT lv.sku, lv.warehouse_code, lv.on_hand, lv.reserved,
        coalesce(g.on_hand, 0) AS ledger_on_hand, coalesce(g.reserved, 0) AS ledger_reserved,
        coalesce((SELECT sum(rl.quantity - rl.fulfilled - rl.released)
                  FROM inventory.reservation_lines rl
                  JOIN inventory.reservations r ON r.id = rl.reservation_id AND r.state = 'active'
                  WHERE rl.sku = lv.sku AND rl.warehouse_code = lv.warehouse_code AND rl.tracked
                    AND rl.fulfilled + rl.released < rl.quantity), 0) AS open_reserved,
        coalesce((SELECT sum(remaining_quantity) FROM inventory.lots x
                  WHERE x.sku = lv.sku AND x.warehouse_code = lv.warehouse_code
                    AND x.remaining_quantity > 0), 0) AS lots_remaining
    FROM lv
    LEFT JOIN LATERAL (
        SELECT sum(on_hand_delta) AS on_hand, sum(reserved_delta) AS reserved FROM inventory.ledger m
        WHERE m.sku = lv.sku AND m.warehouse_code = lv.warehouse_code
    ) g ON true
    ORDER BY lv.sku, lv.warehouse_code"""

_LOCK = text(
    "SELECT 1 FROM inventory.stock_levels WHERE sku = :sku AND warehouse_code = :wh FOR NO KEY UPDATE"
)
_ONE = text(
    """
    WITH lv AS MATERIALIZED (
        SELECT sku, warehouse_code, on_hand, reserved FROM inventory.stock_levels
        WHERE sku = :sku AND warehouse_code = :wh
    )"""
    + _FIGURES
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
) -> list[Any]:
    """The figures of up to `limit` levels ordered by (sku, warehouse_code), after a key."""
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
    sql = text(
        f"""WITH lv AS MATERIALIZED (
                SELECT s.sku, s.warehouse_code, s.on_hand, s.reserved FROM inventory.stock_levels s
                WHERE {" AND ".join(where)} ORDER BY s.sku, s.warehouse_code LIMIT :n
            )"""
        + _FIGURES
    )
    return list((await session.execute(sql, params)).all())


async def locked_figures(session: AsyncSession, sku: str, warehouse_code: str) -> Any | None:
    """One level's figures with the level row locked (no counter moves until commit);
    None when there is no such level. The figures are read by a second statement: one
    that waited for the lock would still read the reservations as they were before the
    wait (READ COMMITTED takes a statement's snapshot when it starts)."""
    params = {"sku": sku, "wh": warehouse_code}
    if (await session.execute(_LOCK, params)).first() is None:
        return None
    return (await session.execute(_ONE, params)).one()


async def threshold_facts(session: AsyncSession, sku: str) -> Any:
    """The item's low-stock threshold and the SKU's total availability."""
    return (await session.execute(_THRESHOLD, {"sku": sku})).one()
