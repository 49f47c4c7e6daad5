"""The server's one interceptor pipeline.

`Pipeline` is the only interceptor the server installs. For each method it builds one
wrapper, once, that runs these stages in this order (outermost first):

    tracing       optional (server/tracing.py): one SERVER span around everything below
    metrics       count by code, latency, in flight; the access log
    errors        domain errors, SQLSTATEs and anything unexpected -> status + details
    auth          bearer JWT -> Caller; the method's declared permission
    guards        optional, in order: TLS identity (server/tls.py, with mTLS) and
                  per-principal rate limits (server/ratelimit.py)
    channel       `x-channel-slug` -> the call's ChannelRef
    text          per service: no NUL character in any text field of the request
    handler       the servicer method

An optional stage that is not configured is not part of the wrapper at all, so the
default hot path pays nothing for it. Health and reflection (methods without a
declared policy) get metrics, errors and tracing, never auth, guards, channel or text.
Streaming responses are wrapped as async generators, never awaited whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import asyncpg
import grpc
import sqlalchemy.exc
from google.protobuf.message import Message

from domain.shared.caller import ChannelRef
from domain.shared.db import RETRYABLE_SQLSTATES, connection_lost, sqlstate
from domain.shared.errors import DomainError, InvalidArgument, NotFound
from server import context as ctx
from server import metrics
from server.auth import AuthError, Policy, TokenVerifier
from server.errors import ReplayedStatus, abort, build_status, status_from_domain
from server.logs import Throttled

log = logging.getLogger("entrepot.rpc")
# During a database outage every call fails the same way: one line per method per second.
_outage_log = Throttled(log)
access = logging.getLogger("entrepot.access")

Handler = Callable[[Any, grpc.aio.ServicerContext], Any]


# ------------------------------------------------------------------ metrics


class Metrics:
    """The metrics stage: metrics per method (count by code, latency, in flight) and a
    structured access log."""

    def __init__(self, access_log: bool) -> None:
        self.access_log = access_log

    def done(
        self, m: metrics.MethodMetrics, name: str, start: float, failure: BaseException | None, context: Any
    ) -> None:
        """Counts the call by its code: OK, CANCELLED, or the status it ended with."""
        elapsed = time.perf_counter() - start
        if failure is None:
            code = "OK"
        elif isinstance(failure, asyncio.CancelledError):
            code = "CANCELLED"
        else:
            c = context.code()
            code = c.name if isinstance(c, grpc.StatusCode) else "UNKNOWN"
        m.in_flight.dec()
        m.latency.observe(elapsed)
        m.count(code)
        if self.access_log:
            caller = ctx._caller.get()
            access.info(
                "rpc",
                extra={
                    "method": name,
                    "code": code,
                    "ms": round(elapsed * 1000, 3),
                    "sub": caller.subject if caller else None,
                    "peer": context.peer(),
                },
            )


# ------------------------------------------------------------------ errors

# Shutting down, crashed, starting up; too many connections (class 08 is added below).
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})


def _transient_db_error(exc: BaseException) -> bool:
    # connection_lost covers OSError, and with it asyncio.TimeoutError (connect timeouts).
    if isinstance(exc, sqlalchemy.exc.TimeoutError) or connection_lost(exc):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    state = sqlstate(exc) or ""
    return state.startswith("08") or state in _UNAVAILABLE_SQLSTATES


async def handle_error(exc: Exception, context: grpc.aio.ServicerContext, name: str) -> None:
    """The errors stage. Domain errors -> status + ErrorInfo (+ BadRequest /
    PreconditionFailure). Database outages -> UNAVAILABLE. Anything unexpected ->
    INTERNAL with a correlation id that is also logged with the stack. Always aborts."""
    if isinstance(exc, DomainError):
        await abort(context, status_from_domain(exc))
    if isinstance(exc, ReplayedStatus):
        await abort(context, exc.status)
    if isinstance(exc, NotImplementedError):
        # The generated base servicer raises it for a method no one implemented yet.
        await abort(
            context,
            build_status(grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED", f"{name} is not implemented yet"),
        )
    state = sqlstate(exc)
    if state in RETRYABLE_SQLSTATES:
        await abort(
            context,
            build_status(
                grpc.StatusCode.ABORTED, "CONCURRENT_UPDATE", "a concurrent update conflicted; retry"
            ),
        )
    if state == "57014":
        await abort(
            context,
            build_status(
                grpc.StatusCode.DEADLINE_EXCEEDED, "STATEMENT_TIMEOUT", "the database took too long"
            ),
        )
    if (state and state.startswith("22")) or isinstance(
        exc, (sqlalchemy.exc.DataError, asyncpg.exceptions.DataError)
    ):
        # SQLSTATE class 22 (NUL in text, out-of-range number, ...): the request carried a
        # value the database cannot hold. The caller's fault, not ours; found by the fuzzer.
        await abort(
            context,
            build_status(
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_VALUE",
                "the request contains a value that cannot be stored (NUL character, number out of range, ...)",
                {"sqlstate": state or ""},
            ),
        )
    if _transient_db_error(exc):
        _outage_log.warning(name, "database unavailable", {"method": name, "error": type(exc).__name__})
        await abort(
            context,
            build_status(
                grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", "the database is unavailable; retry"
            ),
        )
    correlation_id = uuid.uuid4().hex
    log.error("unexpected error", exc_info=exc, extra={"method": name, "correlation_id": correlation_id})
    await abort(
        context,
        build_status(
            grpc.StatusCode.INTERNAL,
            "INTERNAL",
            f"internal error (correlation id {correlation_id})",
            {"correlation_id": correlation_id},
        ),
    )


# ------------------------------------------------------------------ auth


class Auth:
    """The auth stage: bearer JWT -> Caller; the method's declared permission must be in the token."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self.verifier = verifier

    async def authorize(
        self, header: str, context: grpc.aio.ServicerContext, name: str, policy: Policy
    ) -> None:
        """Verifies the bearer token, checks the permission and binds the caller and method
        to the call's context; aborts the call otherwise."""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            await abort(
                context,
                build_status(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "TOKEN_MISSING",
                    "authorization: Bearer <jwt> is required",
                ),
            )
        try:
            caller = self.verifier.verify(token.strip())
        except AuthError as err:
            await abort(context, build_status(grpc.StatusCode.UNAUTHENTICATED, err.reason, err.message))
            raise  # unreachable: abort raises
        if not caller.has(policy.permission):
            await abort(
                context,
                build_status(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "PERMISSION_MISSING",
                    f"this call needs permission {policy.permission!r}",
                    {"permission": policy.permission},
                ),
            )
        ctx._caller.set(caller)
        ctx._method.set(name)


# ------------------------------------------------------------------ guards


@dataclass(frozen=True)
class Guard:
    """An optional stage between auth and channel (it may read the caller). `check`
    returns when the call may proceed and aborts it otherwise."""

    name: str
    check: Callable[[grpc.aio.ServicerContext, str], Awaitable[None]]


# ------------------------------------------------------------------ channel

ChannelLoader = Callable[[str], Awaitable[ChannelRef]]


class ChannelCache:
    """Resolves channel slugs with a short TTL; other replicas see updates within the TTL."""

    def __init__(self, loader: ChannelLoader, ttl: float) -> None:
        self.loader = loader
        self.ttl = ttl
        self._cache: dict[str, tuple[ChannelRef, float]] = {}

    async def get(self, slug: str) -> ChannelRef:
        hit = self._cache.get(slug)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        ref = await self.loader(slug)
        self._cache[slug] = (ref, now + self.ttl)
        return ref

    def invalidate(self, slug: str) -> None:
        self._cache.pop(slug, None)


class Channels:
    """The channel stage: `x-channel-slug` must name an active channel the token lists."""

    def __init__(self, cache: ChannelCache) -> None:
        self.cache = cache

    async def bind(self, slug: str, context: grpc.aio.ServicerContext, policy: Policy) -> None:
        """Binds the call's channel (or none); aborts the call when the channel is not
        allowed, unknown, inactive, or required and missing."""
        if slug:
            caller = ctx.current_caller()
            if not caller.may_use_channel(slug):
                await abort(
                    context,
                    build_status(
                        grpc.StatusCode.PERMISSION_DENIED,
                        "CHANNEL_NOT_ALLOWED",
                        f"the token does not allow channel {slug!r}",
                        {"channel": slug},
                    ),
                )
            try:
                ref = await self.cache.get(slug)
            except NotFound as err:
                await abort(context, status_from_domain(err))
                raise
            if not ref.active:
                await abort(
                    context,
                    build_status(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        "CHANNEL_INACTIVE",
                        f"channel {slug!r} is not active",
                        {"channel": slug},
                    ),
                )
            ctx._channel.set(ref)
        elif policy.channel_required:
            await abort(
                context,
                build_status(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "CHANNEL_REQUIRED",
                    "this call needs the x-channel-slug metadata",
                    field_violations=[("metadata.x-channel-slug", "required")],
                ),
            )
        else:
            ctx._channel.set(None)


# ------------------------------------------------------------------ text


def check_text(message: Message, path: str = "") -> None:
    """The text stage: PostgreSQL text cannot hold NUL, so a request carrying one is refused
    as bad input (INVALID_TEXT, naming the field) before it reaches the database. Client
    streams call it on their own messages (see UploadRegistrationDocument)."""
    for fd, value in message.ListFields():
        name = f"{path}{fd.name}"
        if fd.type == fd.TYPE_STRING:
            values = value if fd.is_repeated else [value]
            if any("\x00" in v for v in values):
                raise InvalidArgument(
                    "INVALID_TEXT", f"{name} contains a NUL character", metadata={"field": name}
                )
        elif fd.type == fd.TYPE_MESSAGE:
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                for k, v in value.items():
                    if "\x00" in str(k):
                        raise InvalidArgument("INVALID_TEXT", f"{name} has a key with a NUL character")
                    if isinstance(v, Message):
                        check_text(v, f"{name}[{k}].")
            else:
                for item in value if fd.is_repeated else [value]:
                    check_text(item, f"{name}.")


# ------------------------------------------------------------------ the pipeline


class Tracing(Protocol):
    """The tracing stage (server/tracing.py): wraps the rest of the pipeline for a method."""

    def unary(self, inner: Handler, name: str) -> Handler: ...

    def stream(self, inner: Handler, name: str) -> Handler: ...


_FACTORIES: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _unanswered(exc: BaseException) -> TypeGuard[Exception]:
    """An error the errors stage must turn into a status: not a cancellation (or another
    BaseException such as an async generator's close) and not a status already set (abort)."""
    return isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError)


class Pipeline(grpc.aio.ServerInterceptor):
    """The stages of the module docstring as one interceptor: they run as plain function
    calls inside one wrapper per method, the metadata is read once, and the wrapper is
    built once per method (not per call)."""

    def __init__(
        self,
        policies: dict[str, Policy],
        *,
        metrics: Metrics,
        auth: Auth,
        channels: Channels,
        guards: Sequence[Guard] = (),
        text_checked: Collection[str] = (),
        tracing: Tracing | None = None,
    ) -> None:
        self.policies = policies
        self.metrics = metrics
        self.auth = auth
        self.channels = channels
        self.guards = tuple(guards)
        # Methods ('/pkg.Service/Method', unary requests) whose request the text stage checks.
        self.text_checked = frozenset(text_checked)
        self.tracing = tracing
        # method name -> (handler we wrapped, wrapper); reused while the inner handler is the same.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    @property
    def stages(self) -> list[str]:
        """The stages every served method goes through, outermost first (text: per method)."""
        names = ["tracing"] if self.tracing is not None else []
        names += ["metrics", "errors", "auth", *(g.name for g in self.guards), "channel"]
        return [*names, "text"] if self.text_checked else names

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        name: str = handler_call_details.method  # type: ignore[attr-defined]
        hit = self._wrapped.get(name)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = self._wrap(handler, name)
        self._wrapped[name] = (handler, wrapped)
        return wrapped

    def _admission(self, name: str) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]] | None:
        """auth -> guards -> channel -> text for one method; None for methods without a
        policy (health and reflection: not ours, no token needed)."""
        policy = self.policies.get(name)
        if policy is None:
            return None
        authorize = self.auth.authorize
        bind = self.channels.bind
        guards = tuple(g.check for g in self.guards)
        text = name in self.text_checked and not policy.client_streaming

        async def admit(request: Any, context: grpc.aio.ServicerContext) -> None:
            # One pass over the metadata for auth and channel: the last authorization
            # wins, the first x-channel-slug does.
            header = ""
            slug: str | None = None
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    if isinstance(value, str):
                        header = value
                elif key == "x-channel-slug" and slug is None:
                    slug = str(value)
            await authorize(header, context, name, policy)
            for check in guards:
                await check(context, name)
            await bind(slug or "", context, policy)
            if text:
                check_text(request)

        return admit

    def _wrap(self, handler: grpc.RpcMethodHandler, name: str) -> grpc.RpcMethodHandler:
        found = [(f, getattr(handler, k)) for k, f in _FACTORIES.items() if getattr(handler, k) is not None]
        if not found:  # pragma: no cover - grpc never hands out an empty handler
            raise RuntimeError(f"no implementation for {name}")
        factory, inner = found[0]
        wrapper = (self._stream if handler.response_streaming else self._unary)(inner, name)
        if self.tracing is not None:
            wrap = self.tracing.stream if handler.response_streaming else self.tracing.unary
            wrapper = wrap(wrapper, name)
        return factory(
            wrapper,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, inner: Handler, name: str) -> Handler:
        m = metrics.for_method(name, streaming=False)
        done = self.metrics.done
        admit = self._admission(name)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            m.in_flight.inc()
            start = time.perf_counter()
            failure: BaseException | None = None
            try:
                if admit is not None:
                    await admit(request, context)
                return await inner(request, context)
            except BaseException as exc:
                failure = exc
                if _unanswered(exc):
                    await handle_error(exc, context, name)  # aborts: the call ends with that status
                raise
            finally:
                done(m, name, start, failure, context)

        return unary

    def _stream(self, inner: Handler, name: str) -> Handler:
        m = metrics.for_method(name, streaming=True)
        done = self.metrics.done
        admit = self._admission(name)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            m.in_flight.inc()
            start = time.perf_counter()
            failure: BaseException | None = None
            try:
                if admit is not None:
                    await admit(request, context)
                result = inner(request, context)
                if asyncio.iscoroutine(result):
                    result = await result
                if result is not None:
                    async for item in result:
                        yield item
            except BaseException as exc:
                failure = exc
                if _unanswered(exc):
                    await handle_error(exc, context, name)
                raise
            finally:
                done(m, name, start, failure, context)

        return stream
