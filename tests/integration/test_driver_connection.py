"""driver_connection: statements sent on the asyncpg connection belong to the session's transaction,
and a connection the database closed reads as an outage."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.shared.db import connection_lost, driver_connection, make_engine, make_session_factory
from domain.shared.uow import UnitOfWork, retrying
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


@pytest.mark.parametrize("noticed", [True, False], ids=["closed-and-noticed", "closed-unnoticed"])
async def test_a_pooled_connection_the_database_closed_is_replaced_before_the_transaction_begins(
    sessions: async_sessionmaker[AsyncSession], database_url: str, noticed: bool
) -> None:
    # After a database restart or a mass termination the pool holds closed
    # connections (no pre-ping). A unit of work must not fail on one: a connection
    # the driver knows is closed is replaced at checkout, and one that fails at
    # BEGIN (nothing sent yet) is replaced once more.
    engine = make_engine(database_url, pool_size=2, max_overflow=0)
    uows = make_session_factory(engine)
    try:
        pids = []
        async with UnitOfWork(uows) as first, UnitOfWork(uows) as second:
            for uow in (first, second):
                pids.append((await uow.session.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        async with sessions() as s:
            for pid in pids:
                assert (await s.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})).scalar_one()
        if noticed:
            await asyncio.sleep(0.2)  # asyncpg sees the sockets close
        for _ in range(3):
            async with UnitOfWork(uows) as uow:
                conn = await driver_connection(uow.session)
                assert await conn.fetchval("SELECT pg_backend_pid()") not in pids
    finally:
        await engine.dispose()


async def test_a_connection_lost_mid_transaction_reads_as_an_outage_and_is_discarded(
    sessions: async_sessionmaker[AsyncSession], database_url: str
) -> None:
    # Once the transaction has begun nothing is retried: the call is UNAVAILABLE
    # (never INTERNAL) and the connection never goes back to the pool.
    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    uows = make_session_factory(engine)
    try:
        with pytest.raises(Exception) as failed:
            async with UnitOfWork(uows) as uow:
                conn = await driver_connection(uow.session)
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                async with sessions() as s:
                    await s.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                await asyncio.sleep(0.2)
                await conn.fetchval("SELECT 1")
        assert connection_lost(failed.value), repr(failed.value)
        assert _transient_db_error(failed.value)
        async with UnitOfWork(uows) as uow:
            conn = await driver_connection(uow.session)
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await engine.dispose()


async def test_a_deadlock_is_retried_whole_by_the_one_retry_policy(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    names = [f"deadlock-{uuid.uuid4().hex}" for _ in range(2)]
    async with UnitOfWork(sessions) as uow:
        for n in names:
            await uow.session.execute(
                text("INSERT INTO platform.leases (name, holder, expires_at) VALUES (:n, 'x', now())"),
                {"n": n},
            )
        await uow.commit()
    both_locked_one = asyncio.Barrier(2)
    attempts = [0, 0]

    async def cross(i: int) -> None:
        attempts[i] += 1
        async with UnitOfWork(sessions) as uow:
            lock = text("UPDATE platform.leases SET holder = :h WHERE name = :n")
            await uow.session.execute(lock, {"h": f"t{i}", "n": names[i]})
            if attempts[i] == 1:
                await both_locked_one.wait()  # the first tries cross each other: a deadlock
            await uow.session.execute(lock, {"h": f"t{i}", "n": names[1 - i]})
            await uow.commit()

    await asyncio.gather(*(retrying(lambda i=i: cross(i), what="test") for i in range(2)))
    assert sum(attempts) == 3  # the deadlock victim ran once more, the other once
    async with sessions() as s:
        holders = (
            await s.execute(text("SELECT holder FROM platform.leases WHERE name = ANY(:n)"), {"n": names})
        ).scalars()
        assert len(set(holders)) == 1  # the transaction that ran last holds both


async def test_errors_that_are_not_retryable_are_raised_at_once() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise asyncpg.exceptions.UniqueViolationError("duplicate")

    with pytest.raises(asyncpg.exceptions.UniqueViolationError):
        await retrying(attempt, what="test")
    assert calls == 1


async def test_misuse_of_the_driver_is_not_mistaken_for_an_outage(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as s, s.begin():
        conn = await driver_connection(s)
        with pytest.raises(asyncpg.InterfaceError) as failed:
            await conn.fetchval("SELECT $1::int", 1, 2)  # one argument too many
    assert not connection_lost(failed.value)
    assert not _transient_db_error(failed.value)


def test_a_checkout_that_found_every_connection_closed_reads_as_an_outage() -> None:
    # The pool gives up after its reconnection attempts when the connections it opens are killed
    # as fast as it replaces them (seen under R6's mass kill): nothing was sent, so the unit of work
    # may begin once more, and the call answers UNAVAILABLE if that fails too, not INTERNAL.
    assert connection_lost(InvalidRequestError("This connection is closed"))
    assert not connection_lost(
        InvalidRequestError("Can't reconnect until invalid transaction is rolled back")
    )
