"""An idle stock watcher is told its advanced cursor once it is far behind, not at every
heartbeat interval (server/watch_hub.py CursorRule): after its first message, events it
does not watch move its cursor silently until ENTREPOT_WATCH_CURSOR_GAP_EVENTS event ids
or ENTREPOT_WATCH_CURSOR_SECONDS have passed. A server of its own with small figures,
on the session database; the changes go through the session server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.inventory.ledger import TOPIC
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.inventory.v1 import inventory_pb2_grpc
from entrepot_client import Entrepot
from server.app import App
from tests.conftest import TEST_CHANNEL, make_settings, unique
from tests.integration.test_sync_stock import make_warehouse
from tests.procs import server_token

HEARTBEAT = 0.2


@contextlib.asynccontextmanager
async def watching(
    database_url: str, sku: str, **rule: Any
) -> AsyncIterator[asyncio.Queue[tuple[float, Any]]]:
    """A server with the cursor rule `rule` and one watcher of `sku` from now on; yields the
    messages it received after its first one, with their arrival times."""
    app = App(make_settings(database_url, None, watch_heartbeat_seconds=HEARTBEAT, **rule))
    await app.start()
    got: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()
    try:
        md = [("authorization", f"Bearer {server_token('watch')}"), ("x-channel-slug", TEST_CHANNEL)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stream = inventory_pb2_grpc.InventoryServiceStub(ch).WatchStockChanges(
                pb.WatchStockChangesRequest(skus=[sku]), metadata=md
            )
            async with asyncio.timeout(10):
                await stream.read()  # the first message: a heartbeat with the current cursor

            async def read() -> None:
                while (msg := await stream.read()) is not grpc.aio.EOF:
                    got.put_nowait((time.monotonic(), msg))

            reader = asyncio.create_task(read())
            try:
                yield got
            finally:
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    finally:
        await app.stop(grace=0.5)


Level = tuple[str, str]


@pytest.fixture
async def other(admin: Entrepot) -> Level:
    """A stock level (SKU, warehouse) nobody in these tests watches."""
    wh, sku = await make_warehouse(admin), unique("SKU")
    await admin.inventory.upsert_inventory_item(pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=sku)))
    return sku, wh


async def change(admin: Entrepot, level: Level, times: int) -> None:
    sku, wh = level
    for _ in range(times):
        await admin.inventory.adjust_stock(pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=1))


async def newest_event(sessions: async_sessionmaker[AsyncSession]) -> int:
    """The newest stock event (what a stock watcher's cursor can name)."""
    async with sessions() as s:
        sql = text("SELECT coalesce(max(id), 0) FROM platform.outbox WHERE topic = :t")
        return int((await s.execute(sql, {"t": TOPIC})).scalar_one())


async def test_the_cursor_is_told_once_it_is_the_gap_behind(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession], database_url: str, other: Level
) -> None:
    watched = unique("SKU")
    async with watching(database_url, watched, watch_cursor_gap_events=25, watch_cursor_seconds=3600) as got:
        start = await newest_event(sessions)
        await change(admin, other, 5)
        await asyncio.sleep(HEARTBEAT * 6)
        assert got.empty(), "told a cursor only 5 event ids ahead"
        await change(admin, other, 25)
        _, msg = await asyncio.wait_for(got.get(), 10)
        assert list(msg.events) == []
        assert msg.cursor >= start + 25
        assert msg.cursor <= await newest_event(sessions)


async def test_the_cursor_is_told_after_the_seconds_however_small_the_gap(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession], database_url: str, other: Level
) -> None:
    watched = unique("SKU")
    async with watching(
        database_url, watched, watch_cursor_gap_events=10**9, watch_cursor_seconds=1.5
    ) as got:
        told_before = time.monotonic()  # the first message came just before
        await change(admin, other, 1)
        last = await newest_event(sessions)
        arrived, msg = await asyncio.wait_for(got.get(), 10)
        assert list(msg.events) == [] and msg.cursor == last
        assert arrived - told_before >= 1.5 - HEARTBEAT
