"""R1 with kits: a random soak mixing kits (sharing components) with their
components sold on their own, on channels with each allocation strategy
(PRIORITY, HIGH_STOCK, FEWEST_SPLITS, NEAREST) and their own warehouse lists,
plus releases and fulfilments of whole and partial kits, stock adjustments of
the components, short holds left to expire, and kit definitions changing under
load; then R1's invariants (tests/inventory_support.check_invariants: no
negative or oversold counters, reserved = open holds, counters = ledger, one
event per movement, kits moved whole).

Real gRPC against the in-process server (tests/conftest.py). Seconds: 3, or
ENTREPOT_SOAK_SECONDS (60 under `make soak`).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Callable

from google.protobuf import duration_pb2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client import Entrepot, FailedPreconditionError
from tests.conftest import unique
from tests.integration.test_allocation_channels import allocate, make_channel
from tests.integration.test_inventory_api import make_item
from tests.inventory_support import settle_and_check

STRATEGIES = [
    pb.ALLOCATION_STRATEGY_PRIORITY,
    pb.ALLOCATION_STRATEGY_HIGH_STOCK,
    pb.ALLOCATION_STRATEGY_FEWEST_SPLITS,
    pb.ALLOCATION_STRATEGY_NEAREST,
]
CITIES = [(48.8566, 2.3522), (45.7640, 4.8357), (43.2965, 5.3698), (50.6292, 3.0573)]


async def located_warehouse(admin: Entrepot, i: int) -> str:
    code = unique("KWH")
    lat, lon = CITIES[i % len(CITIES)]
    await admin.inventory.create_warehouse(
        pb.CreateWarehouseRequest(
            warehouse=pb.Warehouse(
                code=code, name=code, priority=i, location=pb.GeoPoint(latitude=lat, longitude=lon)
            ),
            request_id=uuid.uuid4().hex,
        )
    )
    return code


async def define(admin: Entrepot, kit: str, components: dict[str, int]) -> None:
    await admin.inventory.set_kit_components(
        pb.SetKitComponentsRequest(
            sku=kit,
            components=[pb.KitComponent(sku=c, quantity=q) for c, q in components.items()],
            request_id=uuid.uuid4().hex,
        )
    )


async def test_r1_invariants_hold_after_a_soak_mixing_kits_strategies_and_channels(
    admin: Entrepot, client_factory: Callable[..., Entrepot], sessions: async_sessionmaker[AsyncSession]
) -> None:
    seconds = float(os.environ.get("ENTREPOT_SOAK_SECONDS", "3"))
    whs = [await located_warehouse(admin, i) for i in range(4)]
    components = [
        await make_item(
            admin,
            {wh: 8 for wh in whs},
            allow_backorder=(i % 4 == 0),
            max_backorder_quantity=4,
        )
        for i in range(6)
    ]
    kits = [await make_item(admin) for _ in range(3)]
    definitions = [
        {components[0]: 1, components[1]: 2},
        {components[1]: 1, components[2]: 1, components[3]: 3},  # shares components[1]
        {components[4]: 2, components[5]: 1, components[0]: 1},  # shares components[0]
    ]
    for kit, d in zip(kits, definitions, strict=True):
        await define(admin, kit, d)
    channels = []
    for i, strategy in enumerate(STRATEGIES):
        ch = await make_channel(admin)
        await allocate(admin, ch, [] if i == 0 else whs[i - 1 :], strategy)
        channels.append(client_factory(channel=ch))
    held: list[str] = []
    counts = {"ok": 0, "refused": 0, "kit_reservations": 0}
    deadline = time.monotonic() + seconds

    async def worker(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < deadline:
            op = rnd.random()
            try:
                if op < 0.45:
                    picks = [rnd.choice(kits + components) for _ in range(rnd.randint(1, 3))]
                    req = pb.ReserveStockRequest(
                        lines=[pb.ReservationLineRequest(sku=s, quantity=rnd.randint(1, 2)) for s in picks],
                        request_id=uuid.uuid4().hex,
                    )
                    lat, lon = rnd.choice(CITIES)
                    req.destination.CopyFrom(pb.GeoPoint(latitude=lat, longitude=lon))
                    if rnd.random() < 0.25:
                        req.ttl.CopyFrom(duration_pb2.Duration(nanos=rnd.randint(2, 8) * 100_000_000))
                    ep = rnd.choice([admin, *channels])
                    held.append((await ep.inventory.reserve_stock(req)).id)
                    counts["kit_reservations"] += any(s in kits for s in picks)
                elif op < 0.6 and held:
                    rid = rnd.choice(held)
                    res = await admin.inventory.get_reservation(pb.GetReservationRequest(id=rid))
                    open_kits = [k for k in res.kits if k.open_quantity]
                    if open_kits and rnd.random() < 0.5:
                        k = rnd.choice(open_kits)
                        await admin.inventory.release_reservation(
                            pb.ReleaseReservationRequest(
                                id=rid, lines=[pb.ReservationQuantity(sku=k.sku, quantity=1)]
                            )
                        )
                    else:
                        await admin.inventory.release_reservation(pb.ReleaseReservationRequest(id=rid))
                elif op < 0.75 and held:
                    rid = rnd.choice(held)
                    res = await admin.inventory.get_reservation(pb.GetReservationRequest(id=rid))
                    open_kits = [k for k in res.kits if k.open_quantity]
                    lines = (
                        [pb.ReservationQuantity(sku=rnd.choice(open_kits).sku, quantity=1)]
                        if open_kits and rnd.random() < 0.5
                        else []
                    )
                    await admin.inventory.fulfill_reservation(
                        pb.FulfillReservationRequest(id=rid, lines=lines)
                    )
                elif op < 0.97:
                    await admin.inventory.adjust_stock(
                        pb.AdjustStockRequest(
                            sku=rnd.choice(components),
                            warehouse_code=rnd.choice(whs),
                            delta=rnd.choice([-2, -1, 1, 2, 4]),
                        )
                    )
                else:
                    i = rnd.randrange(len(kits))
                    d = dict(definitions[i])
                    d[rnd.choice(list(d))] = rnd.randint(1, 3)
                    await define(admin, kits[i], d)
                counts["ok"] += 1
            except FailedPreconditionError:
                counts["refused"] += 1

    await asyncio.gather(*(worker(i) for i in range(16)))
    assert await settle_and_check(sessions) >= 24
    async with sessions() as s:
        kit_moves = (
            await s.execute(
                text("SELECT count(*) FROM inventory.ledger WHERE kit_sku = ANY(CAST(:kits AS text[]))"),
                {"kits": kits},
            )
        ).scalar_one()
    print(f"\nkit soak: {counts}, kit component movements {kit_moves}")
    assert counts["ok"] > 50 and counts["kit_reservations"] > 10 and kit_moves > 20
