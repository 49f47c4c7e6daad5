"""Unit of work: one database transaction per RPC (cosmicpython style)."""

from __future__ import annotations

from types import TracebackType

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

# Errors of the driver connection itself (raised by statements sent on it directly).
_CONNECTION_ERRORS = (asyncpg.InterfaceError, asyncpg.exceptions.PostgresConnectionError, OSError)


class UnitOfWork:
    """`async with UnitOfWork(sessions) as uow:` ... `await uow.commit()`.

    Leaving the block without commit rolls back, so a failure anywhere in a
    call that spans modules leaves nothing behind.
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
        self._session = self._sessions()
        await self._session.begin()
        self.committed = False
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session = self.session
        if exc is not None and (not isinstance(exc, Exception) or isinstance(exc, _CONNECTION_ERRORS)):
            # Cancelled (or interrupted otherwise) mid-transaction, or the
            # connection broke. Statements sent on the driver connection directly
            # (domain.shared.db.driver_connection) bypass SQLAlchemy, which would
            # otherwise invalidate the connection itself: its state is unknown (a
            # BEGIN or a statement may be half done), so it is closed, never
            # returned to the pool.
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
