"""OpenTelemetry tracing: one SERVER span per RPC. Off by default.

On when `ENTREPOT_OTEL` is 1/true/otlp/console, or when an OTLP endpoint is configured
(`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; the exporter reads
the standard OTEL_* variables: headers, protocol, service name via OTEL_SERVICE_NAME).
`ENTREPOT_OTEL=console` prints spans to stderr instead (local debugging).

It is the pipeline's outermost stage (server/interceptors.py; app.py adds it only when
enabled), so a span covers auth, channel resolution and the handler; an incoming W3C `traceparent` is continued.
Attributes follow the RPC semantic conventions (rpc.system, rpc.service, rpc.method,
rpc.grpc.status_code); the caller's subject is recorded, the token never is.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from server import context as ctx
from server.interceptors import Handler

ON = {"1", "true", "yes", "on", "otlp", "console"}


def enabled(env: Mapping[str, str] = os.environ) -> bool:
    if env.get("ENTREPOT_OTEL", "").strip().lower() in ON:
        return True
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def make_provider(
    exporter: SpanExporter | None = None, env: Mapping[str, str] = os.environ
) -> TracerProvider:
    """A provider with the configured exporter (or `exporter`, exported synchronously: tests)."""
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "entrepot")})
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif env.get("ENTREPOT_OTEL", "").strip().lower() == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class TracingStage:
    """The pipeline's outermost stage (server/interceptors.py) when tracing is on."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self.tracer = provider.get_tracer("entrepot.server")

    def unary(self, inner: Handler, name: str) -> Handler:
        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._span(context, name) as span:
                try:
                    result = await inner(request, context)
                except BaseException as exc:
                    self._failed(span, context, exc)
                    raise
                self._ok(span)
                return result

        return traced

    def stream(self, inner: Handler, name: str) -> Handler:
        async def traced(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with self._span(context, name) as span:
                sent = 0
                try:
                    async for item in inner(request, context):
                        sent += 1
                        yield item
                except BaseException as exc:
                    self._failed(span, context, exc)
                    raise
                finally:
                    span.set_attribute("rpc.messages_sent", sent)
                self._ok(span)

        return traced

    def _span(self, context: grpc.aio.ServicerContext, name: str) -> Any:
        service, _, rpc = name.strip("/").partition("/")
        carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        parent = propagate.extract(carrier)
        return self.tracer.start_as_current_span(
            f"{service}/{rpc}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc},
            record_exception=False,
            set_status_on_exception=False,
        )

    def _ok(self, span: trace.Span) -> None:
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
        self._caller(span)

    def _failed(self, span: trace.Span, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code = context.code()
        if isinstance(exc, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        # Server spans: only server-side faults are errors (OTel RPC conventions).
        if code in (
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DATA_LOSS,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNIMPLEMENTED,
        ):
            span.set_status(Status(StatusCode.ERROR, code.name))
        self._caller(span)

    def _caller(self, span: trace.Span) -> None:
        caller = ctx._caller.get()
        if caller is not None:
            span.set_attribute("enduser.id", caller.subject)
