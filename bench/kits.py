"""Kits for `make bench` (docs/kits.md): ReserveStock of one kit with 64 callers
through a real server (group commit), spread over 5,000 kits of two components
each (1 + 2 units of two of the 10,000 SKUs of P3), next to ReserveStock(1) of a
simple SKU over the same 10,000 SKUs in the same run (P3's case); and the
statements one reservation runs, simple and kit, counted on the driver
connection (asyncpg's query logger) in-process.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bench.common import Database, Row
from tests.inventory_support import migrated_database
from tests.pg import drop_database

CLIENTS = 64
KIT_UNITS = 3  # units one kit reserves: 1 of its first component, 2 of its second
KIT_LEDGER_ROWS = 2  # one per component movement


async def define_kits(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Kits K00000 ... K04999 over bench/reserve.py's SKUs: K<i> = 1 x B<2i> + 2 x B<2i+1>.
    Setup data only: the benchmark itself uses the domain paths."""
    from bench.reserve import SPREAD

    n = SPREAD // 2
    kits = [f"K{i:05d}" for i in range(n)]
    async with sessions() as s, s.begin():
        await s.execute(
            text("INSERT INTO inventory.items (sku, is_kit) SELECT unnest(CAST(:k AS text[])), true"),
            {"k": kits},
        )
        await s.execute(
            text(
                """INSERT INTO inventory.kit_components (kit_sku, component_sku, quantity)
                   SELECT k, c, q FROM unnest(CAST(:k AS text[]), CAST(:c AS text[]), CAST(:q AS bigint[]))
                        AS t(k, c, q)"""
            ),
            {
                "k": [k for k in kits for _ in range(2)],
                "c": [f"B{2 * i + j:05d}" for i in range(n) for j in range(2)],
                "q": [1, 2] * n,
            },
        )
    async with sessions() as s, s.begin():
        await s.execute(text("ANALYZE inventory.kit_components"))
        await s.execute(text("ANALYZE inventory.items"))


async def count_statements(url: str) -> dict[str, Any]:
    """Statements one ReserveStock of 1 simple SKU and of 1 kit runs on the driver
    connection between BEGIN and COMMIT (both listed under "queries")."""
    from bench.reserve import _prepare
    from domain.inventory import LineRequest, reserve_many, reserve_request
    from domain.shared.db import driver_connection, make_engine, make_session_factory
    from domain.shared.uow import UnitOfWork

    engine = make_engine(url, pool_size=1, max_overflow=0)
    out: dict[str, Any] = {}
    try:
        sessions = make_session_factory(engine)
        await _prepare(sessions, spread=True)
        await define_kits(sessions)
        # Each shape twice: the first prepares its statements (asyncpg's cache), the second is counted.
        for label, sku in (("simple", "B09998"), ("kit", "K00001"), ("simple", "B09999"), ("kit", "K00002")):
            seen: list[str] = []

            def log(record: Any, seen: list[str] = seen) -> None:
                seen.append(" ".join(record.query.split())[:60])

            async with UnitOfWork(sessions) as uow:
                conn = await driver_connection(uow.session)
                conn.add_query_logger(log)
                try:
                    (res,) = await reserve_many(uow.session, [reserve_request([LineRequest(sku, 1)])])
                    await uow.commit()
                finally:
                    conn.remove_query_logger(log)
            await asyncio.sleep(0.05)  # the logger's callbacks run on the loop, after the calls
            assert not isinstance(res, Exception), res
            out[label] = {
                "statements": len([q for q in seen if q != "COMMIT"]),
                "queries": seen,
                "lines": len(res.lines),
            }
    finally:
        await engine.dispose()
    return out


def _case(fn: Any) -> Any:
    url, name = migrated_database("entrepot_bench")
    try:
        return fn(url)
    finally:
        drop_database(name)


def run(db: Database, duration: float, *, smoke: bool = False) -> list[Row]:
    from bench.reserve_server import run_server_case

    secs = max(1, int(duration))
    simple = _case(lambda u: run_server_case(u, spread=True, batched=True, clients=CLIENTS, seconds=secs))
    kit = _case(
        lambda u: run_server_case(u, spread=True, batched=True, clients=CLIENTS, seconds=secs, kits=True)
    )
    statements = asyncio.run(count_statements(db.url))
    per_kit, per_simple = statements["kit"]["statements"], statements["simple"]["statements"]
    return [
        Row(
            "K1",
            "ReserveStock(1 kit: 1 + 2 units of 2 of 10,000 SKUs), 64 callers, group commit",
            kit["tps"],
            simple["tps"],
            "reservations/s",
            "(comparison, vs ReserveStock(1) simple, 10,000 SKUs)",
            None,
            {"kit": kit, "simple": simple},
            sound=bool(kit["consistent"]) and bool(simple["consistent"]),
        ),
        Row(
            "K1s",
            "statements per reservation, kit vs simple (driver connection, BEGIN/COMMIT aside)",
            per_kit,
            per_simple,
            "statements",
            "kit <= simple + 2",
            per_kit <= per_simple + 2,
            statements,
        ),
    ]
