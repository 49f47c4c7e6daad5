"""Runtime: what every servicer needs (database, idempotent mutations, Temporal)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
from google.protobuf.message import Message
from google.rpc import status_pb2
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from domain.platform import idempotency
from domain.shared.db import connection_lost, make_engine, make_read_pool, make_session_factory
from domain.shared.errors import DomainError, FieldViolation, InvalidArgument, Unavailable
from domain.shared.uow import UnitOfWork, retrying
from server.context import bound_channel, current_caller, current_method
from server.errors import ReplayedStatus, status_from_domain
from server.notifier import NOTIFY_SQL, OutboxNotifier
from server.settings import Settings

log = logging.getLogger("entrepot.runtime")

M = TypeVar("M", bound=Message)
T = TypeVar("T")

MAX_REQUEST_ID = 128


def request_digest(method: str, request: Message) -> bytes:
    """What identifies a request under its request_id (validated here): the
    method, the channel the call is bound to, and the body (idempotency.request_hash)."""
    request_id: str = getattr(request, "request_id", "")
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise InvalidArgument(
            "INVALID_REQUEST_ID",
            f"request_id must be 1 to {MAX_REQUEST_ID} printable characters",
            field_violations=[
                FieldViolation("request_id", f"printable, at most {MAX_REQUEST_ID} characters")
            ],
        )
    channel = bound_channel()
    return idempotency.request_hash(
        method, None if channel is None else channel.slug, request.SerializeToString(deterministic=True)
    )


class Runtime:
    def __init__(self, settings: Settings, engine: AsyncEngine | None = None) -> None:
        if engine is None:
            if not settings.database_url:
                raise ValueError("DATABASE_URL is not set")
            engine = make_engine(
                settings.database_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow
            )
        self.settings = settings
        self.engine = engine
        self.sessions: async_sessionmaker[AsyncSession] = make_session_factory(engine)
        self._read_pool: asyncpg.Pool[Any] | None = None
        self._read_pool_lock = asyncio.Lock()
        self._temporal: Any = None
        # The Temporal SDK runtime the client uses (None: the default one); the worker sets its
        # own, exporting Prometheus metrics (server/worker.py).
        self.temporal_runtime: Any = None
        self._temporal_lock = asyncio.Lock()
        # What the app's health check last found (server/app.py); True until it says otherwise.
        self.temporal_reachable = True
        # Filled by the app: response message class per full method name.
        self.response_types: dict[str, type[Message]] = {}
        # Set by the app: drops a channel from the interceptor's cache after an update.
        self.on_channel_changed: Callable[[str], None] = lambda slug: None
        # Wakes outbox readers on every replica after commits that wrote events.
        self.notifier = OutboxNotifier(lambda: self.read_one_statement(lambda conn: conn.execute(NOTIFY_SQL)))
        self.notifier.install()

    def channel_changed(self, slug: str) -> None:
        self.on_channel_changed(slug)

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.sessions)

    async def read(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        # A UnitOfWork (rolled back at the end): reads may run on the driver
        # connection, and the unit of work closes it when it died or was interrupted.
        async with self.uow() as uow:
            return await fn(uow.session)

    async def read_one_statement(self, fn: Callable[[asyncpg.Connection[Any]], Awaitable[T]]) -> T:
        """Hot reads that are a single statement (and the notifier's NOTIFY): on a
        connection of the small asyncpg read pool, in autocommit (no BEGIN/COMMIT
        round trips, no session).

        A connection found dead is dropped with every other one of the pool (they
        most likely died with it: a database restart, a mass termination) and the
        statement run once more on a fresh one, like UnitOfWork does at BEGIN. A
        single read (or NOTIFY, a wake-up) may run twice without harm."""
        pool = self._read_pool
        if pool is None:
            async with self._read_pool_lock:
                if self._read_pool is None:
                    url = self.engine.url.render_as_string(hide_password=False)
                    self._read_pool = await make_read_pool(url, size=self.settings.db_read_pool_size)
                pool = self._read_pool
        for last in (False, True):
            async with pool.acquire() as conn:
                try:
                    return await fn(conn)
                except Exception as exc:
                    if not connection_lost(exc):
                        raise
                    # Its state is unknown (dropped mid-operation): never hand it out
                    # again. A connection the database closed has already gone back to
                    # the pool by itself (its proxy then refuses every call).
                    with contextlib.suppress(asyncpg.InterfaceError):
                        conn.terminate()
                    if last:
                        raise
            await pool.expire_connections()
            log.info("a read pool connection was dead; reading on a fresh one")
        raise AssertionError("unreachable")

    async def mutate(self, request: Message, fn: Callable[[UnitOfWork], Awaitable[M]]) -> M:
        """Run `fn` in one transaction, idempotently by `request.request_id` (AIP-155).

        Same caller + id + channel + request: the first answer again (errors included).
        Same id, another request or another channel: ALREADY_EXISTS / REQUEST_ID_REUSED.
        """
        return await self._mutate(request, lambda uow, claim: fn(uow), claim_in_fn=False)

    async def mutate_claiming(
        self,
        request: Message,
        fn: Callable[[UnitOfWork, idempotency.Claim | None], Awaitable[M]],
    ) -> M:
        """`mutate` for hot paths whose first statement makes the idempotency claim
        itself (idempotency.Claim; None when the request has no request_id): the
        same answers, one round trip less. One more when their last statement
        also stores the answer (`Claim.answers`)."""
        return await self._mutate(request, fn, claim_in_fn=True)

    async def _mutate(
        self,
        request: Message,
        fn: Callable[[UnitOfWork, idempotency.Claim | None], Awaitable[M]],
        *,
        claim_in_fn: bool,
    ) -> M:
        request_id: str = getattr(request, "request_id", "")
        method = current_method()
        if not request_id:

            async def unkeyed() -> M:
                async with self.uow() as uow:
                    result = await fn(uow, None)
                    await uow.commit()
                    return result

            return await retrying(unkeyed, what=method)
        claim = idempotency.Claim(
            current_caller().subject, request_id, method, request_digest(method, request)
        )
        return await retrying(lambda: self._mutate_keyed(claim, fn, claim_in_fn), what=method)

    async def _mutate_keyed(
        self,
        claim: idempotency.Claim,
        fn: Callable[[UnitOfWork, idempotency.Claim | None], Awaitable[M]],
        claim_in_fn: bool,
    ) -> M:
        method = claim.method
        claim.owned = claim.answer = None  # nothing of an earlier attempt
        async with self.uow() as uow:
            if claim_in_fn:
                owned = True  # or KeyTaken from fn's first statement
            else:
                owned = await idempotency.claim(uow.session, claim)
            if owned:
                try:
                    result = await fn(uow, claim if claim_in_fn else None)
                except idempotency.KeyTaken:
                    owned = False
                except DomainError as err:
                    failure = err
                else:
                    if claim_in_fn and claim.owned is not True:
                        raise RuntimeError(f"{method} did not make its idempotency claim")
                    body = result.SerializeToString()
                    if claim.answer is None:
                        await idempotency.store(uow.session, claim, 0, body)
                    elif claim.answer != body:
                        raise RuntimeError(f"{method} stored another answer than the one it returns")
                    await uow.commit()
                    return result
            if not owned:
                stored = await idempotency.get(uow.session, claim.key)
                return self.replay(stored, method, claim.request_hash)  # type: ignore[no-any-return]

        # The domain refused: the refusal is the answer for this request_id too.
        status = status_from_domain(failure)
        async with self.uow() as uow:
            if await idempotency.claim(
                uow.session, claim, status_code=status.code, response=status.SerializeToString()
            ):
                await uow.commit()
                raise failure
            stored = await idempotency.get(uow.session, claim.key)
        return self.replay(stored, method, claim.request_hash)  # type: ignore[no-any-return]

    def replay(self, stored: idempotency.StoredResponse, method: str, request_hash: bytes) -> Any:
        """The stored answer of an earlier call with the same key, decoded: the
        response message, or its error raised again; REQUEST_ID_REUSED when the
        key was used for another request (another body, method or channel)."""
        idempotency.check_replay(stored, request_hash)
        if stored.status_code:
            status = status_pb2.Status()
            status.ParseFromString(stored.response or b"")
            raise ReplayedStatus(status)
        response_type = self.response_types[method]  # the method's declared output type
        message = response_type()
        message.ParseFromString(stored.response or b"")
        return message

    async def temporal(self) -> Any:
        """The Temporal client, connected on first use."""
        if self._temporal is None:
            async with self._temporal_lock:
                if self._temporal is None:
                    from temporalio.client import Client

                    if not self.settings.temporal_address:
                        raise Unavailable("TEMPORAL_NOT_CONFIGURED", "TEMPORAL_ADDRESS is not set")
                    self._temporal = await Client.connect(
                        self.settings.temporal_address,
                        namespace=self.settings.temporal_namespace,
                        runtime=self.temporal_runtime,
                    )
        return self._temporal

    async def start_after_commit(self, start: Callable[[Any], Awaitable[object]], **context: str) -> bool:
        """Start the workflow of a record that just committed, waiting at most
        temporal_start_timeout_seconds; True when it started (or was running) now.

        When Temporal cannot be reached (down, slow, never connected), the caller's
        committed answer stands: the reconcilers (server/background.py) start the
        workflow once Temporal is back, and since every workflow id derives from its
        record, a start that did reach Temporal makes theirs a no-op. Without this
        bound a call would wait out the Temporal client's own retries (~6 s); while
        the health check (server/app.py) finds Temporal unreachable, no start is tried.
        """
        if not self.settings.temporal_address:
            log.warning("TEMPORAL_ADDRESS is not set: workflow not started", extra=context)
            return False
        if not self.temporal_reachable:
            log.info("Temporal is unreachable: the reconciler will start the workflow", extra=context)
            return False
        try:
            async with asyncio.timeout(self.settings.temporal_start_timeout_seconds):
                await start(await self.temporal())
        except DomainError:
            raise
        except Exception as exc:  # Temporal unreachable in any way: the reconciler's job now
            log.warning(
                "workflow not started now; the reconciler will start it",
                extra={**context, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
            return False
        return True

    async def close(self) -> None:
        await self.notifier.close()
        if self._read_pool is not None:
            await self._read_pool.close()
        await self.engine.dispose()
