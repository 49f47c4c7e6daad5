"""Server interceptors (grpc-interceptor's AsyncServerInterceptor), outermost first:
observability -> errors -> auth -> channel. The server runs them as one
StackInterceptor (same stages, one wrapper per method, no per-call re-wrapping).

Streaming responses are wrapped as async generators, never awaited whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import sqlalchemy.exc
from grpc_interceptor.server import AsyncServerInterceptor

from domain.shared.caller import ChannelRef
from domain.shared.db import RETRYABLE_SQLSTATES, connection_lost, sqlstate
from domain.shared.errors import DomainError, NotFound
from server import context as ctx
from server import metrics
from server.auth import AuthError, Policy, TokenVerifier
from server.errors import ReplayedStatus, build_status, status_from_domain, to_grpc_status
from server.logs import Throttled

log = logging.getLogger("entrepot.rpc")
# During a database outage every call fails the same way: one line per method per second.
_outage_log = Throttled(log)
access = logging.getLogger("entrepot.access")

Method = Callable[[Any, grpc.aio.ServicerContext], Any]


async def abort(context: grpc.aio.ServicerContext, status: Any) -> None:
    s = to_grpc_status(status)
    await context.abort(s.code, s.details, s.trailing_metadata)


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key] = value
    return out


async def _call(method: Method, request: Any, context: grpc.aio.ServicerContext, streaming: bool) -> Any:
    result = method(request, context)
    if streaming:
        if asyncio.iscoroutine(result):
            result = await result
        return result
    return await result


class ObservabilityInterceptor(AsyncServerInterceptor):
    """Metrics per method (count by code, latency, in flight) and a structured access log."""

    def __init__(self, policies: dict[str, Policy], access_log: bool) -> None:
        self.policies = policies
        self.access_log = access_log

    async def intercept(
        self, method: Method, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> Any:
        streaming = _streams(self.policies, name)
        m = metrics.for_method(name, streaming)
        if streaming:
            return self._stream(method, request, context, name, m)
        m.in_flight.inc()
        start = time.perf_counter()
        code = "OK"
        try:
            return await _call(method, request, context, False)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            c = context.code()
            code = c.name if isinstance(c, grpc.StatusCode) else "UNKNOWN"
            raise
        finally:
            self._done(m, name, start, code, context)

    async def _stream(
        self,
        method: Method,
        request: Any,
        context: grpc.aio.ServicerContext,
        name: str,
        m: metrics.MethodMetrics,
    ) -> AsyncIterator[Any]:
        m.in_flight.inc()
        start = time.perf_counter()
        code = "OK"
        try:
            async for item in await _call(method, request, context, True):
                yield item
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            c = context.code()
            code = c.name if isinstance(c, grpc.StatusCode) else "UNKNOWN"
            raise
        finally:
            self._done(m, name, start, code, context)

    def _done(self, m: metrics.MethodMetrics, name: str, start: float, code: str, context: Any) -> None:
        elapsed = time.perf_counter() - start
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


class ErrorInterceptor(AsyncServerInterceptor):
    """Domain errors -> status + ErrorInfo (+ BadRequest / PreconditionFailure).
    Database outages -> UNAVAILABLE. Anything unexpected -> INTERNAL with a
    correlation id that is also logged with the stack."""

    def __init__(self, policies: dict[str, Policy]) -> None:
        self.policies = policies

    async def intercept(
        self, method: Method, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> Any:
        if _streams(self.policies, name):
            return self._stream(method, request, context, name)
        try:
            return await _call(method, request, context, False)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await self._handle(exc, context, name)

    async def _stream(
        self, method: Method, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> AsyncIterator[Any]:
        try:
            async for item in await _call(method, request, context, True):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await self._handle(exc, context, name)

    async def _handle(self, exc: Exception, context: grpc.aio.ServicerContext, name: str) -> None:
        if isinstance(exc, DomainError):
            await abort(context, status_from_domain(exc))
        if isinstance(exc, ReplayedStatus):
            await abort(context, exc.status)
        if isinstance(exc, NotImplementedError):
            # The generated base servicer raises it for a method no one implemented yet.
            await abort(
                context,
                build_status(
                    grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED", f"{name} is not implemented yet"
                ),
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


class AuthInterceptor(AsyncServerInterceptor):
    """Bearer JWT -> Caller; the method's declared permission must be in the token."""

    def __init__(self, policies: dict[str, Policy], verifier: TokenVerifier) -> None:
        self.policies = policies
        self.verifier = verifier

    async def intercept(
        self, method: Method, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> Any:
        policy = self.policies.get(name)
        if policy is None:  # health and reflection: not ours, no token needed
            return await _call(method, request, context, _streams(self.policies, name))
        md = _metadata(context)
        await self.authorize(md.get("authorization", ""), context, name, policy)
        return await _call(method, request, context, policy.server_streaming)

    async def authorize(
        self, header: str, context: grpc.aio.ServicerContext, name: str, policy: Policy
    ) -> None:
        """The auth stage: verifies the bearer token, checks the permission and binds the
        caller and method to the call's context; aborts the call otherwise."""
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


def _streams(policies: dict[str, Policy], name: str) -> bool:
    policy = policies.get(name)
    if policy is not None:
        return policy.server_streaming
    # Not ours: health's Watch and reflection's ServerReflectionInfo stream.
    return name.endswith("/Watch") or name.endswith("/ServerReflectionInfo")


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


class ChannelInterceptor(AsyncServerInterceptor):
    """`x-channel-slug` must name an active channel the token lists."""

    def __init__(self, policies: dict[str, Policy], channels: ChannelCache) -> None:
        self.policies = policies
        self.channels = channels

    async def intercept(
        self, method: Method, request: Any, context: grpc.aio.ServicerContext, name: str
    ) -> Any:
        policy = self.policies.get(name)
        if policy is None:
            return await _call(method, request, context, _streams(self.policies, name))
        slug = ""
        for key, value in context.invocation_metadata() or ():
            if key == "x-channel-slug":
                slug = str(value)
                break
        await self.bind(slug, context, policy)
        return await _call(method, request, context, policy.server_streaming)

    async def bind(self, slug: str, context: grpc.aio.ServicerContext, policy: Policy) -> None:
        """The channel stage: binds the call's channel (or none); aborts the call when the
        channel is not allowed, unknown, inactive, or required and missing."""
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
                ref = await self.channels.get(slug)
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


_FACTORIES: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class StackInterceptor(grpc.aio.ServerInterceptor):
    """The four stages above (observability -> errors -> auth -> channel) as ONE
    interceptor: the stages run as plain function calls inside one wrapper, the
    metadata is read once, and the wrapped handler is built once per method (the
    separate interceptors each re-wrap the handler and add a coroutine layer per
    call). Same behaviour as listing the four classes in that order; other
    interceptors (before or after it in the server's list) compose as usual."""

    def __init__(
        self,
        observability: ObservabilityInterceptor,
        errors: ErrorInterceptor,
        auth: AuthInterceptor,
        channel: ChannelInterceptor,
    ) -> None:
        self.observability = observability
        self.errors = errors
        self.auth = auth
        self.channel = channel
        self.policies = auth.policies
        # method name -> (handler we wrapped, wrapper); reused while the inner handler is the same.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

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

    def _wrap(self, handler: grpc.RpcMethodHandler, name: str) -> grpc.RpcMethodHandler:
        found = [(f, getattr(handler, k)) for k, f in _FACTORIES.items() if getattr(handler, k) is not None]
        if not found:  # pragma: no cover - grpc never hands out an empty handler
            raise RuntimeError(f"no implementation for {name}")
        factory, inner = found[0]
        streaming = bool(handler.response_streaming)
        m = metrics.for_method(name, streaming)
        policy = self.policies.get(name)
        done = self.observability._done
        handle = self.errors._handle

        async def admit(context: grpc.aio.ServicerContext) -> None:
            if policy is None:  # health and reflection: not ours, no token needed
                return
            # One pass over the metadata for both stages (last authorization wins and
            # the first x-channel-slug, as in the separate interceptors).
            header = ""
            slug: str | None = None
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    if isinstance(value, str):
                        header = value
                elif key == "x-channel-slug" and slug is None:
                    slug = str(value)
            await self.auth.authorize(header, context, name, policy)
            await self.channel.bind(slug or "", context, policy)

        def code_of(context: grpc.aio.ServicerContext) -> str:
            c = context.code()
            return c.name if isinstance(c, grpc.StatusCode) else "UNKNOWN"

        if streaming:

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                m.in_flight.inc()
                start = time.perf_counter()
                code = "OK"
                try:
                    try:
                        await admit(context)
                        result = inner(request, context)
                        if asyncio.iscoroutine(result):
                            result = await result
                        if result is not None:
                            async for item in result:
                                yield item
                    except (asyncio.CancelledError, grpc.aio.AbortError):
                        raise
                    except Exception as exc:
                        await handle(exc, context, name)
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except BaseException:
                    code = code_of(context)
                    raise
                finally:
                    done(m, name, start, code, context)

            return factory(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            m.in_flight.inc()
            start = time.perf_counter()
            code = "OK"
            try:
                try:
                    await admit(context)
                    return await inner(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await handle(exc, context, name)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except BaseException:
                code = code_of(context)
                raise
            finally:
                done(m, name, start, code, context)

        return factory(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
