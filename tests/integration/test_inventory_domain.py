"""Inventory domain against real PostgreSQL (no server): counters, ledger,
outbox, reservations, group commit. The gRPC-level tests are in
test_inventory_api.py."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain import inventory as inv
from domain.inventory import Adjustment, Cost, LineQuantity, LineRequest
from domain.platform import idempotency
from domain.shared.db import make_engine, make_session_factory
from domain.shared.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound
from tests.inventory_support import check_invariants, migrated_database
from tests.pg import drop_database


@pytest.fixture(scope="module")
def db_url() -> Iterator[str]:
    url, name = migrated_database()
    yield url
    drop_database(name)


@pytest.fixture(scope="module")
async def sessions(db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(db_url, pool_size=10, max_overflow=10)  # the server may be shared: stay modest
    yield make_session_factory(engine)
    await engine.dispose()


async def tx(sessions: async_sessionmaker[AsyncSession], fn):  # type: ignore[no-untyped-def]
    async with sessions() as s, s.begin():
        return await fn(s)


def sku() -> str:
    return f"SKU-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
async def warehouses(sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    codes = ["WH-A", "WH-B", "WH-C"]
    async with sessions() as s, s.begin():
        for prio, code in enumerate(codes):
            await inv.create_warehouse(
                s,
                code=code,
                name=f"Warehouse {code}",
                address={"country_code": "FR"},
                contact={},
                priority=prio,
            )
    return codes


async def new_item(sessions: async_sessionmaker[AsyncSession], stock: dict[str, int] | None = None, **policy):  # type: ignore[no-untyped-def]
    code = sku()
    async with sessions() as s, s.begin():
        await inv.upsert_item(s, sku=code, **policy)
        for wh, q in (stock or {}).items():
            await inv.set_stock(s, sku=code, warehouse_code=wh, quantity=q, reason="initial")
    return code


async def test_sku_is_nfc_normalised_and_validated(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    decomposed = "CAFE\u0301-1"
    async with sessions() as s, s.begin():
        item = await inv.upsert_item(s, sku=decomposed)
    assert item.sku == "CAF\u00c9-1"
    with pytest.raises(InvalidArgument) as err:
        await tx(sessions, lambda s: inv.upsert_item(s, sku="bad\nsku"))
    assert err.value.field_violations[0].field == "item.sku"
    with pytest.raises(InvalidArgument):
        await tx(sessions, lambda s: inv.upsert_item(s, sku="x" * 129))


async def test_concurrent_adjustments_match_the_ledger(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions, {"WH-A": 100})
    deltas = [random.choice([-3, -1, 2, 5]) for _ in range(60)]

    async def one(d: int) -> bool:
        try:
            await tx(
                sessions,
                lambda s: inv.adjust_stock(s, sku=code, warehouse_code="WH-A", delta=d, reason="count"),
            )
            return True
        except FailedPrecondition:
            return False

    ok = await asyncio.gather(*(one(d) for d in deltas))
    applied = sum(d for d, good in zip(deltas, ok, strict=True) if good)
    stock = await tx(sessions, lambda s: inv.get_stock_level(s, code))
    assert stock.on_hand == 100 + applied
    async with sessions() as s:
        ledger_sum = (
            await s.execute(
                text("SELECT sum(on_hand_delta) FROM inventory.ledger WHERE sku = :s"), {"s": code}
            )
        ).scalar_one()
        events = (
            await s.execute(
                text(
                    "SELECT count(*) FROM platform.outbox WHERE aggregate_id = :s AND topic = 'inventory.stock_changed'"
                ),
                {"s": code},
            )
        ).scalar_one()
        assert ledger_sum == stock.on_hand
        assert events == 1 + sum(ok)
        await check_invariants(s)


async def test_set_stock_with_a_stale_expected_value_is_refused(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions, {"WH-A": 7})
    change = await tx(
        sessions, lambda s: inv.set_stock(s, sku=code, warehouse_code="WH-A", quantity=9, expected_on_hand=7)
    )
    assert (change.movement.on_hand_before, change.movement.on_hand_after) == (7, 9)
    with pytest.raises(FailedPrecondition) as err:
        await tx(
            sessions,
            lambda s: inv.set_stock(s, sku=code, warehouse_code="WH-A", quantity=3, expected_on_hand=7),
        )
    assert err.value.reason == "STOCK_CHANGED"
    assert (await tx(sessions, lambda s: inv.get_stock_level(s, code))).on_hand == 9


async def test_decrease_below_reserved_is_refused_without_backorder(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions, {"WH-A": 5})
    await tx(sessions, lambda s: inv.reserve(s, [LineRequest(code, 4)], reference="order:1"))
    with pytest.raises(FailedPrecondition) as err:
        await tx(sessions, lambda s: inv.adjust_stock(s, sku=code, warehouse_code="WH-A", delta=-2))
    assert err.value.reason == "STOCK_RESERVED"
    with pytest.raises(FailedPrecondition) as err:
        await tx(sessions, lambda s: inv.adjust_stock(s, sku=code, warehouse_code="WH-A", delta=-6))
    assert err.value.reason == "INSUFFICIENT_STOCK"


async def test_bulk_adjust_is_all_or_nothing_and_reports_every_failing_line(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    a = await new_item(sessions, {"WH-A": 5})
    b = await new_item(sessions, {"WH-A": 1})
    lines = [
        Adjustment(a, "WH-A", -2, "ok"),
        Adjustment(b, "WH-A", -5, "too much"),
        Adjustment("NOPE-404", "WH-A", 1, "unknown"),
        Adjustment(a, "WH-B", 3, "ok"),
    ]
    with pytest.raises(FailedPrecondition) as err:
        await tx(sessions, lambda s: inv.bulk_adjust_stock(s, lines, reference="count-1"))
    subjects = [v.subject for v in err.value.precondition_violations]
    assert subjects == ["adjustments[1]", "adjustments[2]"]
    assert err.value.reason == "BULK_ADJUSTMENT_REFUSED"
    assert (await tx(sessions, lambda s: inv.get_stock_level(s, a))).on_hand == 5
    changes = await tx(sessions, lambda s: inv.bulk_adjust_stock(s, [lines[0], lines[3]]))
    assert [c.level.on_hand for c in changes] == [3, 3]


async def test_reserve_splits_across_warehouses_by_priority(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions, {"WH-A": 2, "WH-B": 3, "WH-C": 10})
    res = await tx(sessions, lambda s: inv.reserve(s, [LineRequest(code, 4)], reference="order:split"))
    assert [(x.warehouse_code, x.quantity) for x in res.lines] == [("WH-A", 2), ("WH-B", 2)]
    stock = await tx(sessions, lambda s: inv.get_stock_level(s, code))
    assert {lv.warehouse_code: lv.reserved for lv in stock.levels} == {"WH-A": 2, "WH-B": 2, "WH-C": 0}
    pinned = await tx(sessions, lambda s: inv.reserve(s, [LineRequest(code, 5, "WH-C")]))
    assert [(x.warehouse_code, x.quantity) for x in pinned.lines] == [("WH-C", 5)]


async def test_two_lines_of_one_sku_are_summed_and_refusal_leaves_nothing(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions, {"WH-A": 3})
    other = await new_item(sessions, {"WH-A": 10})
    with pytest.raises(FailedPrecondition) as err:
        await tx(
            sessions,
            lambda s: inv.reserve(s, [LineRequest(other, 2), LineRequest(code, 2), LineRequest(code, 2)]),
        )
    assert err.value.reason == "INSUFFICIENT_STOCK"
    (v,) = err.value.precondition_violations
    assert v.subject == code and "requested 4" in v.description and "available 3" in v.description
    for s_ in (code, other):
        assert (await tx(sessions, lambda s, s_=s_: inv.get_stock_level(s, s_))).reserved == 0
    async with sessions() as s:
        await check_invariants(s)


async def test_backorders_follow_the_item_policy(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions, {"WH-A": 2}, allow_backorder=True, max_backorder=3)
    res = await tx(sessions, lambda s: inv.reserve(s, [LineRequest(code, 5)], reference="bo"))
    assert res.backordered == 3 and [(x.warehouse_code, x.quantity) for x in res.lines] == [("WH-A", 5)]
    with pytest.raises(FailedPrecondition):
        await tx(sessions, lambda s: inv.reserve(s, [LineRequest(code, 1)]))
    untracked = await new_item(sessions, track_inventory=False)
    res2 = await tx(sessions, lambda s: inv.reserve(s, [LineRequest(untracked, 1000)]))
    assert res2.lines[0].quantity == 1000 and not res2.lines[0].tracked
    # Fulfilling backordered units waits for stock.
    with pytest.raises(FailedPrecondition) as err:
        await tx(sessions, lambda s: inv.fulfil(s, res.id))
    assert err.value.reason == "INSUFFICIENT_STOCK"
    await tx(
        sessions,
        lambda s: inv.receive_stock(
            s, sku=code, warehouse_code="WH-A", quantity=3, unit_cost=Cost(100, "EUR")
        ),
    )
    done = await tx(sessions, lambda s: inv.fulfil(s, res.id, reference="ship-1"))
    assert done.reservation.state == "fulfilled"
    async with sessions() as s:
        await check_invariants(s)


async def test_fulfil_consumes_lots_fifo_and_records_cost(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions)
    for q, cost in ((2, 100), (3, 150)):
        await tx(
            sessions,
            lambda s, q=q, cost=cost: inv.receive_stock(
                s,
                sku=code,
                warehouse_code="WH-A",
                quantity=q,
                unit_cost=Cost(cost, "EUR"),
                lot_code=f"L{cost}",
            ),
        )
    res = await tx(sessions, lambda s: inv.reserve(s, [LineRequest(code, 4)], reference="order:fifo"))
    done = await tx(sessions, lambda s: inv.fulfil(s, res.id, [LineQuantity(code, 3)], reference="ship-1"))
    (m,) = done.movements
    assert m.cost == Cost(2 * 100 + 1 * 150, "EUR")
    assert (m.on_hand_delta, m.reserved_delta) == (-3, -3)
    assert done.reservation.state == "active"
    # Partial fulfilment, then release the rest.
    rest = await tx(sessions, lambda s: inv.release(s, res.id, reason="cancelled"))
    assert rest.state == "released" and rest.lines[0].fulfilled == 3 and rest.lines[0].released == 1
    stock = await tx(sessions, lambda s: inv.get_stock_level(s, code))
    assert (stock.on_hand, stock.reserved) == (2, 0)
    # Releasing again never takes reserved below 0.
    again = await tx(sessions, lambda s: inv.release(s, res.id))
    assert again.state == "released"
    with pytest.raises(FailedPrecondition):
        await tx(sessions, lambda s: inv.release(s, res.id, [LineQuantity(code, 1)]))
    assert (await tx(sessions, lambda s: inv.get_stock_level(s, code))).reserved == 0
    moves, _ = await tx(
        sessions, lambda s: inv.list_movements(s, size=10, token="", sku=code, types=["fulfil"])
    )
    assert [mv.id for mv in moves] == [m.id]


async def test_expired_holds_are_released_by_the_sweeper(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions, {"WH-A": 5})
    res = await tx(
        sessions,
        lambda s: inv.reserve(s, [LineRequest(code, 2)], reference="cart:1", ttl=timedelta(milliseconds=200)),
    )
    keep = await tx(
        sessions, lambda s: inv.reserve(s, [LineRequest(code, 1)], reference="cart:2", ttl=timedelta(hours=1))
    )
    await asyncio.sleep(0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(inv.run_sweeper(sessions, stop, interval=0.05))
    for _ in range(100):
        if (await tx(sessions, lambda s: inv.get_reservation(s, res.id))).state == "expired":
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    got = await tx(sessions, lambda s: inv.get_reservation(s, res.id))
    assert got.state == "expired" and got.lines[0].released == 2
    assert (await tx(sessions, lambda s: inv.get_reservation(s, keep.id))).state == "active"
    assert (await tx(sessions, lambda s: inv.get_stock_level(s, code))).reserved == 1
    with pytest.raises(FailedPrecondition):
        await tx(sessions, lambda s: inv.extend(s, res.id, timedelta(minutes=5)))
    async with sessions() as s:
        await check_invariants(s)


async def test_a_cart_hold_becomes_the_order_reservation(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions, {"WH-A": 3})
    hold = await tx(
        sessions,
        lambda s: inv.reserve(s, [LineRequest(code, 2)], reference="cart:9", ttl=timedelta(minutes=5)),
    )
    order = await tx(sessions, lambda s: inv.retarget(s, hold.id, reference="order:9"))
    assert (order.reference, order.expires_at, order.state) == ("order:9", None, "active")
    assert (await tx(sessions, lambda s: inv.get_stock_level(s, code))).reserved == 2
    listed, _ = await tx(sessions, lambda s: inv.list_reservations(s, reference="order:9"))
    assert [r.id for r in listed] == [hold.id]
    await tx(sessions, lambda s: inv.release(s, hold.id))
    with pytest.raises(FailedPrecondition):
        await tx(sessions, lambda s: inv.retarget(s, hold.id, reference="order:10"))


async def test_naive_path_never_oversells(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions, {"WH-A": 10})

    async def one() -> bool:
        try:
            await tx(sessions, lambda s: inv.reserve(s, [LineRequest(code, 1)]))
            return True
        except FailedPrecondition:
            return False

    ok = await asyncio.gather(*(one() for _ in range(60)))
    assert sum(ok) == 10


async def test_batcher_grants_exactly_the_stock_and_keeps_idempotency(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions, {"WH-A": 6, "WH-B": 4})

    def encode(result: object) -> tuple[int, bytes]:
        return (9, b"refused") if isinstance(result, DomainError) else (0, str(result.id).encode())  # type: ignore[attr-defined]

    batcher = inv.ReserveBatcher(sessions, encode=encode)
    try:

        async def one(i: int) -> str:
            req = inv.reserve_request([LineRequest(code, 1)], reference=f"r{i}")
            claim = idempotency.Claim("tester", f"req-{i}", "ReserveStock", b"h%d" % i)
            try:
                got = await batcher.submit(req, claim)
            except FailedPrecondition as err:
                assert err.reason == "INSUFFICIENT_STOCK"
                return "short"
            assert isinstance(got, inv.Reservation)
            return str(got.id)

        out = await asyncio.gather(*(one(i) for i in range(200)))
        granted = [o for o in out if o != "short"]
        assert len(granted) == 10
        assert batcher.batches < 200  # coalesced
        stock = await tx(sessions, lambda s: inv.get_stock_level(s, code))
        assert (stock.on_hand, stock.reserved) == (10, 10)
        # Replays: the stored outcome comes back, nothing new is reserved.
        winner = out.index(granted[0])
        replay = await batcher.submit(
            inv.reserve_request([LineRequest(code, 1)], reference=f"r{winner}"),
            idempotency.Claim("tester", f"req-{winner}", "ReserveStock", b"h%d" % winner),
        )
        assert isinstance(replay, idempotency.StoredResponse) and replay.response == granted[0].encode()
        loser = out.index("short")
        replay2 = await batcher.submit(
            inv.reserve_request([LineRequest(code, 1)]),
            idempotency.Claim("tester", f"req-{loser}", "ReserveStock", b"x"),
        )
        assert (
            isinstance(replay2, idempotency.StoredResponse)
            and replay2.status_code == 9
            and replay2.request_hash != b"x"
        )
        assert (await tx(sessions, lambda s: inv.get_stock_level(s, code))).reserved == 10
    finally:
        await batcher.close()
    async with sessions() as s:
        await check_invariants(s)


async def test_batcher_hands_back_the_stored_response(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions, {"WH-A": 2})

    def encode(result: object) -> tuple[int, bytes]:
        return (9, b"refused") if isinstance(result, DomainError) else (0, b"id:" + str(result.id).encode())  # type: ignore[attr-defined]

    batcher = inv.ReserveBatcher(sessions, encode=encode)
    try:
        key = f"enc-{uuid.uuid4().hex}"
        got = await batcher.submit_encoded(
            inv.reserve_request([LineRequest(code, 1)]),
            idempotency.Claim("tester", key, "ReserveStock", b"h"),
        )
        assert isinstance(got, inv.Executed)
        assert got.response == b"id:" + str(got.reservation.id).encode()
        # Without a key nothing is stored, so there are no bytes to hand back.
        plain = await batcher.submit_encoded(inv.reserve_request([LineRequest(code, 1)]))
        assert isinstance(plain, inv.Executed) and plain.response is None
        # A replay gets the very bytes the first call got.
        replay = await batcher.submit_encoded(
            inv.reserve_request([LineRequest(code, 1)]),
            idempotency.Claim("tester", key, "ReserveStock", b"h"),
        )
        assert isinstance(replay, idempotency.StoredResponse) and replay.response == got.response
    finally:
        await batcher.close()


async def test_batcher_recovers_when_its_connection_is_killed(sessions, warehouses, db_url) -> None:  # type: ignore[no-untyped-def]
    # The reserve statements run on the asyncpg connection under the session, where
    # SQLAlchemy does not see their errors: a dead connection must still leave the pool.
    code = await new_item(sessions, {"WH-A": 10})
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    batcher = inv.ReserveBatcher(make_session_factory(engine))
    try:
        assert isinstance(await batcher.submit(inv.reserve_request([LineRequest(code, 1)])), inv.Reservation)
        async with make_session_factory(engine)() as s:
            pid = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with sessions() as s:
            assert (await s.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})).scalar_one()
        outcomes = []
        for _ in range(3):
            try:
                outcomes.append(
                    type(await batcher.submit(inv.reserve_request([LineRequest(code, 1)]))).__name__
                )
            except Exception as exc:  # the call that meets the dead connection fails (UNAVAILABLE upstream)
                outcomes.append(type(exc).__name__)
        assert outcomes[1:] == ["Reservation", "Reservation"], outcomes
    finally:
        await batcher.close()
        await engine.dispose()
    async with sessions() as s:
        await check_invariants(s)


async def test_two_batchers_on_separate_engines_never_oversell(sessions, warehouses, db_url) -> None:  # type: ignore[no-untyped-def]
    # Two "server processes": separate engines (connections) and batchers, one database,
    # mixed with naive single-call transactions.
    code = await new_item(sessions, {"WH-A": 7, "WH-B": 3})
    engines = [make_engine(db_url, pool_size=4, max_overflow=0) for _ in range(2)]
    batchers = [inv.ReserveBatcher(make_session_factory(e)) for e in engines]

    async def one(i: int) -> bool:
        try:
            if i % 5 == 0:
                await tx(sessions, lambda s: inv.reserve(s, [LineRequest(code, 1)]))
            else:
                await batchers[i % 2].submit(inv.reserve_request([LineRequest(code, 1)]))
            return True
        except FailedPrecondition:
            return False

    try:
        ok = await asyncio.gather(*(one(i) for i in range(200)))
    finally:
        for b in batchers:
            await b.close()
        for e in engines:
            await e.dispose()
    assert sum(ok) == 10
    stock = await tx(sessions, lambda s: inv.get_stock_level(s, code))
    assert (stock.on_hand, stock.reserved) == (10, 10)
    async with sessions() as s:
        await check_invariants(s)


async def test_lists_paginate_and_filter(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    prefix = f"PG{uuid.uuid4().hex[:6]}-"
    async with sessions() as s, s.begin():
        for i in range(7):
            await inv.upsert_item(s, sku=f"{prefix}{i}", low_stock_threshold=3)
            await inv.set_stock(s, sku=f"{prefix}{i}", warehouse_code="WH-A", quantity=i)
    seen, token = [], ""
    while True:
        page, token = await tx(
            sessions, lambda s, t=token: inv.list_stock_levels(s, size=3, token=t, sku_prefix=prefix)
        )
        seen += [lv.sku for lv in page]
        if not token:
            break
    assert seen == [f"{prefix}{i}" for i in range(7)]
    below, _ = await tx(
        sessions,
        lambda s: inv.list_stock_levels(s, size=50, token="", sku_prefix=prefix, below_threshold_only=True),
    )
    assert [lv.sku for lv in below] == [f"{prefix}{i}" for i in range(4)]
    with pytest.raises(InvalidArgument):
        await tx(
            sessions, lambda s: inv.list_stock_levels(s, size=3, token=token or "garbage", sku_prefix="x")
        )
    stocks, missing = await tx(
        sessions, lambda s: inv.batch_get_stock_levels(s, [f"{prefix}1", "nope", f"{prefix}1"])
    )
    assert [st.sku for st in stocks] == [f"{prefix}1"] and missing == ["nope"]
    with pytest.raises(NotFound):
        await tx(sessions, lambda s: inv.get_stock_level(s, "nope"))


async def test_short_soak_keeps_every_invariant(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    import os
    import time

    seconds = float(os.environ.get("ENTREPOT_SOAK_SECONDS", "2"))
    skus = [
        await new_item(sessions, {"WH-A": 5, "WH-B": 5}, allow_backorder=(i % 5 == 0), max_backorder=4)
        for i in range(20)
    ]
    batcher = inv.ReserveBatcher(sessions)
    open_ids: list[uuid.UUID] = []
    refusals: list[int] = []
    deadline = time.monotonic() + seconds

    async def worker(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < deadline:
            op = rnd.random()
            try:
                if op < 0.35:
                    lines = [
                        LineRequest(rnd.choice(skus), rnd.randint(1, 3)) for _ in range(rnd.randint(1, 3))
                    ]
                    ttl = timedelta(milliseconds=rnd.randint(50, 400)) if rnd.random() < 0.3 else None
                    if rnd.random() < 0.5:
                        got = await batcher.submit(inv.reserve_request(lines, ttl=ttl))
                        assert isinstance(got, inv.Reservation)
                        open_ids.append(got.id)
                    else:
                        r = await tx(sessions, lambda s, lines=lines, ttl=ttl: inv.reserve(s, lines, ttl=ttl))
                        open_ids.append(r.id)
                elif op < 0.5 and open_ids:
                    rid = rnd.choice(open_ids)
                    await tx(sessions, lambda s, rid=rid: inv.release(s, rid))
                elif op < 0.65 and open_ids:
                    rid = rnd.choice(open_ids)
                    await tx(sessions, lambda s, rid=rid: inv.fulfil(s, rid))
                elif op < 0.85:
                    await tx(
                        sessions,
                        lambda s: inv.adjust_stock(
                            s,
                            sku=rnd.choice(skus),
                            warehouse_code=rnd.choice(["WH-A", "WH-B"]),
                            delta=rnd.choice([-2, -1, 1, 3]),
                        ),
                    )
                else:
                    await tx(sessions, lambda s: inv.sweep_expired(s, 50))
            except (FailedPrecondition, NotFound):
                refusals.append(1)  # expected under random load; invariants are checked below

    await asyncio.gather(*(worker(i) for i in range(12)))
    await batcher.close()
    await asyncio.sleep(0.45)
    await tx(sessions, lambda s: inv.sweep_expired(s, 10_000))
    async with sessions() as s:
        assert await check_invariants(s) >= 40


async def test_retarget_waiting_on_a_partial_release_returns_the_lines_after_it(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    # retarget reads the lines in its UPDATE's snapshot; when it had to wait for
    # another transaction that changed them, it must not return the old lines.
    code = await new_item(sessions, {"WH-A": 5})
    hold = await tx(
        sessions,
        lambda s: inv.reserve(s, [LineRequest(code, 3)], reference="cart:11", ttl=timedelta(minutes=5)),
    )
    async with sessions() as a, a.begin():
        await inv.release(a, hold.id, [LineQuantity(code, 1)], reason="partial")
        waiting = asyncio.create_task(tx(sessions, lambda s: inv.retarget(s, hold.id, reference="order:11")))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # blocked on the reservation row
    moved = await waiting
    assert moved.reference == "order:11" and moved.expires_at is None
    assert [(x.quantity, x.released, x.open_quantity) for x in moved.lines] == [(3, 1, 2)]
    assert moved == await tx(sessions, lambda s: inv.get_reservation(s, hold.id))


async def test_retarget_refuses_expired_missing_and_closed_holds(sessions, warehouses) -> None:  # type: ignore[no-untyped-def]
    code = await new_item(sessions, {"WH-A": 5})
    hold = await tx(
        sessions,
        lambda s: inv.reserve(s, [LineRequest(code, 1)], reference="cart:12", ttl=timedelta(minutes=5)),
    )
    async with sessions() as s, s.begin():
        await s.execute(
            text("UPDATE inventory.reservations SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": hold.id},
        )
    with pytest.raises(FailedPrecondition) as expired:
        await tx(sessions, lambda s: inv.retarget(s, hold.id, reference="order:12"))
    assert expired.value.reason == "RESERVATION_EXPIRED"
    with pytest.raises(NotFound):
        await tx(sessions, lambda s: inv.retarget(s, uuid.uuid4(), reference="order:12"))
    await tx(sessions, lambda s: inv.release(s, hold.id))
    with pytest.raises(FailedPrecondition) as closed:
        await tx(sessions, lambda s: inv.retarget(s, hold.id, reference="order:12"))
    assert closed.value.reason == "RESERVATION_NOT_ACTIVE"
    # Nothing moved: the hold kept its reference.
    assert (await tx(sessions, lambda s: inv.get_reservation(s, hold.id))).reference == "cart:12"


async def test_counter_updates_can_stay_heap_only(sessions) -> None:  # type: ignore[no-untyped-def]
    """Every reservation and sync event updates a stock level; PostgreSQL can skip
    the index writes (a HOT update) only while no index reads the counters, and
    only with free room on the page. An index on on_hand/reserved (even in a
    partial index's predicate) would make every one of those updates touch every
    index again (inventory_0003)."""
    async with sessions() as s:
        defs = (
            (
                await s.execute(
                    text(
                        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'inventory' AND tablename = 'stock_levels'"
                    )
                )
            )
            .scalars()
            .all()
        )
        options = (
            await s.execute(
                text("SELECT reloptions FROM pg_class WHERE oid = 'inventory.stock_levels'::regclass")
            )
        ).scalar_one()
    assert defs, "stock_levels has its primary key at least"
    assert [d for d in defs if any(c in d for c in ("on_hand", "reserved", "updated_at"))] == []
    assert "fillfactor=70" in (options or [])
