"""Async engine and session factory (SQLAlchemy 2 + asyncpg)."""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, MetaData, event, exc, pool
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

if TYPE_CHECKING:
    # Not imported at run time here: Temporal's workflow sandbox re-imports domain
    # modules, and a second import of asyncpg's extension modules crashes the process.
    import asyncpg

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """One declarative base; each module's tables live in that module's schema."""

    metadata = MetaData(naming_convention=NAMING)


def async_url(url: str) -> str:
    """Accept plain postgresql:// URLs and use the asyncpg driver."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError("DATABASE_URL must be a postgresql:// URL")


def driver_url(url: str) -> str:
    """The URL asyncpg itself accepts (postgresql://)."""
    return "postgresql://" + async_url(url)[len("postgresql+asyncpg://") :]


async def make_read_pool(url: str, *, size: int = 2, command_timeout: float = 30.0) -> asyncpg.Pool[Any]:
    """A small asyncpg pool for single-statement hot reads in autocommit (the
    coalesced GetStockLevel path): asyncpg's own acquire and prepared-statement
    cache, none of the session machinery. A connection broken by a database
    restart fails its call (UNAVAILABLE) and is reconnected on the next acquire."""
    import asyncpg

    async def keep_session(conn: asyncpg.Connection[Any]) -> None:
        # asyncpg's default reset is a round trip per release (RESET ALL, UNLISTEN,
        # ...); these connections only run autocommit SELECTs, so there is no
        # session state to reset (an open transaction is still rolled back).
        return None

    pool = await asyncpg.create_pool(
        driver_url(url),
        min_size=0,
        max_size=size,
        command_timeout=command_timeout,
        timeout=5,
        # Its own name in pg_stat_activity: these connections are not the engine's.
        server_settings={"application_name": "entrepot-read"},
        reset=keep_session,
    )
    assert pool is not None
    return pool


def make_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 10, command_timeout: float = 30.0
) -> AsyncEngine:
    engine = create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        # No pre-ping: it costs a round trip per checkout. A connection broken by a
        # database restart fails its call with UNAVAILABLE and SQLAlchemy then
        # invalidates the whole pool, so the next calls reconnect.
        pool_pre_ping=False,
        pool_timeout=10,
        # The transactions are the connection events' (below), not the adapter's.
        isolation_level="AUTOCOMMIT",
        connect_args={
            "command_timeout": command_timeout,
            "timeout": 5,
            "server_settings": {"application_name": "entrepot"},
        },
    )
    _explicit_transactions(engine)
    return engine


def _explicit_transactions(engine: AsyncEngine) -> None:
    """Transactions begun, committed and rolled back on the driver connection.

    SQLAlchemy's asyncpg adapter would begin its transaction lazily, inside its
    own cursor, on the first statement it runs itself; a statement sent on the
    driver connection before that (driver_connection) would run outside any
    transaction, and there is no public way to begin the adapter's. So the
    adapter runs in autocommit, and the transaction SQLAlchemy begins for a
    connection (a session's first use of it) is sent as BEGIN right then:
    SQLAlchemy's statements and driver statements share it, with the same round
    trips as before. `run_async` is SQLAlchemy's documented way to await the
    driver from these synchronous events."""
    sync = engine.sync_engine

    def send(conn: Connection, sql: str) -> None:
        conn.connection.dbapi_connection.run_async(lambda driver: driver.execute(sql))  # type: ignore[union-attr]

    @event.listens_for(sync, "begin")
    def begin(conn: Connection) -> None:
        send(conn, "BEGIN")

    @event.listens_for(sync, "commit")
    def commit(conn: Connection) -> None:
        send(conn, "COMMIT")

    @event.listens_for(sync, "rollback")
    def rollback(conn: Connection) -> None:
        if conn.invalidated:
            return  # closed, never reused
        driver = conn.connection.driver_connection
        if driver is not None and not driver.is_closed() and driver.is_in_transaction():
            send(conn, "ROLLBACK")

    @event.listens_for(sync.pool, "checkout")
    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        # The driver already knows the database closed this connection (a restart,
        # a terminated backend), or a unit of work found one dead (retire_pooled):
        # take a fresh one instead of failing the call, and retire every connection
        # pooled before now (they are likely closed too). A local check, not a
        # round trip like pre-ping.
        retire = _RETIRE_AT_NEXT_CHECKOUT.pop(sync.pool, False)
        if retire or dbapi_connection.driver_connection.is_closed():
            raise exc.InvalidatePoolError("the database closed a pooled connection")

    @event.listens_for(sync.pool, "reset")
    def reset(dbapi_connection: Any, record: Any, state: Any) -> None:
        # A connection going back to the pool inside a transaction (a failure
        # between BEGIN and the end) must not carry it to its next user.
        driver = dbapi_connection.driver_connection
        if not driver.is_closed() and driver.is_in_transaction():
            dbapi_connection.run_async(lambda d: d.execute("ROLLBACK"))


_RETIRE_AT_NEXT_CHECKOUT: weakref.WeakKeyDictionary[pool.Pool, bool] = weakref.WeakKeyDictionary()


def retire_pooled(engine: AsyncEngine) -> None:
    """Every connection now in `engine`'s pool is replaced before its next use: the
    next checkout opens a fresh connection (see the checkout event in make_engine).
    For when one pooled connection was found dead: the others most likely died with
    it (a database restart, a mass termination), though the driver may not know yet."""
    _RETIRE_AT_NEXT_CHECKOUT[engine.sync_engine.pool] = True


def make_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


_DRIVER = "entrepot_driver_connection"
_DRIVER_USED = "entrepot_driver_used"


async def driver_connection(session: AsyncSession) -> asyncpg.Connection[Any]:
    """The asyncpg connection under `session`, inside the session's transaction
    (begun here if the session has not run a statement yet; see make_engine).

    Hot paths run their few statements on it directly: SQLAlchemy's
    per-statement work (compile cache lookup, execution context, result
    wrapping) costs several times asyncpg's own. Commit, rollback and
    connection return stay with the session. asyncpg raises its own exceptions
    here (asyncpg.PostgresError with .sqlstate), which the server maps like
    SQLAlchemy's."""
    transaction = session.sync_session.get_transaction()
    cached = session.info.get(_DRIVER)
    if cached is not None and transaction is not None and cached[0] is transaction:
        return cached[1]  # type: ignore[no-any-return]
    conn = await session.connection()  # begins the transaction
    fairy = await conn.get_raw_connection()
    driver: asyncpg.Connection[Any] = fairy.driver_connection
    # Recorded for the unit of work's check of this connection (driver_if_used).
    session.info[_DRIVER_USED] = driver
    # Same session transaction, same connection: hot paths call this several times per RPC.
    session.info[_DRIVER] = (session.sync_session.get_transaction(), driver)
    return driver


# Serialization failure, deadlock: the whole transaction may be retried.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


def _layers(exc: BaseException) -> tuple[BaseException, ...]:
    """`exc` and the driver errors inside it: asyncpg's own errors come from
    statements on the driver connection; SQLAlchemy wraps the driver's error as
    .orig, whose __cause__ is asyncpg's."""
    orig = getattr(exc, "orig", None)
    return tuple(e for e in (exc, orig, getattr(orig, "__cause__", None)) if isinstance(e, BaseException))


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE behind `exc`, whichever layer raised it."""
    for layer in _layers(exc):
        state = getattr(layer, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


# asyncpg raises a plain InterfaceError for a connection that is closed or left
# mid-operation, and the same class for misuse (wrong argument count); only
# these messages say the connection is unusable (SQLAlchemy's is_disconnect
# reads the message the same way).
_CHECKOUT_EXHAUSTED = "This connection is closed"  # sqlalchemy.pool: reconnection attempts exhausted
_UNUSABLE = ("connection is closed", "another operation is in progress", "another operation is cancelling")


def connection_lost(exc: BaseException) -> bool:
    """`exc` says the driver connection itself is unusable (dropped, closed, or
    left mid-operation), as opposed to a statement failing on a healthy one."""
    import asyncpg  # here, not at import: Temporal's workflow sandbox re-imports this module

    for layer in _layers(exc):
        if isinstance(
            layer, (asyncpg.InternalClientError, asyncpg.exceptions.PostgresConnectionError, OSError)
        ):
            return True
        if isinstance(layer, asyncpg.InterfaceError) and any(m in str(layer) for m in _UNUSABLE):
            return True
        # The pool's checkout gave up: every connection it tried was closed or retired
        # (connections killed while it replaced them). Nothing was sent on any of them.
        if isinstance(layer, InvalidRequestError) and str(layer) == _CHECKOUT_EXHAUSTED:
            return True
    return False


def driver_if_used(session: AsyncSession) -> asyncpg.Connection[Any] | None:
    """The driver connection driver_connection handed out in this session, if any."""
    driver: asyncpg.Connection[Any] | None = session.info.get(_DRIVER_USED)
    return driver


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class DriverStatement:
    """A statement written with SQLAlchemy-style `:name` parameters, run on an
    asyncpg connection as `$n` (one number per distinct name, so a name used
    twice is bound once). Lets hot paths share SQL text with text() statements."""

    __slots__ = ("names", "sql")

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def number(m: re.Match[str]) -> str:
            if m.group(1) not in names:
                names.append(m.group(1))
            return f"${names.index(m.group(1)) + 1}"

        self.sql = _NAMED.sub(number, sql)
        self.names = tuple(names)

    def args(self, params: dict[str, object]) -> list[object]:
        """Positional arguments in `$n` order; a missing name is a KeyError."""
        return [params[n] for n in self.names]

    async def fetch(self, conn: asyncpg.Connection[Any], params: dict[str, object]) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await conn.fetch(self.sql, *self.args(params))
        return rows

    async def execute(self, conn: asyncpg.Connection[Any], params: dict[str, object]) -> str:
        status: str = await conn.execute(self.sql, *self.args(params))
        return status
