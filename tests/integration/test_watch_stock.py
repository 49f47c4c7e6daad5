"""WatchStockChanges through real gRPC: filters, resume, heartbeats, expired
cursors, slow watchers cut off and resuming."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.inventory.ledger import TOPIC
from domain.shared import outbox
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client import Entrepot, EntrepotError, ResourceExhaustedError
from entrepot_client.streams import StockEvent, StockWatch, sync_stock, watch_stock
from tests.conftest import unique
from tests.events_support import commit_out_of_txid_order
from tests.integration.test_sync_stock import make_warehouse

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def ev(eid: str, sku: str, wh: str, kind: str, q: int, minutes: int = 0) -> StockEvent:
    return StockEvent(eid, sku, wh, kind, q, T0 + timedelta(minutes=minutes))


async def last_event_id(sessions: async_sessionmaker[AsyncSession], sku: str) -> int:
    async with sessions() as s:
        value = (
            await s.execute(text("SELECT max(id) FROM platform.outbox WHERE aggregate_id = :s"), {"s": sku})
        ).scalar_one()
    return int(value)


async def collect(w: StockWatch, n: int, timeout: float = 20.0) -> list[pb.StockChangeEvent]:
    out: list[pb.StockChangeEvent] = []

    async def run() -> None:
        async for e in w:
            out.append(e)
            if len(out) == n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_filters_order_and_cursor_advancing_past_filtered_events(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await make_warehouse(admin)
    a, b = unique("SKU"), unique("SKU")
    source = unique("wms")
    await sync_stock(admin, source, [ev("0", a, wh, "set", 1)])
    start = await last_event_id(sessions, a)

    only_a = watch_stock(admin, skus=[a], after_event_id=start)
    everything = watch_stock(admin, skus=[a, b], after_event_id=start)
    await sync_stock(
        admin,
        source,
        [
            ev("1", a, wh, "set", 10, 1),
            ev("2", b, wh, "set", 5, 2),
            ev("3", a, wh, "adjust", 1, 3),
            ev("4", b, wh, "adjust", -2, 4),
            ev("5", a, wh, "receive", 4, 5),
            ev("6", b, wh, "adjust", 7, 6),
        ],
        batch_size=2,
    )
    got_a = await collect(only_a, 3)
    assert [(e.sku, e.on_hand, e.on_hand_delta) for e in got_a] == [(a, 10, 9), (a, 11, 1), (a, 15, 4)]
    assert all(e.type == pb.MOVEMENT_TYPE_SYNC for e in got_a)
    got_all = await collect(everything, 6)
    assert [e.on_hand for e in got_all] == [10, 5, 11, 3, 15, 10]
    ids = [e.event_id for e in got_all]
    assert ids == sorted(ids)
    # Each event names its ledger movement.
    moves = await admin.inventory.list_stock_movements(pb.ListStockMovementsRequest(sku=a))
    by_id = {m.id: m for m in moves.movements}
    assert [(by_id[e.movement_id].on_hand_after, by_id[e.movement_id].sku) for e in got_a] == [
        (10, a),
        (11, a),
        (15, a),
    ]

    # The filtered watcher's cursor moves past B's last change (heartbeat) without events.
    last_b = await last_event_id(sessions, b)
    raw = admin.inventory.watch_stock_changes(
        pb.WatchStockChangesRequest(skus=[a], after_event_id=got_a[-1].event_id)
    )
    msg = await asyncio.wait_for(anext(raw), 10)
    assert list(msg.events) == [] and msg.cursor == last_b
    await raw.aclose()


async def test_a_sync_batch_is_one_event_per_level_covering_its_movements(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """SyncStock batch with 3 events on level A and 1 on level B: a watcher gets 2 events,
    A's with its counters after the batch, its deltas summed and the ids of exactly its
    3 ledger movements (ListStockMovements); replaying the batch emits nothing."""
    wh = await make_warehouse(admin)
    a, b, marker = unique("SKU"), unique("SKU"), unique("SKU")
    source = unique("wms")
    await admin.inventory.upsert_inventory_item(pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=a)))
    await admin.inventory.adjust_stock(pb.AdjustStockRequest(sku=a, warehouse_code=wh, delta=4))
    await sync_stock(admin, source, [ev("0", b, wh, "set", 1)])
    start = await last_event_id(sessions, b)
    watcher = watch_stock(admin, skus=[a, b, marker], after_event_id=start)
    batch = [
        ev("a1", a, wh, "adjust", 6, 1),
        ev("b1", b, wh, "receive", 2, 2),
        ev("a2", a, wh, "set", 20, 3),
        ev("a3", a, wh, "adjust", -5, 4),
    ]
    first = await sync_stock(admin, source, batch)
    assert first.applied == 4
    got = await collect(watcher, 2)
    assert [(e.sku, e.on_hand, e.reserved, e.available, e.on_hand_delta) for e in got] == [
        (b, 3, 0, 3, 2),
        (a, 15, 0, 15, 11),
    ]
    ea, eb = got[1], got[0]
    assert ea.type == pb.MOVEMENT_TYPE_SYNC and ea.event_id > eb.event_id
    a_moves = (await admin.inventory.list_stock_movements(pb.ListStockMovementsRequest(sku=a))).movements
    synced = sorted(m.id for m in a_moves if m.type == pb.MOVEMENT_TYPE_SYNC)
    assert len(synced) == 3 and (ea.first_movement_id, ea.movement_id) == (synced[0], synced[-1])
    assert [m.id for m in a_moves if ea.first_movement_id <= m.id <= ea.movement_id] == synced[::-1]
    assert sum(m.on_hand_delta for m in a_moves if m.id in synced) == ea.on_hand_delta
    assert max(a_moves, key=lambda m: m.id).on_hand_after == ea.on_hand
    b_moves = (await admin.inventory.list_stock_movements(pb.ListStockMovementsRequest(sku=b))).movements
    assert eb.first_movement_id == eb.movement_id == max(m.id for m in b_moves)

    # The replay applies nothing and emits nothing: the next event is the marker's.
    again = await sync_stock(admin, source, batch)
    assert (again.applied, again.duplicate) == (0, 4)
    await sync_stock(admin, source, [ev("m", marker, wh, "adjust", 1)])
    after = await collect(watcher, 1)
    assert [(e.sku, e.first_movement_id == e.movement_id) for e in after] == [(marker, True)]


async def test_resume_from_a_cursor_loses_and_repeats_nothing(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await make_warehouse(admin)
    sku = unique("SKU")
    source = unique("wms")
    await sync_stock(admin, source, [ev("0", sku, wh, "set", 0)])
    start = await last_event_id(sessions, sku)
    # Batches of one: a batch's changes of a level are one event.
    await sync_stock(admin, source, [ev(str(i), sku, wh, "adjust", 1) for i in range(1, 21)], batch_size=1)

    first = watch_stock(admin, skus=[sku], after_event_id=start)
    part = await collect(first, 8)
    rest = await collect(watch_stock(admin, skus=[sku], after_event_id=first.cursor), 12)
    assert [e.on_hand for e in part + rest] == list(range(1, 21))


async def test_below_threshold_only(admin: Entrepot, sessions: async_sessionmaker[AsyncSession]) -> None:
    wh = await make_warehouse(admin)
    sku = unique("SKU")
    await admin.inventory.upsert_inventory_item(
        pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=sku, low_stock_threshold=5))
    )
    source = unique("wms")
    await sync_stock(admin, source, [ev("0", sku, wh, "set", 20)])
    start = await last_event_id(sessions, sku)
    w = watch_stock(admin, skus=[sku], below_threshold_only=True, after_event_id=start)
    await sync_stock(admin, source, [ev("1", sku, wh, "set", 3, 1)])
    # One batch, one event with the level after it: 9, not below (its 3 on the way is not seen).
    await sync_stock(admin, source, [ev("2", sku, wh, "set", 2, 2), ev("3", sku, wh, "set", 9, 3)])
    await sync_stock(admin, source, [ev("4", sku, wh, "adjust", -4, 4)])
    got = await collect(w, 2)
    assert [(e.on_hand, e.below_threshold) for e in got] == [(3, True), (5, True)]


async def test_expired_and_unknown_cursors(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await make_warehouse(admin)
    sku = unique("SKU")
    async with sessions() as s, s.begin():
        # An event then purged, as the retention job does to old events (another
        # topic, so the session's ledger/outbox invariant is left alone).
        gone = int(
            (
                await s.execute(
                    text(
                        """INSERT INTO platform.outbox (topic, aggregate_type, aggregate_id, payload)
                           VALUES ('test.purged', 'x', 'x', '{}') RETURNING id"""
                    )
                )
            ).scalar_one()
        )
    await sync_stock(admin, unique("wms"), [ev("0", sku, wh, "set", 1)])  # a later event exists
    async with sessions() as s, s.begin():
        await s.execute(text("DELETE FROM platform.outbox WHERE id = :id"), {"id": gone})
    with pytest.raises(EntrepotError) as err:
        await collect(watch_stock(admin, after_event_id=gone), 1)
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE and err.value.reason == "CURSOR_EXPIRED"
    with pytest.raises(EntrepotError) as err:
        await collect(watch_stock(admin, after_event_id=2**62), 1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.reason == "UNKNOWN_CURSOR"


async def test_a_slow_watcher_is_cut_off_and_resumes_from_its_cursor(
    admin: Entrepot, target: str, make_token: Callable[..., str], sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await make_warehouse(admin)
    # A batch's changes of one level are one event: 6,000 events are 6,000 levels, one
    # SKU each in the watched warehouse, numbered in the order they are written.
    base = unique("SKU")
    source = unique("wms")
    await sync_stock(admin, source, [ev("0", f"{base}-0", wh, "set", 0)])
    start = await last_event_id(sessions, f"{base}-0")
    # No BDP probing: the client's receive window stays small, so a watcher
    # that stops reading soon makes the server's buffer for it fill up.
    slow = Entrepot(target, make_token(), options=[("grpc.http2.bdp_probe", 0)])
    total = 6000
    stream = slow.inventory.watch_stock_changes(
        pb.WatchStockChangesRequest(warehouse_codes=[wh], after_event_id=start)
    )

    def number(e: pb.StockChangeEvent) -> int:
        return int(e.sku.rsplit("-", 1)[1])

    # A first change, received: the watcher is now on the live feed.
    await sync_stock(admin, source, [ev("1", f"{base}-1", wh, "adjust", 1)])
    it = aiter(stream)
    first = await asyncio.wait_for(anext(it), 10)
    while not first.events:  # a heartbeat (0.3 s) came first on a busy machine
        first = await asyncio.wait_for(anext(it), 10)
    received: list[int] = [number(e) for e in first.events]
    cursor = first.cursor
    assert received == [1]
    await sync_stock(
        admin,
        source,
        [ev(str(i), f"{base}-{i}", wh, "adjust", 1) for i in range(2, total + 1)],
        batch_size=3000,
    )
    await asyncio.sleep(3.0)  # the watcher does not read meanwhile
    with pytest.raises(ResourceExhaustedError) as err:
        async for msg in it:
            received.extend(number(e) for e in msg.events)
            cursor = msg.cursor
            if len(received) == total:
                break
    assert err.value.reason == "WATCHER_TOO_SLOW"
    assert int(err.value.metadata["cursor"]) == cursor
    assert len(received) < total
    rest = await collect(
        watch_stock(admin, warehouse_codes=[wh], after_event_id=cursor), total - len(received)
    )
    assert received + [number(e) for e in rest] == list(range(1, total + 1))
    await slow.close()


async def test_changes_of_a_level_arrive_in_commit_order_when_txids_say_otherwise(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """B commits before A though A's txid is lower (commit_out_of_txid_order): the watcher
    gets B's change first (the (txid, id) order would give A, B)."""
    wh = await make_warehouse(admin)
    sku = unique("SKU")
    await sync_stock(admin, unique("wms"), [ev("0", sku, wh, "set", 1)])
    start = await last_event_id(sessions, sku)
    watcher = watch_stock(admin, skus=[sku], after_event_id=start)

    def change(who: str) -> outbox.Event:
        # The change's event alone (the counters are not what this test is about).
        payload = {"sku": sku, "warehouse_code": wh, "type": "adjust", "reason": who}
        return outbox.Event(TOPIC, "stock_level", sku, payload)

    try:
        await commit_out_of_txid_order(sessions, sku, wh, change("A"), change("B"))
        got = await collect(watcher, 2)
        assert [e.reason for e in got] == ["B", "A"]
        async with sessions() as s:
            by_txid = (
                (
                    await s.execute(
                        text(
                            "SELECT payload->>'reason' FROM platform.outbox WHERE aggregate_id = :s AND id > :i ORDER BY txid, id"
                        ),
                        {"s": sku, "i": start},
                    )
                )
                .scalars()
                .all()
            )
        assert by_txid == ["A", "B"], "the (txid, id) order this test means to contradict"
        # Resuming after B's event gives A's.
        assert [
            e.reason for e in await collect(watch_stock(admin, skus=[sku], after_event_id=got[0].event_id), 1)
        ] == ["A"]
    finally:
        # Events without ledger rows would break the session's ledger/outbox invariant.
        async with sessions() as s, s.begin():
            await s.execute(
                text(
                    "DELETE FROM platform.outbox WHERE topic = :t AND aggregate_id = :s "
                    "AND payload->>'reason' IN ('A', 'B')"
                ),
                {"t": TOPIC, "s": sku},
            )


async def test_every_change_of_concurrent_writers_arrives_once_in_id_order(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Four sources write batches at once: an unfiltered watcher gets every committed
    change once, in id order. A final id taken from a snapshot's xmax (one past the newest
    ended transaction) skipped a batch whose transaction was running above it (seen
    once in a few runs of this test)."""
    wh = await make_warehouse(admin)
    skus = [unique("SKU") for _ in range(200)]
    await sync_stock(admin, unique("wms"), [ev("0", skus[0], wh, "set", 1)])
    start = await last_event_id(sessions, skus[0])
    watcher = watch_stock(admin, after_event_id=start)
    got: list[int] = []

    async def follow() -> None:
        async for e in watcher:
            if e.sku in skus:
                got.append(e.event_id)

    following = asyncio.create_task(follow())

    async def produce(k: int) -> None:
        source = unique("wms")
        for b in range(30):
            batch = [ev(f"{k}-{b}-{i}", skus[(b * 50 + i) % 200], wh, "adjust", 1) for i in range(50)]
            await sync_stock(admin, source, batch, batch_size=50)
            await asyncio.sleep(0.05)

    await asyncio.gather(*(produce(k) for k in range(4)))
    async with sessions() as s:
        expected = [
            int(i)
            for i in (
                await s.execute(
                    text(
                        "SELECT id FROM platform.outbox WHERE aggregate_id = ANY(:s) AND id > :i ORDER BY id"
                    ),
                    {"s": skus, "i": start},
                )
            ).scalars()
        ]
    for _ in range(100):
        if len(got) >= len(expected):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # anything repeated would arrive now
    following.cancel()
    assert len(expected) == 4 * 30 * 50
    assert sorted(set(expected) - set(got)) == []
    assert got == expected
