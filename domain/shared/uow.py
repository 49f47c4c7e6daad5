"""Unit of work: one database transaction per RPC (cosmicpython style)."""

from __future__ import annotations

from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.shared.db import connection_lost, driver_if_used


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
