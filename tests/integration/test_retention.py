"""The retention job (server/background.py) on a real database of its own: it drains
a backlog larger than one batch in one tick, keeps what is within the retention,
and stops at its time budget."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import text

from server import background
from server.runtime import Runtime
from tests.conftest import make_settings
from tests.inventory_support import migrated_database
from tests.pg import drop_database

OLD = background.RETENTION_BATCH * 2 + 500  # more than two batches


@pytest.fixture
def own_database() -> Iterator[str]:
    url, name = migrated_database("entrepot_retention")
    yield url
    drop_database(name)


@pytest.fixture
async def rt(own_database: str) -> AsyncIterator[Runtime]:
    settings = make_settings(own_database, None, idempotency_retention_hours=72, outbox_retention_hours=168)
    runtime = Runtime(settings)
    try:
        async with runtime.sessions() as s, s.begin():
            await s.execute(
                text(
                    """INSERT INTO platform.outbox (topic, aggregate_type, aggregate_id, payload, created_at)
                       SELECT 'test.retention', 'x', g::text, '{}'::jsonb, now() - interval '169 hours'
                       FROM generate_series(1, :old) g
                       UNION ALL
                       SELECT 'test.retention', 'x', 'kept', '{}'::jsonb, now() - interval '167 hours'"""
                ),
                {"old": OLD},
            )
            await s.execute(
                text(
                    """INSERT INTO platform.idempotency_keys (principal, request_id, method, request_hash,
                           created_at)
                       SELECT 'p', 'old-' || g, 'm', '\\x00'::bytea, now() - interval '73 hours'
                       FROM generate_series(1, :old) g
                       UNION ALL
                       SELECT 'p', 'kept', 'm', '\\x00'::bytea, now() - interval '71 hours'"""
                ),
                {"old": OLD},
            )
        yield runtime
    finally:
        await runtime.close()


async def _left(rt: Runtime) -> tuple[int, int]:
    async with rt.sessions() as s:
        row = (
            await s.execute(
                text(
                    """SELECT (SELECT count(*) FROM platform.outbox),
                              (SELECT count(*) FROM platform.idempotency_keys)"""
                )
            )
        ).one()
    return int(row[0]), int(row[1])


async def test_one_tick_drains_a_backlog_of_several_batches_and_keeps_recent_rows(rt: Runtime) -> None:
    assert await background._retention_step(rt) == 2 * OLD
    assert await _left(rt) == (1, 1)
    async with rt.sessions() as s:
        kept = (await s.execute(text("SELECT aggregate_id FROM platform.outbox"))).scalar_one()
    assert kept == "kept"
    assert await background._retention_step(rt) == 0


async def test_a_tick_stops_at_its_budget_and_the_next_one_goes_on(rt: Runtime) -> None:
    # A spent budget: one batch per table, then the tick ends.
    assert await background._retention_step(rt, budget=0.0) == 2 * background.RETENTION_BATCH
    assert await _left(rt) == (OLD - background.RETENTION_BATCH + 1,) * 2
    assert await background._retention_step(rt) == 2 * (OLD - background.RETENTION_BATCH)
    assert await _left(rt) == (1, 1)
