"""R13: events leave exactly once while the relay is SIGKILLed.

Two `entrepot serve` replicas relay the outbox to a real NATS JetStream (one at a time,
under a lease). Stock changes flow through both while the replica holding the relay's
lease is SIGKILLed at random moments and restarted. Afterwards a JetStream consumer reads
the stream from its start: every outbox event is there once (no duplicate, none lost), and
per aggregate in commit order: in outbox id order (ids are drawn under the aggregate's
lock), with the stock counters chaining (each event's on_hand minus its delta is the
previous event's on_hand). Writers with a request_id take their txid before the level's
lock, so txid order is not commit order here: the relay must not depend on it. Short form
in CI (a few seconds); ENTREPOT_SOAK=long runs a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from domain.platform import relay as cursors
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.platform.v1 import types_pb2
from entrepot_client import Entrepot, EntrepotError
from server.nats_sink import subject_token
from tests.events_support import EmbeddedNats, Names, existing_nats_url, read_stream
from tests.procs import SMALL_POOL, ServerProcess, server_token
from tests.reliability.support import soak

SECONDS = soak(8, 60)
SKUS = 6
WRITERS_PER_REPLICA = 3


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = existing_nats_url()
    if url:
        yield url
        return
    server = EmbeddedNats(tmp_path_factory.mktemp("nats-r13") / "store").start()
    try:
        yield server.url
    finally:
        server.stop()


async def lease_holder_pid(engine: AsyncEngine, relay: str) -> int | None:
    """The pid of the replica holding the relay's lease now (holder = host:pid:tag)."""
    async with engine.connect() as conn:
        holder = (
            await conn.execute(
                text("SELECT holder FROM platform.leases WHERE name = :n AND expires_at > now()"),
                {"n": cursors.lease_name(relay)},
            )
        ).scalar_one_or_none()
    return None if holder is None else int(str(holder).split(":")[-2])


async def write_stock(ep: Entrepot, wh: str, skus: list[str], stop: asyncio.Event, rng: random.Random) -> int:
    """Adjustments until told to stop; a replica being killed only fails calls."""
    done = 0
    while not stop.is_set():
        sku = rng.choice(skus)
        try:
            if rng.random() < 0.6:
                # Without a request id: the first write of the transaction locks the level.
                await ep.inventory.adjust_stock(
                    pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=rng.randint(1, 5)), timeout=5
                )
            else:
                # With one: the idempotency claim writes first, then the level is locked.
                await ep.inventory.adjust_stock(
                    pb.AdjustStockRequest(
                        sku=sku, warehouse_code=wh, delta=rng.choice((-2, -1, 1)), request_id=uuid.uuid4().hex
                    ),
                    timeout=5,
                )
            done += 1
        except (EntrepotError, grpc.RpcError):
            await asyncio.sleep(0.05)  # refused (below 0) or the replica is down
    return done


def server_logs(directory: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in directory.glob("server-*.log"))


def chain_breaks(events: list[dict]) -> int:
    """Events of one stream of stock changes that do not start where the previous one of
    their level ended (0: the order is the order the changes committed in)."""
    breaks = 0
    chains: dict[tuple[str, str], int] = {}
    for e in events:
        p = e["payload"]
        key = (p["sku"], p["warehouse_code"])
        if key in chains and chains[key] != p["on_hand"] - p["on_hand_delta"]:
            breaks += 1
        chains[key] = p["on_hand"]
    return breaks


async def test_sigkilled_relay_delivers_every_event_once_in_order(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    rng = random.Random(1313)
    names = Names.new()
    relay = f"nats:{names.stream}"
    env = {
        "NATS_URL": nats_url,
        "ENTREPOT_EVENTS_STREAM": names.stream,
        "ENTREPOT_EVENTS_SUBJECT_PREFIX": names.prefix,
        "ENTREPOT_RELAY_LEASE_SECONDS": "1.5",
        "ENTREPOT_RELAY_POLL_SECONDS": "0.2",
        "ENTREPOT_LOG_LEVEL": "INFO",  # the relays' takeover lines are read below
    }
    replicas = [ServerProcess(database_url, tmp_path, **SMALL_POOL, **env) for _ in range(2)]
    engine = create_async_engine(database_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    token = server_token()
    stop = asyncio.Event()
    clients: list[Entrepot] = []
    try:
        for r in replicas:
            r.launch()
        await asyncio.gather(*(r.ready() for r in replicas))
        clients = [Entrepot(r.target, token) for r in replicas for _ in range(WRITERS_PER_REPLICA)]
        wh = "R13-" + uuid.uuid4().hex[:6]
        await clients[0].inventory.create_warehouse(
            pb.CreateWarehouseRequest(
                warehouse=pb.Warehouse(code=wh, name=wh, address=types_pb2.PostalAddress(country_code="FR")),
                request_id=uuid.uuid4().hex,
            )
        )
        skus = [f"R13-{uuid.uuid4().hex[:6]}" for _ in range(SKUS)]
        for sku in skus:
            await clients[0].inventory.upsert_inventory_item(
                pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=sku), request_id=uuid.uuid4().hex)
            )
        writers = [
            asyncio.create_task(write_stock(ep, wh, skus, stop, random.Random(rng.random())))
            for ep in clients
        ]

        kills = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SECONDS
        while loop.time() < deadline:
            await asyncio.sleep(rng.uniform(0.2, 1.2))
            pid = await lease_holder_pid(engine, relay)
            victim = next((r for r in replicas if r.proc is not None and r.proc.pid == pid), None)
            if victim is None:
                continue  # between holders (the lease of a killed one has not expired yet)
            victim.kill()
            kills += 1
            victim.launch()
            await victim.ready()
        stop.set()
        writes = sum(await asyncio.gather(*writers))
        assert kills >= 2, f"only {kills} kills: the relay never ran long enough to be killed"

        # Everything committed reaches the broker.
        async with engine.connect() as conn:
            head = (await conn.execute(text("SELECT count(*) FROM platform.outbox"))).scalar_one()
        for _ in range(300):
            async with AsyncSession(engine) as session:
                left = (await cursors.backlog(session, relay)).events
            if left == 0:
                break
            await asyncio.sleep(0.1)
        assert left == 0, f"{left} events not relayed"

        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT id, topic, aggregate_id, payload FROM platform.outbox ORDER BY id")
                )
            ).all()
        received = await read_stream(nats_url, names, len(rows), timeout=60)

        seen = Counter(r.msg_id for r in received)
        duplicates = sum(n - 1 for n in seen.values())
        lost = [r.id for r in rows if str(r.id) not in seen]
        # Per aggregate, the consumer's order is outbox id order.
        by_subject: dict[str, list[int]] = defaultdict(list)
        for m in received:
            by_subject[m.subject].append(int(m.msg_id))
        expected: dict[str, list[int]] = defaultdict(list)
        for r in rows:
            expected[f"{names.prefix}.{r.topic}.{subject_token(r.aggregate_id)}"].append(r.id)
        out_of_order = [
            s for s in expected if s.startswith(f"{names.prefix}.inventory.") and by_subject[s] != expected[s]
        ]
        # Commit order: the counters chain (each event starts where the previous one ended).
        mine = [m.event for m in received if m.event["topic"] == "inventory.stock_changed"]
        mine = [e for e in mine if e["payload"]["sku"] in skus]
        breaks = chain_breaks(mine)
        async with engine.connect() as conn:
            txid_order = [
                int(i)
                for i in (
                    await conn.execute(text("SELECT id FROM platform.outbox ORDER BY txid, id"))
                ).scalars()
            ]
        by_id = {int(e["id"]): e for e in mine}
        breaks_by_txid = chain_breaks([by_id[i] for i in txid_order if i in by_id])
        # What the relays said about the ones killed before them (server logs, INFO).
        logs = server_logs(tmp_path)
        caught_up_with_broker = logs.count("cursor moved to the broker's newest event")
        batches_with_duplicates = logs.count("the broker already held events of this batch")
        print(
            f"\nR13: {len(rows)} outbox events ({writes} stock writes), {kills} relay kills; takeovers "
            f"that found acknowledged events past the cursor: {caught_up_with_broker}, batches partly "
            f"dropped by JetStream de-duplication: {batches_with_duplicates}; "
            f"consumer saw {len(received)} messages: {duplicates} duplicates, {len(lost)} lost, "
            f"{len(out_of_order)} aggregates out of id order; stock counter chain breaks: "
            f"{breaks} as delivered ({breaks_by_txid} had the outbox been read in (txid, id) order)"
        )
        assert duplicates == 0 and not lost
        assert not out_of_order
        assert len(received) == head == len(rows)
        assert breaks == 0, f"{breaks} stock counter chain breaks: not in commit order"
    finally:
        stop.set()
        for ep in clients:
            with contextlib.suppress(Exception):
                await ep.close()
        for r in replicas:
            r.stop()
        await engine.dispose()
