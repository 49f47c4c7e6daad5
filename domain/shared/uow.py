"""Unit of work: one database transaction per RPC (cosmicpython style), and the
one retry policy for transactions (`retrying`)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from domain.shared.db import RETRYABLE_SQLSTATES, connection_lost, driver_if_used, retire_pooled, sqlstate

log = logging.getLogger("entrepot.uow")

T = TypeVar("T")

# A transaction refused for a deadlock or a serialization failure is run again
# whole, up to this many times in all, after a short random pause.
RETRY_ATTEMPTS = 4


async def retrying(attempt: Callable[[], Awaitable[T]], *, what: str) -> T:
    """`attempt()` (which runs its own UnitOfWork), again while the database
    refuses it with a retryable SQLSTATE (RETRYABLE_SQLSTATES). Every
    transaction runner uses this; anything else is raised at once."""
    for n in range(RETRY_ATTEMPTS):
        try:
            return await attempt()
        except Exception as exc:
            state = sqlstate(exc)
            if state not in RETRYABLE_SQLSTATES or n == RETRY_ATTEMPTS - 1:
                raise
            log.info("%s retried after SQLSTATE %s", what, state)
        await asyncio.sleep(random.uniform(0, 0.002 * 2**n))
    raise AssertionError("unreachable")


def _connection_unusable(session: AsyncSession, exc: BaseException) -> bool:
    """After `exc` left a transaction: may its connection go back to the pool?

    Statements sent on the driver connection directly (driver_connection)
    bypass SQLAlchemy, which would otherwise invalidate a connection itself.
    Unusable: cancelled (or interrupted otherwise) mid-transaction, so a BEGIN
    or a statement may be half done; a driver-level connection error; or the
    driver connection is closed (database restart, terminated backend)."""
    if not isinstance(exc, Exception) or connection_lost(exc):
        return True
    driver = driver_if_used(session)
    return driver is not None and driver.is_closed()


class UnitOfWork:
    """`async with UnitOfWork(sessions) as uow:` ... `await uow.commit()`.

    The transaction begins on entry. A connection found dead then, before the
    transaction sent anything else, is dropped and the transaction begun once
    more on a fresh one (the pool's other connections are retired too: they
    most likely died with it): nothing can have happened twice. Leaving the block
    without commit rolls back, so a failure anywhere in a call that spans
    modules leaves nothing behind.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._session: AsyncSession | None = None
        self.committed = False

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            raise RuntimeError("unit of work used outside `async with`")
        return self._session

    async def __aenter__(self) -> UnitOfWork:
        self.committed = False
        for last in (False, True):
            session = self._sessions()
            try:
                await session.begin()
                await session.connection()  # BEGIN
            except BaseException as exc:
                await session.invalidate()
                if last or not isinstance(exc, Exception) or not connection_lost(exc):
                    raise
                bind = session.bind
                if isinstance(bind, AsyncEngine):
                    retire_pooled(bind)
                log.info("a pooled connection was dead at BEGIN; beginning on a fresh one")
                continue
            self._session = session
            break
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session = self.session
        if exc is not None and _connection_unusable(session, exc):
            # Closed, never returned to the pool (see _connection_unusable).
            try:
                await session.invalidate()
            finally:
                self._session = None
            return
        try:
            if not self.committed:
                await session.rollback()
        finally:
            await session.close()
            self._session = None

    async def commit(self) -> None:
        await self.session.commit()
        self.committed = True

    async def rollback(self) -> None:
        await self.session.rollback()
