"""The stock rules exist once in SQL and once in Python: the two agree on every case of a table."""

from __future__ import annotations

import itertools

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.inventory.stock_rules import (
    Policy,
    may_reserve,
    may_reserve_sql,
    may_set_on_hand,
    may_set_on_hand_sql,
    within_allowance,
    within_allowance_sql,
)

COUNTS = (0, 1, 5, 10)
POLICIES = [
    Policy(track_inventory=t, allow_backorder=b, max_backorder=m)
    for t, b, m in itertools.product((True, False), (False, True), (0, 3))
]
# (on_hand, reserved, policy, change): change is the quantity to reserve, or the new on_hand.
CASES = [
    (on_hand, reserved, policy, change)
    for on_hand, reserved, policy in itertools.product(COUNTS, COUNTS, POLICIES)
    for change in (-1, 0, 1, 4, 6, 12)
]


async def test_sql_and_python_agree_on_every_case(sessions: async_sessionmaker[AsyncSession]) -> None:
    rows = ",".join(
        f"({i}, {oh}, {r}, {p.track_inventory}, {p.allow_backorder}, {p.max_backorder}, {c})"
        for i, (oh, r, p, c) in enumerate(CASES)
    )
    sql = f"""
        SELECT n, {within_allowance_sql("s.on_hand", "s.reserved")} AS within,
               {may_reserve_sql("x.change")} AS reserve,
               {may_set_on_hand_sql("x.change")} AS set_on_hand
        FROM (VALUES {rows}) AS x(n, on_hand, reserved, track_inventory, allow_backorder, max_backorder, change),
             LATERAL (SELECT x.on_hand, x.reserved) AS s,
             LATERAL (SELECT x.track_inventory, x.allow_backorder, x.max_backorder) AS i
        ORDER BY n
    """
    async with sessions() as s:
        got = (await s.execute(text(sql))).all()
    assert len(got) == len(CASES) > 500
    disagreements = []
    for (_n, within, reserve, set_on_hand), (oh, r, p, c) in zip(got, CASES, strict=True):
        expected = (within_allowance(oh, r, p), may_reserve(oh, r, c, p), may_set_on_hand(c, oh, r, p))
        if (within, reserve, set_on_hand) != expected:
            disagreements.append((oh, r, p, c, (within, reserve, set_on_hand), expected))
    assert not disagreements, disagreements[:5]
    # The table reaches every outcome of each rule.
    for column in (1, 2, 3):
        assert {row[column] for row in got} == {True, False}


def test_the_rules_read_as_the_readme_says() -> None:
    strict = Policy()
    assert may_reserve(10, 4, 6, strict) and not may_reserve(10, 4, 7, strict)
    capped = Policy(allow_backorder=True, max_backorder=3)
    assert may_reserve(10, 4, 9, capped) and not may_reserve(10, 4, 10, capped)
    assert may_reserve(0, 0, 10**6, Policy(allow_backorder=True))  # 0 = unlimited
    assert not may_set_on_hand(-1, 5, 0, Policy(track_inventory=False))  # never below 0
    assert may_set_on_hand(2, 1, 5, strict)  # an increase always may, even while short
    assert not may_set_on_hand(4, 10, 5, strict) and may_set_on_hand(5, 10, 5, strict)
    assert may_set_on_hand(0, 10, 5, Policy(track_inventory=False))
