"""driver_connection: statements sent on the asyncpg connection belong to the session's transaction."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.shared.db import driver_connection

_INSERT = "INSERT INTO platform.leases (name, holder, expires_at) VALUES ($1, 'test', now())"
_COUNT = text("SELECT count(*) FROM platform.leases WHERE name = :n")


async def _count(sessions: async_sessionmaker[AsyncSession], name: str) -> int:
    async with sessions() as s:
        return int((await s.execute(_COUNT, {"n": name})).scalar_one())


async def test_rollback_undoes_what_was_sent_on_the_driver(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    name = f"driver-{uuid.uuid4().hex}"
    async with sessions() as s, s.begin():
        conn = await driver_connection(s)  # before any SQLAlchemy statement: BEGIN is sent here
        await conn.execute(_INSERT, name)
        assert int((await s.execute(_COUNT, {"n": name})).scalar_one()) == 1  # same transaction
        await s.rollback()
    assert await _count(sessions, name) == 0


async def test_commit_keeps_it(sessions: async_sessionmaker[AsyncSession]) -> None:
    name = f"driver-{uuid.uuid4().hex}"
    async with sessions() as s, s.begin():
        await s.execute(text("SELECT 1"))
        conn = await driver_connection(s)  # after one: the same transaction continues
        await conn.execute(_INSERT, name)
    assert await _count(sessions, name) == 1
