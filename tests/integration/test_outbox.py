"""The outbox writer: its forms write the same rows, and writing is what wakes the watchers."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.shared import outbox
from tests.conftest import unique


async def test_both_forms_write_in_order_and_wake_after_commit(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    woken: list[int] = []

    def hook() -> None:
        woken.append(1)

    agg = unique("agg")
    events = [outbox.Event("test.a", "x", agg, {"n": i, "s": "é"}, "ch" if i else None) for i in range(3)]
    outbox.on_outbox_commit(hook)
    try:
        async with sessions() as s, s.begin():
            await outbox.emit_many(s, events[:2])
        assert woken == [1]
        # The CTE form with derived rows after the given events, inside a larger statement.
        stmt = text(
            f"""WITH d AS (SELECT * FROM (VALUES (1, 'd1'), (2, 'd2')) AS v(n, name)),
                {outbox.cte("ev", derived=f"SELECT n, 'test.b', 'x', '{agg}', NULL, jsonb_build_object('d', name) FROM d")}
                SELECT 1"""
        )
        async with sessions() as s, s.begin():
            await s.execute(stmt, outbox.params(s, events[2:], name="ev", derived_rows=2))
        assert woken == [1, 1]
        # Nothing written, nothing to wake.
        async with sessions() as s, s.begin():
            await s.execute(
                text(f"WITH {outbox.cte('ev', when='false')} SELECT 1"), outbox.params(s, [], name="ev")
            )
        assert woken == [1, 1]
        # A rolled-back write wakes nobody.
        async with sessions() as s:
            await outbox.emit(s, events[0])
            await s.rollback()
        assert woken == [1, 1]
    finally:
        outbox.remove_outbox_commit_hook(hook)
    async with sessions() as s:
        rows = (
            await s.execute(
                text(
                    "SELECT topic, channel, payload FROM platform.outbox WHERE aggregate_id = :a ORDER BY id"
                ),
                {"a": agg},
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("test.a", None, {"n": 0, "s": "é"}),
        ("test.a", "ch", {"n": 1, "s": "é"}),
        ("test.a", "ch", {"n": 2, "s": "é"}),
        ("test.b", None, {"d": "d1"}),
        ("test.b", None, {"d": "d2"}),
    ]
