"""Two `entrepot serve` processes on one database (the compose topology without Docker):
reservations through both never oversell (R1's 200-on-10), and a watcher connected to
one replica sees every change committed through the other, in the same order (R4)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client import Entrepot, FailedPreconditionError
from entrepot_client.inventory import reserve
from tests.conftest import unique
from tests.inventory_support import check_invariants
from tests.procs import ServerProcess, server_token


@pytest.fixture(scope="module")
async def replicas(database_url: str) -> AsyncIterator[tuple[ServerProcess, ServerProcess]]:
    a, b = ServerProcess(database_url), ServerProcess(database_url)
    try:
        await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
        yield a, b
    finally:
        for p in (a, b):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(p.terminate)
            p.__exit__()


@pytest.fixture(scope="module")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(database_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    yield eng
    await eng.dispose()


async def outbox_head(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(
            (await conn.execute(text("SELECT coalesce(max(id), 0) FROM platform.outbox"))).scalar_one()
        )


async def collect(ep: Entrepot, sku: str, after: int, count: int) -> list[pb.StockChangeEvent]:
    """The first `count` events for `sku` after the cursor."""
    events: list[pb.StockChangeEvent] = []
    async for msg in ep.inventory.watch_stock_changes(
        pb.WatchStockChangesRequest(skus=[sku], after_event_id=after)
    ):
        events.extend(msg.events)
        if len(events) >= count:
            break
    return events


async def test_two_replicas_never_oversell_and_watchers_see_each_other(
    replicas: tuple[ServerProcess, ServerProcess], database_url: str, engine: AsyncEngine
) -> None:
    a_proc, b_proc = replicas
    tok = server_token("replica-test")
    async with Entrepot(a_proc.target, tok) as a, Entrepot(b_proc.target, tok) as b:
        wh, sku = unique("WH"), unique("HOT")
        await a.inventory.create_warehouse(
            pb.CreateWarehouseRequest(
                warehouse=pb.Warehouse(code=wh, name="Hot"), request_id=uuid.uuid4().hex
            )
        )
        # The item is created through B and its stock set through A: both see one database.
        await b.inventory.upsert_inventory_item(pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=sku)))
        cursor = await outbox_head(engine)
        await a.inventory.set_stock(
            pb.SetStockRequest(sku=sku, warehouse_code=wh, quantity=10, reason="seed")
        )

        # A watcher on each replica, both resuming from the same cursor.
        watch_a = asyncio.create_task(collect(a, sku, cursor, 11))
        watch_b = asyncio.create_task(collect(b, sku, cursor, 11))

        async def one(ep: Entrepot) -> bool:
            try:
                await reserve(ep, [(sku, 1)], reference="stampede", timeout=30)
                return True
            except FailedPreconditionError as err:
                assert err.reason == "INSUFFICIENT_STOCK"
                return False

        results = await asyncio.gather(*(one(a if i % 2 else b) for i in range(200)))
        assert sum(results) == 10, f"{sum(results)} reservations succeeded on 10 units"

        level_a = await a.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku))
        level_b = await b.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku))
        assert (level_a.on_hand, level_a.reserved, level_a.available) == (10, 10, 0)
        assert level_b == level_a

        seen_a, seen_b = await asyncio.wait_for(asyncio.gather(watch_a, watch_b), 30)
        # The same committed history on both replicas, whoever served the change:
        # the SetStock through A, then 10 reservations spread over A and B.
        assert [e.event_id for e in seen_a] == [e.event_id for e in seen_b]
        assert [e.type for e in seen_b] == [pb.MOVEMENT_TYPE_SET] + [pb.MOVEMENT_TYPE_RESERVE] * 10
        # Every reservation is visible once, with counters that never oversell, in the order
        # the level's row lock was granted (commit order per level; (txid, id) order, the
        # watch's order before, gave reserved 0, 1, 3, 2, ...): the counters step by one as
        # delivered, and so do movement ids.
        assert sum(e.reserved_delta for e in seen_b) == 10
        assert all(e.available >= 0 and e.on_hand == 10 for e in seen_b)
        assert [e.reserved for e in seen_b] == list(range(0, 11))
        assert [e.movement_id for e in seen_b] == sorted(e.movement_id for e in seen_b)
        applied = sorted(seen_b, key=lambda e: e.movement_id)
        assert len({e.movement_id for e in seen_b}) == 11 and applied[0].movement_id > 0
        assert [e.reserved for e in applied] == list(range(0, 11))
        assert (applied[-1].on_hand, applied[-1].reserved, applied[-1].available) == (
            level_b.on_hand,
            level_b.reserved,
            level_b.available,
        )

        # A change made through A alone arrives live on a watcher connected to B.
        head = seen_b[-1].event_id
        live = asyncio.create_task(collect(b, sku, head, 1))
        await a.inventory.adjust_stock(
            pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=5, reason="restock")
        )
        (event,) = await asyncio.wait_for(live, 20)
        assert (event.type, event.on_hand_delta, event.available, event.reason) == (
            pb.MOVEMENT_TYPE_ADJUST,
            5,
            5,
            "restock",
        )

    async with async_sessionmaker(engine)() as session:
        assert await check_invariants(session) >= 1


async def test_a_replica_going_away_leaves_the_other_serving(
    replicas: tuple[ServerProcess, ServerProcess], database_url: str
) -> None:
    """What Envoy relies on: one replica stops (SIGTERM drain), the other keeps answering."""
    a_proc, b_proc = replicas
    async with Entrepot(b_proc.target, server_token("replica-test")) as b:
        assert await asyncio.to_thread(a_proc.terminate) == 0
        page = await b.inventory.list_warehouses(pb.ListWarehousesRequest(page_size=1))
        assert len(page.warehouses) == 1
    with grpc.insecure_channel(a_proc.target) as ch:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(ch).result(timeout=1)
