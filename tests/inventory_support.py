"""Helpers for inventory tests: a migrated database and invariant checks."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import migrations
from tests.pg import create_database

ROOT = Path(__file__).resolve().parent.parent


def migrate(url: str) -> None:
    migrations.upgrade(url)


def migrated_database(prefix: str = "entrepot_inv") -> tuple[str, str]:
    url, name = create_database(prefix)
    migrate(url)
    return url, name


INVARIANTS = text(
    """
    WITH open_lines AS (
        SELECT sku, warehouse_code, sum(quantity - fulfilled - released) AS open
        FROM inventory.reservation_lines l JOIN inventory.reservations r ON r.id = l.reservation_id
        WHERE tracked GROUP BY sku, warehouse_code
    ), moves AS (
        SELECT sku, warehouse_code, sum(on_hand_delta) AS on_hand, sum(reserved_delta) AS reserved
        FROM inventory.ledger GROUP BY sku, warehouse_code
    )
    SELECT s.sku, s.warehouse_code, s.on_hand, s.reserved, coalesce(o.open, 0) AS open,
           coalesce(m.on_hand, 0) AS ledger_on_hand, coalesce(m.reserved, 0) AS ledger_reserved,
           i.allow_backorder
    FROM inventory.stock_levels s
    JOIN inventory.items i ON i.sku = s.sku
    LEFT JOIN open_lines o ON o.sku = s.sku AND o.warehouse_code = s.warehouse_code
    LEFT JOIN moves m ON m.sku = s.sku AND m.warehouse_code = s.warehouse_code
    """
)


# Kits move whole: per reservation and kit line, every component's quantity,
# fulfilled and released units are the same number of kits (x its units per kit).
KITS_WHOLE = text(
    """
    WITH per_component AS (
        SELECT reservation_id, kit_sku, sku, sum(quantity) AS q, sum(fulfilled) AS f, sum(released) AS r,
               min(quantity_per_kit) AS per, max(quantity_per_kit) AS per_max
        FROM inventory.reservation_lines WHERE kit_sku IS NOT NULL
        GROUP BY reservation_id, kit_sku, sku
    )
    SELECT reservation_id, kit_sku FROM per_component
    GROUP BY reservation_id, kit_sku
    HAVING bool_or(per <> per_max OR q % per <> 0 OR f % per <> 0 OR r % per <> 0)
        OR min(q / per) <> max(q / per) OR min(f / per) <> max(f / per) OR min(r / per) <> max(r / per)
    """
)


# Every ledger row is covered by exactly one inventory.stock_changed event of its level:
# an event covers the level's rows first_ledger_id..ledger_id (one movement, or a SyncStock
# batch's movements of the level), both ends rows of that level, and the ranges of one
# level do not overlap; so the rows they cover add up to the ledger's only when none is
# missing. `bad`: events breaking a rule (at most 10 shown).
STOCK_EVENTS_COVER_LEDGER = text(
    """
    WITH ev AS (
        SELECT id, aggregate_id AS sku, payload->>'warehouse_code' AS warehouse_code,
               coalesce((payload->>'first_ledger_id')::bigint, (payload->>'ledger_id')::bigint) AS first_id,
               (payload->>'ledger_id')::bigint AS last_id
        FROM platform.outbox WHERE topic = 'inventory.stock_changed'
    ), level_rows AS (
        -- each ledger row's position among its level's rows
        SELECT id, sku, warehouse_code, row_number() OVER (PARTITION BY sku, warehouse_code ORDER BY id) AS n
        FROM inventory.ledger
    ), checked AS (
        SELECT ev.id, ev.first_id, ev.last_id, f.n AS first_n, l.n AS last_n,
               lag(ev.last_id) OVER (PARTITION BY ev.sku, ev.warehouse_code ORDER BY ev.first_id) AS previous_last
        FROM ev
        LEFT JOIN level_rows f ON f.id = ev.first_id AND f.sku = ev.sku AND f.warehouse_code = ev.warehouse_code
        LEFT JOIN level_rows l ON l.id = ev.last_id AND l.sku = ev.sku AND l.warehouse_code = ev.warehouse_code
    )
    SELECT (SELECT count(*) FROM inventory.ledger) AS ledger_rows,
           coalesce(sum(last_n - first_n + 1), 0) AS covered,
           (array_agg(id ORDER BY id) FILTER (
                WHERE first_n IS NULL OR last_n IS NULL OR first_id > last_id OR first_id <= previous_last
           ))[1:10] AS bad
    FROM checked
    """
)


async def check_invariants(session: AsyncSession) -> int:
    """Asserts R1's invariants on every level (and that kits moved whole, and that the
    stock events cover every ledger row once); returns how many levels were checked."""
    rows = (await session.execute(INVARIANTS)).all()
    problems = [
        f"reservation {r.reservation_id}: kit {r.kit_sku}'s components did not move together"
        for r in (await session.execute(KITS_WHOLE)).all()
    ]
    for r in rows:
        if r.reserved < 0 or r.on_hand < 0:
            problems.append(f"{r.sku}/{r.warehouse_code}: negative counters {r.on_hand}/{r.reserved}")
        if not r.allow_backorder and r.reserved > r.on_hand:
            problems.append(
                f"{r.sku}/{r.warehouse_code}: oversold reserved {r.reserved} > on_hand {r.on_hand}"
            )
        if r.reserved != r.open:
            problems.append(f"{r.sku}/{r.warehouse_code}: reserved {r.reserved} != open holds {r.open}")
        if r.on_hand != r.ledger_on_hand or r.reserved != r.ledger_reserved:
            problems.append(
                f"{r.sku}/{r.warehouse_code}: counters {r.on_hand}/{r.reserved} != ledger "
                f"{r.ledger_on_hand}/{r.ledger_reserved}"
            )
    cover = (await session.execute(STOCK_EVENTS_COVER_LEDGER)).one()
    if cover.bad:
        problems.append(f"stock events {cover.bad} do not cover ledger rows of their level once each")
    if cover.covered != cover.ledger_rows:
        problems.append(f"stock events cover {cover.covered} of {cover.ledger_rows} ledger rows")
    assert not problems, "\n".join(problems)
    return len(rows)


async def settle_and_check(sessions: async_sessionmaker[AsyncSession]) -> int:
    """After a soak: lets short holds expire and the sweeper release them, asserts none is
    left behind, then check_invariants; returns how many levels were checked."""
    await asyncio.sleep(2.5)
    async with sessions() as s:
        left = (
            await s.execute(
                text(
                    "SELECT count(*) FROM inventory.reservations "
                    "WHERE state = 'active' AND expires_at < now() - interval '1 second'"
                )
            )
        ).scalar_one()
        assert left == 0, f"{left} expired reservations the sweeper did not release"
        return await check_invariants(s)
