"""SyncStock and GetSyncCursor through real gRPC (in-process server, real PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.inventory import sync
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.platform.v1 import types_pb2
from entrepot_client import Entrepot, InvalidArgumentError, PermissionDeniedError
from entrepot_client.streams import StockEvent, sync_stock
from tests.conftest import unique
from tests.inventory_support import check_invariants

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]


async def make_warehouse(ep: Entrepot) -> str:
    code = unique("WH")
    await ep.inventory.create_warehouse(
        pb.CreateWarehouseRequest(
            warehouse=pb.Warehouse(code=code, name=code, address=types_pb2.PostalAddress(country_code="FR")),
            request_id=uuid.uuid4().hex,
        )
    )
    return code


async def on_hand(ep: Entrepot, sku: str, wh: str) -> int:
    st = await ep.inventory.get_stock_level(pb.GetStockLevelRequest(sku=sku, warehouse_code=wh))
    return st.on_hand


def ev(eid: str, sku: str, wh: str, kind: str, q: int, minutes: int = 0, **kw: object) -> StockEvent:
    return StockEvent(eid, sku, wh, kind, q, T0 + timedelta(minutes=minutes), **kw)  # type: ignore[arg-type]


async def test_events_apply_once_and_a_replay_changes_nothing(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    wh = await make_warehouse(admin)
    source = unique("wms")
    a, b = unique("SKU"), unique("SKU")
    events = [
        ev("e1", a, wh, "set", 10, 1),
        ev("e2", a, wh, "adjust", -3, 2),
        ev("e3", b, wh, "receive", 5, 3, unit_cost=(250, "EUR")),
        ev("e4", a, wh, "receive", 2, 4),
        ev("e2", a, wh, "adjust", -3, 2),  # repeated inside the stream
        ev("e5", b, wh, "adjust", 1, 5),
    ]
    seen: list[int] = []
    first = await sync_stock(
        admin, source, events, batch_size=2, on_progress=lambda p: seen.append(p.batches)
    )
    assert (first.applied, first.duplicate, first.stale, first.rejected) == (5, 1, 0, 0)
    assert seen == [1, 2, 3]
    assert await on_hand(admin, a, wh) == 9
    assert await on_hand(admin, b, wh) == 6

    cursor = await admin.inventory.get_sync_cursor(pb.GetSyncCursorRequest(source=source))
    assert (cursor.last_event_id, cursor.events_seen, cursor.events_applied) == ("e5", 6, 5)

    again = await sync_stock(admin, source, events, batch_size=4)
    assert (again.applied, again.duplicate) == (0, 6)
    assert await on_hand(admin, a, wh) == 9
    assert await on_hand(admin, b, wh) == 6

    # A ledger row (type sync, reference = event id) per applied event; one stock event
    # per level and batch: batches (e1 e2) (e3 e4) (e2 e5) moved a, then a and b, then b.
    async with sessions() as s:
        refs = (
            await s.execute(
                text(
                    "SELECT reference FROM inventory.ledger WHERE source = :s AND type = 'sync' ORDER BY id"
                ),
                {"s": source},
            )
        ).scalars()
        assert list(refs) == ["e1", "e2", "e3", "e4", "e5"]
        lots = (
            await s.execute(
                text("SELECT received_quantity, unit_cost_minor FROM inventory.lots WHERE sku = :b"), {"b": b}
            )
        ).all()
        assert [tuple(r) for r in lots] == [(5, 250)]
        n_out = (
            await s.execute(
                text(
                    "SELECT count(*) FROM platform.outbox WHERE aggregate_id IN (:a, :b) AND payload->>'type' = 'sync'"
                ),
                {"a": a, "b": b},
            )
        ).scalar_one()
        assert n_out == 4
        await check_invariants(s)


async def test_one_batch_over_several_warehouses_flags_the_sku_total(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Levels of one SKU in two warehouses change in one batch: each level gets one
    event, with the level's counters after the batch, the deltas of its movements
    summed, the ledger ids it covers, and the below-threshold flag of the SKU's
    running total after the level's last movement (w1's alone would be below)."""
    w1, w2 = await make_warehouse(admin), await make_warehouse(admin)
    source = unique("wms")
    sku = unique("SKU")
    await admin.inventory.upsert_inventory_item(
        pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=sku, low_stock_threshold=10))
    )
    events = [
        ev("m1", sku, w1, "set", 4, 1),  # total 4: below
        ev("m2", sku, w2, "receive", 5, 2),  # total 9: below
        ev("m3", sku, w2, "adjust", 3, 3),  # total 12: not below
        ev("m4", sku, w1, "set", 1, 0),  # older SET in w1: stale
        ev("m5", sku, w1, "adjust", 1, 4),  # total 13: not below (w1's last movement)
        ev("m6", sku, w2, "set", 2, 0),  # first SET in w2 (no watermark yet): total 7, below
    ]
    p = await sync_stock(admin, source, events, batch_size=100)
    assert (p.applied, p.stale, p.rejected) == (5, 1, 0)
    assert (await on_hand(admin, sku, w1), await on_hand(admin, sku, w2)) == (5, 2)
    async with sessions() as s:
        ledger = {
            r.reference: int(r.id)
            for r in await s.execute(
                text("SELECT reference, id FROM inventory.ledger WHERE source = :src"), {"src": source}
            )
        }
        assert sorted(ledger) == ["m1", "m2", "m3", "m5", "m6"]
        rows = (
            await s.execute(
                text(
                    "SELECT payload->>'reference', payload->>'warehouse_code', (payload->>'on_hand')::int,"
                    " (payload->>'on_hand_delta')::int, (payload->>'below_threshold')::bool,"
                    " (payload->>'first_ledger_id')::bigint, (payload->>'ledger_id')::bigint"
                    " FROM platform.outbox WHERE aggregate_id = :sku AND payload->>'source' = :src ORDER BY id"
                ),
                {"sku": sku, "src": source},
            )
        ).all()
        assert [tuple(r) for r in rows] == [
            ("m5", w1, 5, 5, False, ledger["m1"], ledger["m5"]),
            ("m6", w2, 2, 2, True, ledger["m2"], ledger["m6"]),
        ]
        marks = (
            await s.execute(
                text(
                    "SELECT warehouse_code FROM inventory.sync_watermarks WHERE source = :src AND sku = :sku"
                ),
                {"src": source, "sku": sku},
            )
        ).scalars()
        assert sorted(marks) == sorted([w1, w2])
        await check_invariants(s)
    # A later batch: the watermarks now exist (updated in place), the replay is a no-op.
    again = await sync_stock(
        admin, source, [*events, ev("m7", sku, w2, "set", 6, -1), ev("m8", sku, w2, "set", 7, 9)]
    )
    assert (again.applied, again.duplicate, again.stale) == (1, 6, 1)
    assert await on_hand(admin, sku, w2) == 7


async def test_older_set_is_stale_across_batches(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    source = unique("wms")
    sku = unique("SKU")
    p1 = await sync_stock(admin, source, [ev("s-new", sku, wh, "set", 40, minutes=10)])
    assert p1.applied == 1
    p2 = await sync_stock(
        admin,
        source,
        [
            ev("s-old", sku, wh, "set", 7, minutes=5),  # older than the applied SET: stale
            ev("adj", sku, wh, "adjust", 2, minutes=6),  # ADJUSTs are never stale
            ev("s-same", sku, wh, "set", 30, minutes=10),  # same time: not older, applied
            ev("s-older", sku, wh, "set", 1, minutes=9),
        ],
    )
    assert (p2.applied, p2.stale) == (2, 2)
    assert await on_hand(admin, sku, wh) == 30
    # Another source has its own watermark.
    p3 = await sync_stock(admin, unique("erp"), [ev("x", sku, wh, "set", 12, minutes=1)])
    assert p3.applied == 1
    assert await on_hand(admin, sku, wh) == 12


async def test_bad_events_are_rejected_alone_and_a_replay_answers_the_same(admin: Entrepot) -> None:
    wh = await make_warehouse(admin)
    source = unique("wms")
    sku = unique("SKU")
    events = [
        ev("ok1", sku, wh, "set", 5),
        ev("bad-wh", sku, "NOPE-" + uuid.uuid4().hex[:6], "adjust", 1),
        ev("neg", sku, wh, "set", -1),
        ev("kind", sku, wh, "teleport", 1),
        ev("sku", " padded ", wh, "adjust", 1),
        StockEvent("no-time", sku, wh, "set", 3),
        ev("below0", sku, wh, "adjust", -6),
        ev("nul\0id", sku, wh, "adjust", 1),  # PostgreSQL text cannot hold NUL: alone, never stored
        ev("nul-reason", sku, wh, "adjust", 1, reason="a\0b"),
        ev("ok2", sku, wh, "adjust", -5),
    ]
    p = await sync_stock(admin, source, events, batch_size=100)
    reasons = {e.event_id: e.reason for e in p.errors}
    assert reasons == {
        "bad-wh": "UNKNOWN_WAREHOUSE",
        "neg": "NEGATIVE_QUANTITY",
        "kind": "UNKNOWN_KIND",
        "sku": "INVALID_SKU",
        "no-time": "MISSING_OCCURRED_AT",
        "below0": "INSUFFICIENT_STOCK",
        "nul\0id": "INVALID_EVENT_ID",
        "nul-reason": "INVALID_REASON",
    }
    assert (p.applied, p.rejected) == (2, 8)
    assert await on_hand(admin, sku, wh) == 0

    replay = await sync_stock(admin, source, events, batch_size=3)
    assert {e.event_id: e.reason for e in replay.errors} == reasons
    assert (replay.applied, replay.duplicate, replay.rejected) == (0, 2, 8)


async def test_stream_must_start_with_the_source(admin: Entrepot) -> None:
    async def bad() -> AsyncIterator[pb.SyncStockRequest]:
        yield pb.SyncStockRequest(batch=pb.SyncBatch(batch_seq=1, events=[pb.SyncEvent(event_id="x")]))

    with pytest.raises(InvalidArgumentError) as err:
        async for _ in admin.inventory.sync_stock(bad()):
            pass
    assert err.value.reason == "SYNC_START_REQUIRED"

    with pytest.raises(InvalidArgumentError) as err:
        await sync_stock(admin, "", [ev("e", "S", "W", "set", 1)])
    assert err.value.reason == "INVALID_SOURCE"


async def test_sync_needs_its_permission(client_factory: Callable[..., Entrepot]) -> None:
    reader = client_factory(permissions=["inventory.read"])
    with pytest.raises(PermissionDeniedError):
        await sync_stock(reader, unique("wms"), [ev("e", "S", "W", "set", 1)])
    with pytest.raises(PermissionDeniedError):
        await reader.inventory.get_sync_cursor(pb.GetSyncCursorRequest(source="x"))


async def test_unknown_sku_policy_reject(admin: Entrepot, sessions: async_sessionmaker[AsyncSession]) -> None:
    wh = await make_warehouse(admin)
    source = unique("wms")
    known = unique("SKU")
    await admin.inventory.upsert_inventory_item(
        pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=known))
    )
    unknown = unique("SKU")
    async with sessions() as s, s.begin():
        r = await sync.apply_batch(
            s,
            source,
            [
                sync.SyncEvent("1", unknown, wh, "adjust", 3),
                sync.SyncEvent("2", known, wh, "adjust", 3),
            ],
            unknown_sku="reject",
        )
    assert (r.applied, r.rejected) == (1, 1)
    assert [(e.event_id, e.reason) for e in r.errors] == [("1", "UNKNOWN_SKU")]
    async with sessions() as s:
        assert (
            await s.execute(text("SELECT 1 FROM inventory.items WHERE sku = :s"), {"s": unknown})
        ).first() is None


async def test_backpressure_holds_the_adapter_while_the_server_is_slow(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """While the source's batches cannot commit (its cursor row is locked by
    another transaction: a very slow database), the server stops reading: the
    adapter's generator is not drained, and nothing is acked before commit."""
    wh = await make_warehouse(admin)
    source = unique("wms")
    await sync_stock(admin, source, [ev("warm", unique("SKU"), wh, "adjust", 1)])
    total = 150
    pulled = 0

    async def requests() -> AsyncIterator[pb.SyncStockRequest]:
        nonlocal pulled
        yield pb.SyncStockRequest(start=pb.SyncStart(source=source))
        for i in range(total):
            pulled += 1
            events = [
                pb.SyncEvent(
                    event_id=f"{i}-{j}",
                    sku=f"BP-{source}-{j % 10}",
                    warehouse_code=wh,
                    kind=pb.SYNC_EVENT_KIND_ADJUST,
                    quantity=1,
                    reason="x" * 1000,  # ~100 KB per batch: a few MB fill the HTTP/2 windows
                )
                for j in range(100)
            ]
            yield pb.SyncStockRequest(batch=pb.SyncBatch(batch_seq=i, events=events))

    acks = 0
    async with sessions() as blocker, blocker.begin():
        await blocker.execute(
            text("SELECT 1 FROM inventory.sync_sources WHERE source = :s FOR UPDATE"), {"s": source}
        )
        call = admin.inventory.sync_stock(requests())

        async def consume() -> None:
            nonlocal acks
            async for resp in call:
                if resp.WhichOneof("message") == "ack":
                    acks += 1

        task = asyncio.create_task(consume())
        await asyncio.sleep(2.0)
        held = pulled
        await asyncio.sleep(1.5)
        assert acks == 0
        # Bounded and stalled: in-flight batches plus what the HTTP/2 windows
        # hold (a few MB), then nothing more is pulled from the adapter.
        assert pulled == held
        assert held < total * 2 // 3, held
    await asyncio.wait_for(task, 60)
    assert acks == total
    assert pulled == total


async def test_the_example_csv_adapter_pushes_an_export_once(admin: Entrepot, tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("wms_csv_adapter", ROOT / "examples" / "wms_csv_adapter.py")
    assert spec is not None and spec.loader is not None
    adapter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adapter)
    wh = await make_warehouse(admin)
    path = str(tmp_path / "export.csv")
    adapter.write_sample(path, 3000, wh, 50, 3)
    source = unique("wms")
    first = await sync_stock(admin, source, adapter.read_events(path), batch_size=700)
    assert first.applied + first.stale + first.rejected == 3000
    cursor = await admin.inventory.get_sync_cursor(pb.GetSyncCursorRequest(source=source))
    # Resuming after the cursor finds nothing left in the file; resending it all applies nothing.
    assert list(adapter.read_events(path, cursor.last_event_id)) == []
    again = await sync_stock(admin, source, adapter.read_events(path), batch_size=700)
    assert (again.applied, again.duplicate) == (0, 3000 - first.rejected)


async def test_an_applied_event_is_claimed_by_its_one_ledger_row(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """The ledger row of an applied event is its claim: no second row for it in
    sync_events, and the database refuses a second sync row for the same source
    and event id (what keeps an event from applying twice)."""
    wh = await make_warehouse(admin)
    source = unique("wms")
    sku = unique("SKU")
    p = await sync_stock(
        admin, source, [ev("a1", sku, wh, "adjust", 4), ev("a2", sku, wh, "adjust", -9)], batch_size=10
    )
    assert (p.applied, p.rejected) == (1, 1)
    async with sessions() as s:
        claims = (
            await s.execute(
                text("SELECT event_id, outcome::text FROM inventory.sync_events WHERE source = :s"),
                {"s": source},
            )
        ).all()
        assert [tuple(r) for r in claims] == [("a2", "r")]
    with pytest.raises(IntegrityError, match="ux_ledger_sync_event"):
        async with sessions() as s, s.begin():
            await s.execute(
                text(
                    "INSERT INTO inventory.ledger (sku, warehouse_code, type, on_hand_before, on_hand_after,"
                    " reserved_before, reserved_after, source, reference)"
                    " VALUES (:sku, :wh, 'sync', 4, 5, 0, 0, :s, 'a1')"
                ),
                {"sku": sku, "wh": wh, "s": source},
            )
    again = await sync_stock(admin, source, [ev("a1", sku, wh, "adjust", 4)])
    assert (again.applied, again.duplicate) == (0, 1)
    assert await on_hand(admin, sku, wh) == 4
