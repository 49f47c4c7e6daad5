"""R4: no lost events. A watcher follows stock changes written through one
server process while the process it watches through is SIGKILLed and
restarted, and while it moves between two processes on one database: it
receives every committed change exactly once, in commit order, and the changes
received cover every ledger movement of the watched levels once (a SyncStock
batch's movements of one level are one event)."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path

from sqlalchemy import text

from domain.shared.db import make_engine, make_session_factory
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.platform.v1 import types_pb2
from entrepot_client import Entrepot
from entrepot_client.streams import StockEvent, reconnect_options, sync_stock, watch_stock
from tests.procs import SMALL_POOL, ServerProcess, server_token
from tests.reliability.support import LONG

ROUNDS = 40 if LONG else 12


async def test_watcher_sees_every_change_once_in_order_across_restarts_and_replicas(
    database_url: str, tmp_path: Path
) -> None:
    rng = random.Random(99)
    a = ServerProcess(database_url, tmp_path, **SMALL_POOL, ENTREPOT_WATCH_HEARTBEAT_SECONDS="0.5")
    b = ServerProcess(database_url, tmp_path, **SMALL_POOL, ENTREPOT_WATCH_HEARTBEAT_SECONDS="0.5")
    a.launch()
    b.launch()
    await asyncio.gather(a.ready(), b.ready())
    token = server_token()
    engine = make_engine(database_url, pool_size=2, max_overflow=0)
    sessions = make_session_factory(engine)
    # The watcher's channel knows both replicas: when one dies it lands on the other.
    both = Entrepot(f"ipv4:{a.target},{b.target}", token, options=reconnect_options())
    writer = Entrepot(b.target, token, options=reconnect_options())
    try:
        wh = "R4-" + uuid.uuid4().hex[:6]
        await writer.inventory.create_warehouse(
            pb.CreateWarehouseRequest(
                warehouse=pb.Warehouse(code=wh, name=wh, address=types_pb2.PostalAddress(country_code="FR")),
                request_id=uuid.uuid4().hex,
            )
        )
        skus = [f"{wh}-{i}" for i in range(5)]
        source = "wms-" + wh
        await sync_stock(writer, source, [StockEvent("seed", skus[0], wh, "adjust", 1)])
        async with sessions() as s:
            start = int(
                (
                    await s.execute(
                        text("SELECT max(id) FROM platform.outbox WHERE aggregate_id = ANY(:s)"), {"s": skus}
                    )
                ).scalar_one()
            )

        watcher = watch_stock(both, skus=skus, after_event_id=start, max_retries=200, max_retry_delay=0.3)
        received: list[int] = []
        covered: dict[str, list[tuple[int, int]]] = {sku: [] for sku in skus}

        async def follow() -> None:
            async for e in watcher:
                received.append(e.event_id)
                covered[e.sku].append((e.first_movement_id, e.movement_id))

        follower = asyncio.create_task(follow())
        n = 0
        for r in range(ROUNDS):
            batch = []
            for _ in range(rng.randrange(5, 40)):
                n += 1
                batch.append(StockEvent(f"e{n}", rng.choice(skus), wh, "adjust", rng.randrange(1, 5)))
            await sync_stock(writer, source, batch, batch_size=10)
            if r % 4 == 1:
                await a.restart()
            elif r % 4 == 3:
                await b.restart()  # the writer's replica too: its sync_stock resumes
            await asyncio.sleep(rng.uniform(0, 0.3))
        async with sessions() as s:
            committed = [
                int(x)
                for x in (
                    await s.execute(
                        text(
                            """SELECT id FROM platform.outbox
                               WHERE aggregate_id = ANY(:s) AND id > :start ORDER BY id"""
                        ),
                        {"s": skus, "start": start},
                    )
                ).scalars()
            ]
        for _ in range(600):
            if len(received) >= len(committed):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # anything repeated would arrive now
        follower.cancel()
        assert received == committed
        assert len(set(received)) == len(received)
        assert watcher.reconnects >= 1
        async with sessions() as s:
            moves = (
                await s.execute(
                    text(
                        "SELECT sku, id FROM inventory.ledger WHERE source = :s AND reference <> 'seed' ORDER BY id"
                    ),
                    {"s": source},
                )
            ).all()
        assert len(moves) == n and len(received) < n, "batches of one level's events are one event"
        for sku in skus:
            ids = [int(m.id) for m in moves if m.sku == sku]
            spans = [[i for i in ids if first <= i <= last] for first, last in covered[sku]]
            assert all(
                span and span[0] == first and span[-1] == last
                for span, (first, last) in zip(spans, covered[sku], strict=True)
            ), sku
            assert [i for span in spans for i in span] == ids, sku
    finally:
        await both.close()
        await writer.close()
        a.stop()
        b.stop()
        await engine.dispose()
