"""driver_connection: statements sent on the asyncpg connection belong to the session's transaction,
and a connection the database closed reads as an outage."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.shared.db import connection_lost, driver_connection, make_engine, make_session_factory
from domain.shared.uow import UnitOfWork
from server.interceptors import _transient_db_error

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


async def test_a_pooled_connection_closed_by_the_database_is_unavailable_not_internal(
    sessions: async_sessionmaker[AsyncSession], database_url: str
) -> None:
    # Found by R6: after a database restart the pool hands out a closed connection
    # (no pre-ping), and the first driver statement failed with an InterfaceError
    # that was answered INTERNAL. It must read as a lost connection (UNAVAILABLE),
    # and the unit of work must discard it so that the next call reconnects.
    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    uows = make_session_factory(engine)
    try:
        async with uows() as s:
            pid = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with sessions() as s:
            assert (await s.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})).scalar_one()
        await asyncio.sleep(0.2)  # asyncpg sees the socket close
        with pytest.raises(Exception) as failed:
            async with UnitOfWork(uows) as uow:
                await driver_connection(uow.session)
        assert connection_lost(failed.value), repr(failed.value)
        assert _transient_db_error(failed.value)
        async with UnitOfWork(uows) as uow:
            conn = await driver_connection(uow.session)
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await engine.dispose()


async def test_misuse_of_the_driver_is_not_mistaken_for_an_outage(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as s, s.begin():
        conn = await driver_connection(s)
        with pytest.raises(asyncpg.InterfaceError) as failed:
            await conn.fetchval("SELECT $1::int", 1, 2)  # one argument too many
    assert not connection_lost(failed.value)
    assert not _transient_db_error(failed.value)
