"""The gRPC application: services, interceptors, health, reflection, limits, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy import text

from domain.platform import channels
from domain.shared.caller import ChannelRef
from server import background, reflection, relay
from server.auth import TokenVerifier, policies_for
from server.interceptors import Auth, ChannelCache, Channels, Guard, Metrics, Pipeline
from server.ratelimit import RateLimit, parse_rate_limits
from server.runtime import Runtime
from server.services import SERVICES
from server.settings import Settings
from server.tls import CLIENT_CERT, server_credentials, tls_enabled

log = logging.getLogger("entrepot.server")

DATABASE_HEALTH = "entrepot.database"
TEMPORAL_HEALTH = "entrepot.temporal"
RELAY_HEALTH = "entrepot.relay"


def server_options(s: Settings) -> list[tuple[str, int]]:
    opts = [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        # gRPC refuses headers between its soft and hard limit at random (a hard limit of
        # 1.25x the soft one when only the soft is set), and at the hard limit itself; both
        # one past the setting make it exact: a header list of more than max_metadata_bytes
        # (each entry counted as name + value + 32, pseudo-headers included) is refused
        # every time, anything else accepted (tests/reliability/test_metadata_limit.py).
        ("grpc.max_metadata_size", s.max_metadata_bytes + 1),
        ("grpc.absolute_max_metadata_size", s.max_metadata_bytes + 1),
        ("grpc.max_concurrent_streams", s.max_concurrent_streams),
        # Calls that arrived and that the server has not taken yet: gRPC cancels them past
        # 1,000 at random and past 3,000 always (CANCELLED before any message), and the
        # server takes one call per turn of its event loop. A burst of calls the
        # concurrency limit admits (a fleet of watchers opening or reconnecting at once)
        # must wait its turn instead (tests/reliability/test_watch_fleet.py).
        ("grpc.server.max_pending_requests", s.max_concurrent_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", s.max_concurrent_rpcs),
        ("grpc.keepalive_time_ms", s.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", s.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_idle_ms", s.max_connection_idle_ms),
        ("grpc.so_reuseport", 0),
    ]
    if s.max_connection_age_ms:
        opts += [
            ("grpc.max_connection_age_ms", s.max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", 30_000),
        ]
    return opts


class GenericRegistration:
    """The server as the generated `add_*Servicer_to_server` functions see it: each one's
    generic handler is added, its per-method registration is left out.

    grpc.aio keeps one pending call request per registered method and, for every call it
    accepts, waits on all of them at once (`asyncio.wait` in its main loop): with our ~95
    methods that was a sixth to a quarter of the server's CPU per call (docs/performance.md,
    "What changed", 2026-12-08). A generic handler is found by a dictionary lookup, and the
    main loop then waits on one request only."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """Left out on purpose (the class docstring): the same handlers are already served
        through the service's generic handler."""


def _tracing_wanted() -> bool:
    """Cheap pre-check so OpenTelemetry is not even imported unless configured (server/tracing.py)."""
    keys = ("ENTREPOT_OTEL", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return any(os.environ.get(k) for k in keys)


class App:
    def __init__(self, settings: Settings, rt: Runtime | None = None, tracer_provider: Any = None) -> None:
        self.settings = settings
        # OpenTelemetry TracerProvider: given (tests) or built from the environment in start().
        self.tracer_provider = tracer_provider
        self.rt = rt or Runtime(settings)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        descriptors = [spec.descriptor for spec in SERVICES]
        # Default deny: refuses to build when any RPC lacks its permission option.
        self.policies = policies_for(descriptors)
        for d in descriptors:
            for m in d.methods:
                self.rt.response_types[f"/{d.full_name}/{m.name}"] = message_factory.GetMessageClass(
                    m.output_type
                )
        self.verifier = TokenVerifier(settings)
        self.channel_cache = ChannelCache(self._load_channel, settings.channel_cache_seconds)
        self.rt.on_channel_changed = self.channel_cache.invalidate
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.pipeline: Pipeline | None = None  # built by start()
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def _load_channel(self, slug: str) -> ChannelRef:
        channel = await self.rt.read(lambda s: channels.get_channel(s, slug))
        return channel.ref()

    async def start(self) -> int:
        s = self.settings
        self.pipeline = self._pipeline()
        server = grpc.aio.server(
            interceptors=[self.pipeline],
            options=server_options(s),
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
        )
        names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        registration = GenericRegistration(server)
        for spec in SERVICES:
            spec.add_to_server(spec.make(self.rt), registration)
            names.append(spec.descriptor.full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registration)
        reflection.enable(registration, names)
        if tls_enabled(s):
            self.port = server.add_secure_port(s.listen, server_credentials(s))
        else:
            self.port = server.add_insecure_port(s.listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {s.listen}")
        await server.start()
        self.server = server
        await self._check_health()
        self._tasks.append(asyncio.create_task(self._health_loop(), name="health"))
        for job in background.JOBS:
            self._tasks.append(
                asyncio.create_task(job(self.rt, self.holder), name=getattr(job, "__name__", "job"))
            )
        log.info("serving", extra={"listen": s.listen, "port": self.port})
        return self.port

    def _pipeline(self) -> Pipeline:
        """The one interceptor pipeline (server/interceptors.py) with the stages this
        configuration asks for: TLS identity with a client CA, rate limits when set,
        tracing when configured (server/tls.py, server/ratelimit.py, server/tracing.py)."""
        s = self.settings
        guards: list[Guard] = []
        if s.tls_client_ca_file:
            guards.append(CLIENT_CERT)
        limits = parse_rate_limits(s.rate_limits)
        if limits:
            unknown = sorted(k for k in limits if not k.endswith("/*") and k not in self.policies)
            if unknown:
                log.warning("rate limits name methods that are not served", extra={"methods": unknown})
            guards.append(RateLimit(limits).guard())
        if self.tracer_provider is None and _tracing_wanted():
            from server import tracing

            if tracing.enabled():
                self.tracer_provider = tracing.make_provider()
        tracing_stage = None
        if self.tracer_provider is not None:
            from server.tracing import TracingStage

            tracing_stage = TracingStage(self.tracer_provider)
        text_checked = [
            f"/{spec.descriptor.full_name}/{m.name}"
            for spec in SERVICES
            if spec.checks_text
            for m in spec.descriptor.methods
        ]
        return Pipeline(
            self.policies,
            metrics=Metrics(s.access_log),
            auth=Auth(self.verifier),
            channels=Channels(self.channel_cache),
            guards=guards,
            text_checked=text_checked,
            tracing=tracing_stage,
        )

    async def _check_health(self) -> None:
        if self._stopping:
            return
        db_ok = False
        try:
            async with asyncio.timeout(2.0), self.rt.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            db_ok = True
        except Exception as exc:  # any failure means "not reachable"; logged, never swallowed silently
            log.warning("database health check failed", extra={"error": type(exc).__name__})
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        db_status = serving if db_ok else not_serving
        await self.health.set(DATABASE_HEALTH, db_status)
        await self.health.set("", db_status)
        for spec in SERVICES:
            await self.health.set(spec.descriptor.full_name, db_status)
        if self.settings.temporal_address:
            host, _, port = self.settings.temporal_address.rpartition(":")
            try:
                async with asyncio.timeout(2.0):
                    _, writer = await asyncio.open_connection(host or "127.0.0.1", int(port))
                    writer.close()
                self.rt.temporal_reachable = True
                await self.health.set(TEMPORAL_HEALTH, serving)
            except (OSError, TimeoutError, ValueError):
                # RPCs then leave their workflow starts to the reconcilers (Runtime.start_after_commit).
                self.rt.temporal_reachable = False
                await self.health.set(TEMPORAL_HEALTH, not_serving)
        if relay.relay_name(self.settings) is not None:
            await self._check_relay()

    async def _check_relay(self) -> None:
        """entrepot.relay: SERVING while the oldest unpublished event has waited at most
        relay_max_lag_seconds (the lag gauges are set on the way)."""
        try:
            async with asyncio.timeout(2.0):
                found = await relay.backlog(self.rt)
        except Exception as exc:  # unknown lag: reported as not serving, and logged
            log.warning("relay lag check failed", extra={"error": type(exc).__name__})
            found = None
        lagging = found is None or found.seconds > self.settings.relay_max_lag_seconds
        status = (
            health_pb2.HealthCheckResponse.NOT_SERVING if lagging else health_pb2.HealthCheckResponse.SERVING
        )
        await self.health.set(RELAY_HEALTH, status)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._check_health()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: report NOT_SERVING, refuse new calls, let in-flight calls finish, then stop."""
        if self._stopping:
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(self.settings.shutdown_delay_seconds)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.server is not None:
            await self.server.stop(self.settings.grace_seconds if grace is None else grace)
        await self.rt.close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()  # flushes spans still in the batch processor
        log.info("stopped")

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()


async def serve(settings: Settings) -> None:
    app = App(settings)
    await app.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining")
    await app.stop()
