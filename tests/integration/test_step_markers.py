"""Workflow step markers (`idempotency.once`) against real PostgreSQL: a step's
marker commits with its effect or not at all, and racing runs of one step
have exactly one first time."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.platform.idempotency import once
from domain.registration.store.registrations import ACTIVITY_EFFECTS
from domain.shared.uow import UnitOfWork
from tests.conftest import unique


async def _mark(sessions: async_sessionmaker[AsyncSession], key: str, *, commit: bool) -> bool:
    async with UnitOfWork(sessions) as uow:
        first = await once(uow.session, ACTIVITY_EFFECTS, key)
        if commit:
            await uow.commit()
        return first


async def test_a_marker_rolled_back_with_its_effect_leaves_the_step_to_do(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    key = unique("registration-wf") + ":notify"
    assert await _mark(sessions, key, commit=False)
    assert await _mark(sessions, key, commit=True)
    assert not await _mark(sessions, key, commit=True)
    async with sessions() as s:
        stored = (
            await s.execute(
                text("SELECT result = '{}'::jsonb FROM registration.activity_effects WHERE key = :k"),
                {"k": key},
            )
        ).scalar_one()
    assert stored is True


async def test_racing_runs_of_one_step_have_one_first_time(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    key = unique("registration-wf") + ":notify"
    firsts = await asyncio.gather(*(_mark(sessions, key, commit=True) for _ in range(12)))
    assert sorted(firsts) == [False] * 11 + [True]
