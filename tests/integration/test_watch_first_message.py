"""A watcher gets its first message within the heartbeat interval of opening, whatever the
outbox holds (server/watch_hub.py): a heartbeat with the current cursor when nothing else
comes, so a client knows its stream is live. Against a database of its own with an empty
outbox, then with one event in it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import grpc
import pytest

import migrations
from entrepot.inventory.v1 import inventory_pb2, inventory_pb2_grpc
from entrepot.order.v1 import order_pb2, order_pb2_grpc
from entrepot.platform.v1 import channel_pb2, channel_pb2_grpc
from server.app import App
from tests import pg
from tests.conftest import TEST_CHANNEL, make_settings
from tests.procs import server_token

HEARTBEAT = 1.0
SLACK = 0.5  # scheduling on a busy machine


@pytest.fixture
def empty_database() -> Iterator[str]:
    url, name = pg.create_database("entrepot_watch_empty")
    migrations.upgrade(url)
    yield url
    pg.drop_database(name)


@contextlib.asynccontextmanager
async def serving(url: str) -> AsyncIterator[App]:
    app = App(make_settings(url, None, watch_heartbeat_seconds=HEARTBEAT))
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0.5)


async def first_message(stream: Any) -> tuple[float, Any]:
    started = time.monotonic()
    async with asyncio.timeout(HEARTBEAT * 5):
        msg = await stream.read()
    stream.cancel()
    return time.monotonic() - started, msg


async def outbox_head(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM platform.outbox"))
    finally:
        await conn.close()


async def watch_both(app: App) -> list[tuple[str, float, Any]]:
    md = [("authorization", f"Bearer {server_token('watch')}"), ("x-channel-slug", TEST_CHANNEL)]
    out = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stock = inventory_pb2_grpc.InventoryServiceStub(ch).WatchStockChanges(
            inventory_pb2.WatchStockChangesRequest(skus=["NOTHING-HERE"]), metadata=md
        )
        out.append(("stock", *(await first_message(stock))))
        orders = order_pb2_grpc.OrderServiceStub(ch).WatchOrderEvents(
            order_pb2.WatchOrderEventsRequest(), metadata=md
        )
        out.append(("orders", *(await first_message(orders))))
    return out


async def test_watchers_from_now_on_an_empty_outbox_get_a_heartbeat(empty_database: str) -> None:
    url = empty_database
    conn = await asyncpg.connect(url)
    try:  # the channel the order stream needs, written without an event
        await conn.execute(
            "INSERT INTO platform.channels (slug, name, currency, timezone, active)"
            " VALUES ($1, 'Test', 'EUR', 'Europe/Paris', true)",
            TEST_CHANNEL,
        )
    finally:
        await conn.close()
    assert await outbox_head(url) == 0
    async with serving(url) as app:
        for stream, elapsed, msg in await watch_both(app):
            assert list(msg.events) == [] and msg.cursor == 0, (stream, msg)
            assert elapsed < HEARTBEAT + SLACK, f"{stream}: first message after {elapsed:.2f} s"


async def test_the_first_heartbeat_names_the_head_of_the_outbox(empty_database: str) -> None:
    url = empty_database
    async with serving(url) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            await channel_pb2_grpc.ChannelServiceStub(ch).CreateChannel(
                channel_pb2.CreateChannelRequest(
                    channel=channel_pb2.Channel(slug=TEST_CHANNEL, name="Test", currency="EUR")
                ),
                metadata=[("authorization", f"Bearer {server_token('watch')}")],
            )
        head = await outbox_head(url)
        assert head > 0
        for stream, elapsed, msg in await watch_both(app):
            assert list(msg.events) == [] and msg.cursor == head, (stream, msg, head)
            assert elapsed < HEARTBEAT + SLACK, f"{stream}: first message after {elapsed:.2f} s"
