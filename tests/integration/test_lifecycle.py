"""Server lifecycle: graceful drain on stop/SIGTERM, startup refusal, metrics."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from entrepot.inventory.v1 import inventory_pb2
from entrepot.platform.v1 import channel_pb2
from entrepot_client import Entrepot
from server.app import App
from server.auth import UndeclaredPermission, policies_for
from server.devservices import free_port
from tests.conftest import make_settings, unique
from tests.procs import ServerProcess


def test_a_method_without_permission_option_refuses_startup() -> None:
    fd = descriptor_pb2.FileDescriptorProto(name="undeclared.proto", package="x.v1", syntax="proto3")
    fd.message_type.add(name="Req")
    svc = fd.service.add(name="LeakyService")
    svc.method.add(name="Leak", input_type=".x.v1.Req", output_type=".x.v1.Req")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    with pytest.raises(UndeclaredPermission, match=r"/x\.v1\.LeakyService/Leak"):
        policies_for([pool.FindServiceByName("x.v1.LeakyService")])


async def test_stop_reports_not_serving_and_drains_in_flight_calls(
    database_url: str, make_token, sessions, test_channel: str
) -> None:
    app = App(make_settings(database_url, None, shutdown_delay_seconds=1.5))
    await app.start()
    target = f"127.0.0.1:{app.port}"
    slug = unique("drain")
    async with Entrepot(target, make_token()) as ep:
        await ep.channel.create_channel(
            channel_pb2.CreateChannelRequest(channel=channel_pb2.Channel(slug=slug, name="A", currency="EUR"))
        )
        # Hold the channel's row lock so an update is in flight when the stop begins.
        async with sessions() as s, s.begin():
            await s.execute(text("SELECT 1 FROM platform.channels WHERE slug = :s FOR UPDATE"), {"s": slug})
            in_flight = asyncio.create_task(
                ep.channel.update_channel(
                    channel_pb2.UpdateChannelRequest(
                        channel=channel_pb2.Channel(slug=slug, name="B"), update_mask={"paths": ["name"]}
                    )
                )
            )
            await asyncio.sleep(0.3)
            stopping = asyncio.create_task(app.stop(grace=10))
            await asyncio.sleep(0.5)
            async with grpc.aio.insecure_channel(target) as ch:
                health = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not in_flight.done()
        # Lock released: the in-flight call completes before the server stops.
        updated = await in_flight
        assert updated.name == "B"
        await stopping


def test_sigterm_drains_and_exits_zero(database_url: str) -> None:
    with ServerProcess(database_url) as server:
        started = time.monotonic()
        assert server.terminate() == 0
        assert time.monotonic() - started < 10


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed: (sample name, sorted labels) -> value."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_metrics_are_served_on_their_own_port_unary_and_streams_apart(database_url: str, make_token) -> None:
    """A unary call lands in entrepot_rpc_duration_seconds, a 1 s WatchStockChanges stream in
    entrepot_stream_duration_seconds only, so unary quantiles never read stream lifetimes."""
    port = free_port()
    watch = "/entrepot.inventory.v1.InventoryService/WatchStockChanges"
    unary = "/entrepot.platform.v1.ChannelService/ListChannels"
    with ServerProcess(database_url, ENTREPOT_METRICS_PORT=str(port)) as server:
        with grpc.insecure_channel(server.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        from entrepot_client import EntrepotSync

        with EntrepotSync(server.target, make_token()) as ep:
            ep.channel.list_channels(channel_pb2.ListChannelsRequest())
            stream = ep.grpc_channel.unary_stream(
                watch,
                request_serializer=inventory_pb2.WatchStockChangesRequest.SerializeToString,
                response_deserializer=inventory_pb2.WatchStockChangesResponse.FromString,
            )(
                inventory_pb2.WatchStockChangesRequest(skus=[unique("M")]),
                metadata=[("authorization", f"Bearer {make_token()}")],
            )
            time.sleep(1.0)
            stream.cancel()
        # The stream's end is recorded when the server sees the cancellation.
        deadline = time.monotonic() + 5
        while (m := scrape(port)).get(("entrepot_stream_duration_seconds_count", (("method", watch),))) != 1:
            assert time.monotonic() < deadline, "the cancelled stream was never recorded"
            time.sleep(0.1)
    assert m[("entrepot_rpc_total", (("code", "OK"), ("method", unary)))] == 1
    assert m[("entrepot_rpc_duration_seconds_count", (("method", unary),))] == 1
    assert m[("entrepot_rpc_total", (("code", "CANCELLED"), ("method", watch)))] == 1
    assert m[("entrepot_stream_duration_seconds_sum", (("method", watch),))] >= 0.9
    # A stream's second in its own buckets (up to a day), nothing of it in the unary histogram.
    assert m[("entrepot_stream_duration_seconds_bucket", (("le", "0.1"), ("method", watch)))] == 0
    assert m[("entrepot_stream_duration_seconds_bucket", (("le", "86400.0"), ("method", watch)))] == 1
    assert not [
        k for k in m if k[0].startswith("entrepot_rpc_duration_seconds") and ("method", watch) in k[1]
    ]
