"""Transport limits and per-principal rate limits, verified against a real server on loopback:
each setting is shown to apply (a call past it is refused or queued as documented)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import text

from entrepot.platform.v1 import channel_pb2, channel_pb2_grpc
from server.app import App
from server.ratelimit import TokenBuckets, parse_rate_limits
from tests.conftest import make_settings, unique
from tests.procs import server_token


@contextlib.asynccontextmanager
async def serving(database_url: str, **overrides: Any) -> AsyncIterator[App]:
    app = App(make_settings(database_url, None, **overrides))
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0.5)


def md(sub: str = "limits") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {server_token(sub)}")]


def details(err: grpc.aio.AioRpcError) -> list[Any]:
    out: list[Any] = []
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for d in status_pb2.Status.FromString(value).details:
                for cls in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
                    if d.Is(cls.DESCRIPTOR):
                        m = cls()
                        d.Unpack(m)
                        out.append(m)
    return out


async def create(stub: channel_pb2_grpc.ChannelServiceStub, name: str = "L") -> str:
    slug = unique("lim")
    await stub.CreateChannel(
        channel_pb2.CreateChannelRequest(channel=channel_pb2.Channel(slug=slug, name=name, currency="EUR")),
        metadata=md(),
        timeout=5,
    )
    return slug


async def test_oversized_request_is_resource_exhausted(database_url: str) -> None:
    async with serving(database_url, max_message_bytes=64 * 1024) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = channel_pb2_grpc.ChannelServiceStub(ch)
            big = channel_pb2.CreateChannelRequest(
                channel=channel_pb2.Channel(slug="big", name="n" * 100_000)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateChannel(big, metadata=md(), timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Just under the limit it reaches the service, which refuses the name on its own terms.
            under = channel_pb2.CreateChannelRequest(
                channel=channel_pb2.Channel(slug="big", name="n" * 60_000)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateChannel(under, metadata=md(), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await stub.ListChannels(channel_pb2.ListChannelsRequest(), metadata=md(), timeout=5)


async def test_oversized_metadata_is_resource_exhausted(database_url: str) -> None:
    async with serving(database_url, max_metadata_bytes=8 * 1024) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = channel_pb2_grpc.ChannelServiceStub(ch)
            for _ in range(
                3
            ):  # exact since both gRPC limits are set (tests/reliability/test_metadata_limit.py)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ListChannels(
                        channel_pb2.ListChannelsRequest(),
                        metadata=[*md(), ("x-pad", "p" * 20_000)],
                        timeout=5,
                    )
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            await stub.ListChannels(channel_pb2.ListChannelsRequest(), metadata=md(), timeout=5)


@contextlib.asynccontextmanager
async def blocked_updates(
    app: App, stub: channel_pb2_grpc.ChannelServiceStub, n: int
) -> AsyncIterator[list[Any]]:
    """`n` UpdateChannel calls held in flight by a row lock; released on exit, then awaited."""
    slug = await create(stub)
    async with app.rt.sessions() as s, s.begin():
        await s.execute(text("SELECT 1 FROM platform.channels WHERE slug = :s FOR UPDATE"), {"s": slug})
        calls = [
            asyncio.ensure_future(
                stub.UpdateChannel(
                    channel_pb2.UpdateChannelRequest(
                        channel=channel_pb2.Channel(slug=slug, name=f"B{i}"), update_mask={"paths": ["name"]}
                    ),
                    metadata=md(),
                    timeout=20,
                )
            )
            for i in range(n)
        ]
        await asyncio.sleep(0.5)
        assert not any(c.done() for c in calls)
        yield calls
    await asyncio.gather(*calls)


async def test_concurrent_rpcs_past_the_limit_are_resource_exhausted(database_url: str) -> None:
    async with serving(database_url, max_concurrent_rpcs=3) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = channel_pb2_grpc.ChannelServiceStub(ch)
            async with blocked_updates(app, stub, 3):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ListChannels(channel_pb2.ListChannelsRequest(), metadata=md(), timeout=5)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await stub.ListChannels(channel_pb2.ListChannelsRequest(), metadata=md(), timeout=5)


async def test_concurrent_streams_per_connection_are_capped(database_url: str) -> None:
    """HTTP/2 MAX_CONCURRENT_STREAMS: the client queues a call past the cap on that connection
    (gRPC does not fail it), so it reaches the server only when a stream frees up; another
    connection is unaffected."""
    async with serving(database_url, max_concurrent_streams=2) as app:
        target = f"127.0.0.1:{app.port}"
        async with grpc.aio.insecure_channel(target) as ch:
            stub = channel_pb2_grpc.ChannelServiceStub(ch)
            await stub.ListChannels(channel_pb2.ListChannelsRequest(), metadata=md(), timeout=5)
            async with blocked_updates(app, stub, 2):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ListChannels(channel_pb2.ListChannelsRequest(), metadata=md(), timeout=1)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                async with grpc.aio.insecure_channel(
                    target, options=[("grpc.use_local_subchannel_pool", 1)]
                ) as other:
                    await channel_pb2_grpc.ChannelServiceStub(other).ListChannels(
                        channel_pb2.ListChannelsRequest(), metadata=md(), timeout=5
                    )
            await stub.ListChannels(channel_pb2.ListChannelsRequest(), metadata=md(), timeout=5)


async def _state_after_quiet(target: str, quiet: float) -> grpc.ChannelConnectivity:
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        await channel_pb2_grpc.ChannelServiceStub(ch).ListChannels(
            channel_pb2.ListChannelsRequest(), metadata=md(), timeout=5
        )
        assert ch.get_state() == grpc.ChannelConnectivity.READY
        await asyncio.sleep(quiet)
        return ch.get_state()


@pytest.mark.parametrize(
    ("overrides", "closed"),
    [
        ({"max_connection_idle_ms": 300}, True),
        ({"max_connection_age_ms": 500}, True),
        ({}, False),  # the control: with the defaults the connection stays up
    ],
    ids=["idle", "age", "defaults"],
)
async def test_idle_and_max_connection_age_close_connections(
    database_url: str, overrides: dict[str, int], closed: bool
) -> None:
    async with serving(database_url, **overrides) as app:
        state = await _state_after_quiet(f"127.0.0.1:{app.port}", 1.5)
    assert (state != grpc.ChannelConnectivity.READY) is closed, state


def test_rate_limit_spec_parsing() -> None:
    limits = parse_rate_limits(
        "inventory.v1.InventoryService/BulkAdjustStock=20/s, /entrepot.order.v1.OrderService/*=120/m:5"
    )
    bulk = limits["/entrepot.inventory.v1.InventoryService/BulkAdjustStock"]
    assert (bulk.rate, bulk.burst) == (20.0, 20.0)
    orders = limits["/entrepot.order.v1.OrderService/*"]
    assert (orders.rate, orders.burst) == (2.0, 5.0)
    for bad in ("x.v1.S/M", "x.v1.S/M=0/s", "x.v1.S/M=3/d", "x.v1.S/M=abc", "NoSlash=1/s"):
        with pytest.raises(ValueError):
            parse_rate_limits(bad)
    assert parse_rate_limits("") == {}


def test_token_bucket_refills_at_the_configured_rate() -> None:
    buckets = TokenBuckets(parse_rate_limits("x.v1.S/*=2/s:2"))
    m = "/entrepot.x.v1.S/Heavy"
    assert [buckets.take("a", m, now=0.0) for _ in range(3)][:2] == [0.0, 0.0]
    assert buckets.take("a", m, now=0.0) == pytest.approx(0.5)
    assert buckets.take("b", m, now=0.0) == 0.0  # per principal
    assert buckets.take("a", "/entrepot.y.v1.T/Other", now=0.0) == 0.0  # unlisted: unlimited
    assert buckets.take("a", m, now=0.6) == 0.0  # refilled


async def test_rate_limited_calls_get_resource_exhausted_with_retry_info(database_url: str) -> None:
    async with serving(database_url, rate_limits="platform.v1.ChannelService/ListChannels=5/s:5") as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = channel_pb2_grpc.ChannelServiceStub(ch)
            codes = []
            retry_after = 0.0
            for _ in range(8):
                try:
                    await stub.ListChannels(
                        channel_pb2.ListChannelsRequest(), metadata=md("alice"), timeout=5
                    )
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())
                    info, retry = details(err)
                    assert info.reason == "RATE_LIMITED"
                    retry_after = retry.retry_delay.ToTimedelta().total_seconds()
                    assert 0 < retry_after <= 0.25
            assert codes.count(grpc.StatusCode.OK) in (5, 6)  # 6 if a token refilled meanwhile
            assert set(codes[6:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            # Another principal has its own bucket; other methods are not limited.
            await stub.ListChannels(channel_pb2.ListChannelsRequest(), metadata=md("bob"), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetChannel(
                    channel_pb2.GetChannelRequest(slug="nope"), metadata=md("alice"), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            started = time.monotonic()
            await asyncio.sleep(retry_after)
            await stub.ListChannels(channel_pb2.ListChannelsRequest(), metadata=md("alice"), timeout=5)
            assert time.monotonic() - started < 1


async def test_a_bad_rate_limit_setting_refuses_startup(database_url: str) -> None:
    app = App(make_settings(database_url, None, rate_limits="nonsense"))
    try:
        with pytest.raises(ValueError, match="rate limit"):
            await app.start()
    finally:
        await app.rt.close()
