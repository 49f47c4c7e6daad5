"""OpenTelemetry tracing (server/tracing.py): off by default; when on, one SERVER span per
RPC, unary and streaming, with the gRPC status and a continued W3C trace context."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from grpc_health.v1 import health_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client import Entrepot, InvalidArgumentError, NotFoundError
from server import tracing
from server.app import App
from tests.conftest import make_settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
async def traced(database_url: str) -> AsyncIterator[tuple[App, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    app = App(make_settings(database_url, None), tracer_provider=tracing.make_provider(exporter))
    await app.start()
    try:
        yield app, exporter
    finally:
        await app.stop(grace=1.0)


def test_tracing_is_off_unless_configured() -> None:
    assert not tracing.enabled({})
    assert not tracing.enabled({"ENTREPOT_OTEL": "0"})
    assert tracing.enabled({"ENTREPOT_OTEL": "1"})
    assert tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})


async def test_default_app_has_no_tracing(app: App) -> None:
    assert app.tracer_provider is None
    assert app.pipeline is not None
    assert app.pipeline.stages == ["metrics", "errors", "auth", "channel", "text"]


async def test_tracing_is_the_outermost_stage_of_the_one_pipeline(
    traced: tuple[App, InMemorySpanExporter],
) -> None:
    pipeline = traced[0].pipeline
    assert pipeline is not None
    assert pipeline.stages == ["tracing", "metrics", "errors", "auth", "channel", "text"]


async def test_one_server_span_per_rpc(
    traced: tuple[App, InMemorySpanExporter], make_token: Callable[..., str]
) -> None:
    app, exporter = traced
    exporter.clear()
    target = f"127.0.0.1:{app.port}"
    async with Entrepot(target, make_token(sub="tracer")) as ep:
        await ep.inventory.list_warehouses(
            pb.ListWarehousesRequest(page_size=1),
            metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT}-01")],
        )
        with pytest.raises(NotFoundError):
            await ep.inventory.get_warehouse(pb.GetWarehouseRequest(code="NOPE-TRACE"))
        health = ep.grpc_channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        await health(health_pb2.HealthCheckRequest())

    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == [
        "entrepot.inventory.v1.InventoryService/ListWarehouses",
        "entrepot.inventory.v1.InventoryService/GetWarehouse",
        "grpc.health.v1.Health/Check",
    ]
    listed, missing, checked = spans
    assert all(s.kind == SpanKind.SERVER for s in spans)
    assert listed.attributes is not None and missing.attributes is not None
    assert listed.attributes["rpc.system"] == "grpc"
    assert listed.attributes["rpc.method"] == "ListWarehouses"
    assert listed.attributes["rpc.grpc.status_code"] == 0
    assert listed.attributes["enduser.id"] == "tracer"
    # The caller's trace is continued.
    assert f"{listed.context.trace_id:032x}" == TRACE_ID
    assert listed.parent is not None and f"{listed.parent.span_id:016x}" == PARENT
    assert missing.parent is None or f"{missing.context.trace_id:032x}" != TRACE_ID
    # NOT_FOUND is the caller's problem: recorded, not marked as a server error.
    assert missing.attributes["rpc.grpc.status_code"] == 5
    assert missing.status.status_code != StatusCode.ERROR
    assert checked.attributes is not None and checked.attributes["rpc.service"] == "grpc.health.v1.Health"


async def test_server_stream_gets_one_span_when_it_ends(
    traced: tuple[App, InMemorySpanExporter], make_token: Callable[..., str]
) -> None:
    app, exporter = traced
    exporter.clear()
    async with Entrepot(f"127.0.0.1:{app.port}", make_token(sub="tracer")) as ep:
        with pytest.raises(InvalidArgumentError):  # UNKNOWN_CURSOR
            async for _ in ep.inventory.watch_stock_changes(
                pb.WatchStockChangesRequest(after_event_id=10**12)
            ):
                pass
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["entrepot.inventory.v1.InventoryService/WatchStockChanges"]
    assert spans[0].attributes is not None
    assert spans[0].attributes["rpc.grpc.status_code"] == 3
    assert spans[0].attributes["rpc.messages_sent"] == 0
