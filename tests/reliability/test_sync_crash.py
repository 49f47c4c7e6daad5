"""R3: exactly-once sync across server crashes.

A real server process is SIGKILLed at random points of a SyncStock run and
restarted; the adapter (entrepot_client.streams.sync_stock) resumes on its
own. Afterwards every level equals applying each unique event once, in
order, and replaying the whole stream changes nothing. Short form by default
(a few kills); ENTREPOT_SOAK=long kills 20 times over a longer stream.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import text

from domain.shared.db import make_engine, make_session_factory
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.platform.v1 import types_pb2
from entrepot_client import Entrepot
from entrepot_client.streams import StockEvent, reconnect_options, sync_stock
from tests.inventory_support import check_invariants
from tests.procs import SMALL_POOL, ServerProcess, server_token
from tests.reliability.support import LONG

KILLS = 20 if LONG else 3
# Long enough that the stream outlives the kills (SyncStock applies ~15,000+ events/s here).
EVENTS = 200_000 if LONG else 40_000
SKUS = 300
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make_stream(wh: str, prefix: str, rng: random.Random) -> list[StockEvent]:
    """SETs, ADJUSTs (some would go below 0), RECEIVEs, repeated ids, out-of-order SETs."""
    events: list[StockEvent] = []
    for i in range(EVENTS):
        sku = f"{prefix}-{rng.randrange(SKUS)}"
        r = rng.random()
        minute = i + rng.choice((0, 0, 0, -50))  # some SETs arrive late: stale
        if r < 0.3:
            e = StockEvent(f"e{i}", sku, wh, "set", rng.randrange(0, 100), T0 + timedelta(minutes=minute))
        elif r < 0.85:
            e = StockEvent(f"e{i}", sku, wh, "adjust", rng.choice((-7, -3, -1, 1, 2, 5)), T0)
        else:
            e = StockEvent(f"e{i}", sku, wh, "receive", rng.randrange(1, 20), T0)
        events.append(e)
        if rng.random() < 0.03 and events:
            events.append(events[rng.randrange(len(events))])  # an adapter resending an old event
    return events


def expected_levels(events: list[StockEvent]) -> tuple[dict[str, int], int]:
    """The model: each unique event once, in order; stale SETs skipped; below 0 rejected."""
    seen: set[str] = set()
    level: dict[str, int] = {}
    marks: dict[str, datetime] = {}
    applied = 0
    for e in events:
        if e.event_id in seen:
            continue
        seen.add(e.event_id)
        cur = level.get(e.sku, 0)
        if e.kind == "set":
            assert e.occurred_at is not None
            if e.sku in marks and e.occurred_at < marks[e.sku]:
                continue
            new = e.quantity
        else:
            new = cur + e.quantity
        if new < 0:
            continue
        if e.kind == "set":
            assert e.occurred_at is not None
            marks[e.sku] = e.occurred_at
        level[e.sku] = new
        applied += 1
    return level, applied


async def test_sigkill_during_sync_then_resume_applies_every_event_once(
    database_url: str, tmp_path: Path
) -> None:
    rng = random.Random(int(os.environ.get("ENTREPOT_SEED", "4242")))
    server = ServerProcess(database_url, tmp_path, **SMALL_POOL)
    server.launch()
    await server.ready()
    token = server_token()
    engine = make_engine(database_url, pool_size=2, max_overflow=0)
    sessions = make_session_factory(engine)
    try:
        async with Entrepot(server.target, token, options=reconnect_options()) as ep:
            wh = "R3-" + uuid.uuid4().hex[:6]
            await ep.inventory.create_warehouse(
                pb.CreateWarehouseRequest(
                    warehouse=pb.Warehouse(
                        code=wh, name=wh, address=types_pb2.PostalAddress(country_code="FR")
                    ),
                    request_id=uuid.uuid4().hex,
                )
            )
            prefix = "R3-" + uuid.uuid4().hex[:6]
            source = "wms-" + prefix
            events = make_stream(wh, prefix, rng)
            model, model_applied = expected_levels(events)

            sync = asyncio.create_task(
                sync_stock(ep, source, events, batch_size=500, window=4, max_retries=100, max_retry_delay=0.5)
            )
            kills = 0
            while kills < KILLS and not sync.done():
                await asyncio.sleep(rng.uniform(0.1, 0.5) if kills == 0 else rng.uniform(0.3, 1.5))
                if sync.done():
                    break
                await server.restart()
                kills += 1
            progress = await asyncio.wait_for(sync, 600)
            assert kills >= 1, "the stream finished before any kill: make it longer"
            # A kill while the adapter was already backing off is noticed once.
            assert progress.reconnects >= 1

            async with sessions() as s:
                rows = (
                    await s.execute(
                        text("SELECT sku, on_hand FROM inventory.stock_levels WHERE warehouse_code = :w"),
                        {"w": wh},
                    )
                ).all()
                actual = {r.sku: int(r.on_hand) for r in rows}
                for sku in set(actual) | set(model):
                    assert actual.get(sku, 0) == model.get(sku, 0), sku
                applied = (
                    await s.execute(
                        text("SELECT count(*) FROM inventory.ledger WHERE source = :s AND type = 'sync'"),
                        {"s": source},
                    )
                ).scalar_one()
                # Some applied events do not change on_hand (a SET to the same value) but each
                # applied event has exactly one ledger row.
                assert applied == model_applied
                # One stock event per level and batch (check_invariants: they cover every
                # ledger row once); batches of 500 over 300 SKUs move levels several times.
                stock_events = (
                    await s.execute(
                        text(
                            "SELECT count(*) FROM platform.outbox "
                            "WHERE topic = 'inventory.stock_changed' AND payload->>'source' = :s"
                        ),
                        {"s": source},
                    )
                ).scalar_one()
                assert 0 < stock_events < applied
                cursor = await ep.inventory.get_sync_cursor(pb.GetSyncCursorRequest(source=source))
                assert cursor.events_applied == model_applied
                assert cursor.last_event_id == events[-1].event_id
                await check_invariants(s)

            # Replaying the whole stream changes nothing.
            replay = await sync_stock(ep, source, events, batch_size=2000)
            assert replay.applied == 0
            async with sessions() as s:
                again = (
                    await s.execute(
                        text("SELECT sku, on_hand FROM inventory.stock_levels WHERE warehouse_code = :w"),
                        {"w": wh},
                    )
                ).all()
                assert {r.sku: int(r.on_hand) for r in again} == {r.sku: int(r.on_hand) for r in rows}
    finally:
        server.stop()
        await engine.dispose()
