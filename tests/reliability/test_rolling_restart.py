"""R10: rolling restarts lose nothing.

Two `entrepot serve` replicas behind a real HAProxy (Debian package; h2c to the replicas, gRPC
health checks, see tests/reliability/haproxy.py) take a steady mixed load from one client:
warehouse creates, stock adjustments and reservations (each with its request_id) and stock
reads. Each replica in turn is SIGTERMed (it reports NOT_SERVING, waits its shutdown delay,
which is longer than HAProxy's detection, then drains), must exit 0, is started again and
rejoins the rotation. The client retries a call only when it failed with UNAVAILABLE (the
only failure a client can retry blindly), mutations with the same request_id.

Asserted: no call failed with anything else; every call eventually succeeded; the load kept
being answered while each replica was away, and each restarted replica served again; in the
database every effect happened exactly once (one ledger row per adjustment, one reservation
per reserve, one warehouse and one outbox event per create, one idempotency record per
request_id; counters equal to what was asked; R1's invariants hold).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client import Entrepot, EntrepotError, UnavailableError
from tests.conftest import unique
from tests.procs import SMALL_POOL, ServerProcess, server_token
from tests.reliability.haproxy import DETECTION_SECONDS, HAProxy

SHUTDOWN_DELAY = DETECTION_SECONDS + 0.5  # NOT_SERVING long enough for HAProxy to act on it
GRACE = 5.0
WORKERS = 6
CALL_TIMEOUT = 5.0
GIVE_UP_AFTER = 30.0  # a call still failing with UNAVAILABLE after this long fails the test
INITIAL = 100_000


@dataclass
class Load:
    ep: Entrepot
    warehouse: str
    adjust_sku: str
    reserve_sku: str
    prefix: str = field(default_factory=lambda: unique("r10"))
    # kind -> request_ids of the mutations asked (each one eventually answered OK)
    asked: dict[str, list[str]] = field(default_factory=lambda: {"adjust": [], "reserve": [], "create": []})
    reads: int = 0
    retries: int = 0
    answered_at: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: bool = False

    async def call(self, what: str, fn: Callable[[], Awaitable[Any]]) -> None:
        """fn() until it answers; only UNAVAILABLE is retried (same request, same request_id)."""
        started = time.monotonic()
        delay = 0.05
        while True:
            try:
                await fn()
                self.answered_at.append(time.monotonic())
                return
            except UnavailableError as err:
                if time.monotonic() - started > GIVE_UP_AFTER:
                    self.failures.append(f"{what}: still UNAVAILABLE after {GIVE_UP_AFTER}s: {err}")
                    return
                self.retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            except EntrepotError as err:
                self.failures.append(f"{what}: {err}")
                return

    async def worker(self, n: int) -> None:
        rng = random.Random(n)
        i = 0
        while not self.stop:
            i += 1
            rid = f"{self.prefix}-{n}-{i}"
            pick = rng.random()
            if pick < 0.35:
                self.asked["adjust"].append(rid)
                req = pb.AdjustStockRequest(
                    sku=self.adjust_sku, warehouse_code=self.warehouse, delta=1, reference=rid, request_id=rid
                )
                await self.call(rid, lambda r=req: self.ep.inventory.adjust_stock(r, timeout=CALL_TIMEOUT))
            elif pick < 0.65:
                self.asked["reserve"].append(rid)
                res = pb.ReserveStockRequest(
                    lines=[pb.ReservationLineRequest(sku=self.reserve_sku, quantity=1)],
                    reference=rid,
                    request_id=rid,
                )
                await self.call(rid, lambda r=res: self.ep.inventory.reserve_stock(r, timeout=CALL_TIMEOUT))
            elif pick < 0.75:
                self.asked["create"].append(rid)
                create = pb.CreateWarehouseRequest(
                    warehouse=pb.Warehouse(code=rid, name="R10"), request_id=rid
                )
                await self.call(
                    rid, lambda r=create: self.ep.inventory.create_warehouse(r, timeout=CALL_TIMEOUT)
                )
            else:
                read = pb.GetStockLevelRequest(sku=self.adjust_sku)
                await self.call(
                    "read", lambda r=read: self.ep.inventory.get_stock_level(r, timeout=CALL_TIMEOUT)
                )
                self.reads += 1
            await asyncio.sleep(0.01)

    def answered_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.answered_at if start <= t <= end)


@pytest.fixture
async def stack(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[list[ServerProcess], HAProxy]]:
    env = {
        "ENTREPOT_SHUTDOWN_DELAY_SECONDS": str(SHUTDOWN_DELAY),
        "ENTREPOT_GRACE_SECONDS": str(GRACE),
    }
    replicas = [ServerProcess(database_url, tmp_path, **SMALL_POOL, **env) for _ in range(2)]
    proxy = HAProxy(tmp_path, {"a": replicas[0].port, "b": replicas[1].port})
    try:
        for r in replicas:
            r.launch()
        await asyncio.gather(*(r.ready() for r in replicas))
        proxy.start()
        for name in ("a", "b"):
            await asyncio.to_thread(proxy.wait_status, name, "UP", 10)
        yield replicas, proxy
    finally:
        proxy.stop()
        for r in replicas:
            await asyncio.to_thread(r.stop)


async def test_rolling_restart_behind_haproxy_loses_nothing(
    stack: tuple[list[ServerProcess], HAProxy], database_url: str
) -> None:
    replicas, proxy = stack
    async with Entrepot(proxy.target, server_token()) as ep:
        warehouse, adjust_sku, reserve_sku = unique("R10WH"), unique("R10-ADJ"), unique("R10-RES")
        await ep.inventory.create_warehouse(
            pb.CreateWarehouseRequest(warehouse=pb.Warehouse(code=warehouse, name="R10"))
        )
        for sku in (adjust_sku, reserve_sku):
            await ep.inventory.upsert_inventory_item(
                pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=sku))
            )
            await ep.inventory.set_stock(
                pb.SetStockRequest(sku=sku, warehouse_code=warehouse, quantity=INITIAL, reason="seed")
            )
        load = Load(ep, warehouse, adjust_sku, reserve_sku)
        workers = [asyncio.create_task(load.worker(n)) for n in range(WORKERS)]
        away: dict[str, tuple[float, float]] = {}
        served: dict[str, tuple[int, int]] = {}
        try:
            await asyncio.sleep(1.5)
            for replica, name in zip(replicas, ("a", "b"), strict=True):
                before = int(proxy.stats()[name]["stot"])
                gone = time.monotonic()
                await asyncio.to_thread(replica.stop)  # SIGTERM, then waits for the exit
                assert replica.proc is not None and replica.proc.returncode == 0, replica.log_tail()
                assert proxy.stats()[name]["status"] == "DOWN"
                replica.launch()
                await replica.ready()
                await asyncio.to_thread(proxy.wait_status, name, "UP", 10)
                away[name] = (gone, time.monotonic())
                stopped_at = int(proxy.stats()[name]["stot"])
                await asyncio.sleep(1.5)
                served[name] = (stopped_at - before, int(proxy.stats()[name]["stot"]) - stopped_at)
        finally:
            load.stop = True
            await asyncio.gather(*workers)

    assert not load.failures, load.failures[:10]
    for name, (start, end) in away.items():
        assert load.answered_between(start, end) > 0, f"no call answered while replica {name} was away"
        before, after = served[name]
        assert after > 0, f"replica {name} served nothing after its restart"
    asked = load.asked
    assert all(len(ids) > 10 for ids in asked.values()), {k: len(v) for k, v in asked.items()}

    conn = await asyncpg.connect(database_url)
    try:
        prefix = load.prefix + "-%"
        ledger = await conn.fetch(
            "SELECT reference, count(*) AS n FROM inventory.ledger WHERE reference LIKE $1 AND sku = $2"
            " GROUP BY reference",
            prefix,
            adjust_sku,
        )
        assert {r["reference"]: r["n"] for r in ledger} == dict.fromkeys(asked["adjust"], 1)
        reservations = await conn.fetch(
            "SELECT reference, count(*) AS n FROM inventory.reservations WHERE reference LIKE $1 GROUP BY reference",
            prefix,
        )
        assert {r["reference"]: r["n"] for r in reservations} == dict.fromkeys(asked["reserve"], 1)
        created = await conn.fetchval("SELECT count(*) FROM inventory.warehouses WHERE code LIKE $1", prefix)
        events = await conn.fetch(
            "SELECT aggregate_id, count(*) AS n FROM platform.outbox"
            " WHERE topic = 'inventory.warehouse_created' AND aggregate_id LIKE $1 GROUP BY aggregate_id",
            prefix,
        )
        assert created == len(asked["create"])
        assert {r["aggregate_id"]: r["n"] for r in events} == dict.fromkeys(asked["create"], 1)
        keys = await conn.fetch(
            "SELECT request_id, count(*) AS n FROM platform.idempotency_keys"
            " WHERE request_id LIKE $1 AND status_code = 0 GROUP BY request_id",
            prefix,
        )
        every = [rid for ids in asked.values() for rid in ids]
        assert {r["request_id"]: r["n"] for r in keys} == dict.fromkeys(every, 1)
        levels = {
            r["sku"]: (r["on_hand"], r["reserved"])
            for r in await conn.fetch(
                "SELECT sku, on_hand, reserved FROM inventory.stock_levels WHERE sku = ANY($1::text[])",
                [adjust_sku, reserve_sku],
            )
        }
        assert levels == {
            adjust_sku: (INITIAL + len(asked["adjust"]), 0),
            reserve_sku: (INITIAL, len(asked["reserve"])),
        }
    finally:
        await conn.close()
    print(
        f"R10: {sum(len(v) for v in asked.values())} mutations, {load.reads} reads, "
        f"{load.retries} UNAVAILABLE retried; served (before stop, after restart): {served}"
    )
