"""AuditStock / RepairStock through real gRPC against real PostgreSQL, after an
operator corrupted counters directly in SQL; the leased audit job's gauge; the
`entrepot audit` command as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.inventory.audit import SCAN_BUDGET, SCAN_CHUNK
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.platform.v1 import types_pb2
from entrepot_client import Entrepot, FailedPreconditionError, InvalidArgumentError, PermissionDeniedError
from entrepot_client.inventory import audit, repair
from server import background
from server.app import App
from tests.conftest import unique
from tests.integration.test_inventory_api import make_item, make_warehouse, reserve
from tests.procs import ROOT

Sessions = async_sessionmaker[AsyncSession]
ON_HAND, RESERVED, LOTS = pb.STOCK_DRIFT_KIND_ON_HAND, pb.STOCK_DRIFT_KIND_RESERVED, pb.STOCK_DRIFT_KIND_LOTS


async def sql(sessions: Sessions, statement: str, **params: object) -> None:
    """What an operator does by hand: a direct UPDATE, committed."""
    async with sessions() as s:
        await s.execute(text(statement), params)
        await s.commit()


async def figures(sessions: Sessions, sku: str, wh: str) -> tuple[int, int, int, int, int, int]:
    """(on_hand, reserved, ledger on_hand sum, ledger reserved sum, open holds, lots remaining)."""
    async with sessions() as s:
        row = (
            await s.execute(
                text(
                    """SELECT s.on_hand, s.reserved,
                      (SELECT coalesce(sum(on_hand_delta), 0) FROM inventory.ledger l
                       WHERE l.sku = s.sku AND l.warehouse_code = s.warehouse_code),
                      (SELECT coalesce(sum(reserved_delta), 0) FROM inventory.ledger l
                       WHERE l.sku = s.sku AND l.warehouse_code = s.warehouse_code),
                      (SELECT coalesce(sum(quantity - fulfilled - released), 0)
                       FROM inventory.reservation_lines rl JOIN inventory.reservations r ON r.id = rl.reservation_id
                       WHERE r.state = 'active' AND rl.tracked AND rl.sku = s.sku
                         AND rl.warehouse_code = s.warehouse_code),
                      (SELECT coalesce(sum(remaining_quantity), 0) FROM inventory.lots x
                       WHERE x.sku = s.sku AND x.warehouse_code = s.warehouse_code)
                    FROM inventory.stock_levels s WHERE s.sku = :sku AND s.warehouse_code = :wh"""
                ),
                {"sku": sku, "wh": wh},
            )
        ).one()
    return tuple(int(x) for x in row)  # type: ignore[return-value]


def assert_consistent(f: tuple[int, int, int, int, int, int]) -> None:
    on_hand, reserved, ledger_on_hand, ledger_reserved, open_holds, lots = f
    assert on_hand == ledger_on_hand and reserved == ledger_reserved == open_holds and lots <= on_hand, f


async def ledger_rows(sessions: Sessions, skus: list[str]) -> tuple[int, int]:
    """(ledger rows, stock_changed events) of these SKUs."""
    async with sessions() as s:
        row = (
            await s.execute(
                text(
                    """SELECT (SELECT count(*) FROM inventory.ledger WHERE sku = ANY(:skus)),
                              (SELECT count(*) FROM platform.outbox WHERE topic = 'inventory.stock_changed'
                               AND aggregate_id = ANY(:skus))"""
                ),
                {"skus": skus},
            )
        ).one()
    return int(row[0]), int(row[1])


def drift_set(drifts: list[pb.StockDrift]) -> set[tuple[str, str, int, int, int, int]]:
    return {(d.sku, d.warehouse_code, d.kind, d.counter, d.derived, d.difference) for d in drifts}


async def receive(ep: Entrepot, sku: str, wh: str, q: int, cost: int = 250) -> None:
    await ep.inventory.receive_stock(
        pb.ReceiveStockRequest(
            sku=sku,
            warehouse_code=wh,
            quantity=q,
            unit_cost=types_pb2.Money(currency_code="EUR", amount_minor=cost),
            request_id=uuid.uuid4().hex,
        )
    )


async def test_audit_finds_exactly_the_corrupted_counters_and_repair_restores_the_invariants(
    admin: Entrepot, sessions: Sessions
) -> None:
    wh = await make_warehouse(admin)
    a = await make_item(admin, {wh: 20})  # on_hand edited by hand
    b = await make_item(admin, {wh: 20})  # reserved edited by hand
    c = await make_item(admin)  # on_hand "restored" below its lots
    d = await make_item(admin, {wh: 20})  # busy but untouched: must not be reported
    await receive(admin, c, wh, 10)
    await admin.inventory.reserve_stock(reserve(b, 3, wh=wh))
    held = await admin.inventory.reserve_stock(reserve(d, 4, wh=wh))
    await admin.inventory.fulfill_reservation(pb.FulfillReservationRequest(id=held.id, request_id="f-" + d))
    await admin.inventory.reserve_stock(reserve(d, 2, wh=wh))
    skus = [a, b, c, d]

    assert [x async for x in audit(admin, skus=skus)] == []

    await sql(sessions, "UPDATE inventory.stock_levels SET on_hand = on_hand + 5 WHERE sku = :s", s=a)
    await sql(sessions, "UPDATE inventory.stock_levels SET reserved = 7 WHERE sku = :s", s=b)
    await sql(sessions, "UPDATE inventory.stock_levels SET on_hand = 6 WHERE sku = :s", s=c)
    rows_before = await ledger_rows(sessions, skus)

    found = [x async for x in audit(admin, skus=skus)]
    assert drift_set(found) == {
        (a, wh, ON_HAND, 25, 20, 5),
        (b, wh, RESERVED, 7, 3, 4),
        (c, wh, ON_HAND, 6, 10, -4),
        (c, wh, LOTS, 10, 6, 4),
    }
    # Reading is all an audit does.
    assert await ledger_rows(sessions, skus) == rows_before

    done = {}
    for drift in found:
        done[(drift.sku, drift.kind)] = r = await repair(admin, drift, reason="backup restored by hand")
        assert r.repaired and r.movement.type == pb.MOVEMENT_TYPE_AUDIT
        assert r.movement.actor and r.movement.source == "audit"
        assert r.movement.reason.startswith("backup restored by hand")
    # on_hand: the counter stays; the ledger records the change nobody recorded.
    m = done[(a, ON_HAND)].movement
    assert (m.on_hand_before, m.on_hand_after, m.on_hand_delta, m.reserved_delta) == (20, 25, 5, 0)
    # reserved: restored to the open holds, from the ledger's figure.
    m, lv = done[(b, RESERVED)].movement, done[(b, RESERVED)].level
    assert (m.reserved_before, m.reserved_after, m.on_hand_delta, lv.reserved) == (3, 3, 0, 3)
    # lots: 4 units written off the lot, costed, counters unchanged.
    m = done[(c, LOTS)].movement
    assert (m.on_hand_delta, m.reserved_delta, m.cost.amount_minor) == (0, 0, 4 * 250)

    for sku in skus:
        assert_consistent(await figures(sessions, sku, wh))
    assert [x async for x in audit(admin, skus=skus)] == []
    rows, events = await ledger_rows(sessions, skus)
    assert rows == events == rows_before[0] + 4  # one movement and one event per repair

    # Repairing again (new request ids, the same audited figures) changes nothing.
    for drift in found:
        again = await repair(admin, drift, reason="once more")
        assert not again.repaired and not again.HasField("movement") and again.drift.difference == 0
    assert await ledger_rows(sessions, skus) == (rows, events)

    # The same request id answers the first repair again.
    rid = uuid.uuid4().hex
    await sql(sessions, "UPDATE inventory.stock_levels SET reserved = 1 WHERE sku = :s", s=b)
    (drift,) = [x async for x in audit(admin, skus=[b])]
    first = await repair(admin, drift, reason="again", request_id=rid)
    assert first.repaired and await repair(admin, drift, reason="again", request_id=rid) == first
    assert_consistent(await figures(sessions, b, wh))


async def test_repair_with_stale_expected_values_is_refused_and_writes_nothing(
    admin: Entrepot, sessions: Sessions
) -> None:
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 10})
    await sql(sessions, "UPDATE inventory.stock_levels SET on_hand = 13 WHERE sku = :s", s=sku)
    (drift,) = [x async for x in audit(admin, skus=[sku])]
    assert (drift.counter, drift.derived) == (13, 10)
    # The level moves after the audit (the drift itself is unchanged: 3).
    await admin.inventory.adjust_stock(pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=2))
    before = await ledger_rows(sessions, [sku])
    with pytest.raises(FailedPreconditionError) as err:
        await repair(admin, drift, reason="stale")
    assert err.value.reason == "STOCK_CHANGED"
    assert err.value.metadata["counter"] == "15" and err.value.metadata["derived"] == "12"
    assert err.value.precondition_violations[0].subject == f"{sku}/{wh}"
    assert await ledger_rows(sessions, [sku]) == before
    # Audited again, the repair goes through.
    (fresh,) = [x async for x in audit(admin, skus=[sku])]
    assert (await repair(admin, fresh, reason="recounted")).repaired
    assert_consistent(await figures(sessions, sku, wh))


async def test_audit_pages_through_a_warehouse_and_refuses_bad_input(
    admin: Entrepot, sessions: Sessions
) -> None:
    wh = await make_warehouse(admin)
    skus = sorted([await make_item(admin, {wh: 5}) for _ in range(12)])
    corrupted = [*skus[::2], skus[1]]
    for sku in corrupted:
        await sql(sessions, "UPDATE inventory.stock_levels SET on_hand = on_hand + 1 WHERE sku = :s", s=sku)
    pages, token, seen = 0, "", []
    while True:
        page = await admin.inventory.audit_stock(
            pb.AuditStockRequest(warehouse_codes=[wh], page_size=3, page_token=token)
        )
        assert len(page.drifts) <= 3
        seen += list(page.drifts)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert sorted(d.sku for d in seen) == sorted(corrupted) and pages >= 3
    assert {d.kind for d in seen} == {ON_HAND}
    # Only the kinds asked for.
    none = await admin.inventory.audit_stock(pb.AuditStockRequest(warehouse_codes=[wh], kinds=[RESERVED]))
    assert list(none.drifts) == [] and none.levels_checked == 12
    # A token belongs to its filters.
    first = await admin.inventory.audit_stock(pb.AuditStockRequest(warehouse_codes=[wh], page_size=1))
    with pytest.raises(InvalidArgumentError) as err:
        await admin.inventory.audit_stock(pb.AuditStockRequest(page_token=first.next_page_token))
    assert err.value.reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(InvalidArgumentError):
        await admin.inventory.audit_stock(pb.AuditStockRequest(skus=[" padded "]))
    with pytest.raises(InvalidArgumentError):
        await admin.inventory.audit_stock(pb.AuditStockRequest(kinds=[pb.STOCK_DRIFT_KIND_UNSPECIFIED]))
    with pytest.raises(InvalidArgumentError) as err:
        await admin.inventory.repair_stock(
            pb.RepairStockRequest(sku=skus[0], warehouse_code=wh, kind=ON_HAND, request_id=uuid.uuid4().hex)
        )
    assert {v.field for v in err.value.field_violations} == {"reason"}
    for sku in corrupted:
        (d,) = [x async for x in audit(admin, skus=[sku])]
        assert (await repair(admin, d, reason="page test")).repaired


async def test_audit_pages_count_every_level_once_across_scan_chunks(
    admin: Entrepot, sessions: Sessions
) -> None:
    """Levels that agree are not sent back to the server (audit_store.figures_page): the
    pages' drifts and levels_checked must still be exact where drifts sit at the first and
    last level of a scan chunk, a page ends inside a chunk, and a call stops at its budget."""
    wh = await make_warehouse(admin)
    n = SCAN_BUDGET + 100
    prefix = unique("AUD").upper()
    skus = [f"{prefix}-{i:05d}" for i in range(n)]
    await sql(
        sessions,
        "INSERT INTO inventory.items (sku) SELECT unnest(CAST(:s AS text[]))",
        s=skus,
    )
    # Zero counters and no ledger rows: every level agrees until corrupted below.
    await sql(
        sessions,
        "INSERT INTO inventory.stock_levels (sku, warehouse_code) SELECT unnest(CAST(:s AS text[])), :wh",
        s=skus,
        wh=wh,
    )
    places = [0, 1, SCAN_CHUNK - 1, SCAN_CHUNK, SCAN_CHUNK + 7, 2 * SCAN_CHUNK - 1, SCAN_BUDGET, n - 1]
    corrupted = [skus[i] for i in places]
    await sql(
        sessions,
        "UPDATE inventory.stock_levels SET on_hand = 3 WHERE sku = ANY(CAST(:s AS text[]))",
        s=corrupted,
    )
    try:
        for size in (2, 500):
            token, seen, checked = "", [], 0
            while True:
                page = await admin.inventory.audit_stock(
                    pb.AuditStockRequest(warehouse_codes=[wh], page_size=size, page_token=token)
                )
                assert len(page.drifts) <= size
                seen += [d.sku for d in page.drifts]
                checked += page.levels_checked
                token = page.next_page_token
                if not token:
                    break
            assert seen == corrupted and checked == n, size
        # Only the kinds asked for: none drifting; a call checks at most its budget of levels.
        first = await admin.inventory.audit_stock(
            pb.AuditStockRequest(warehouse_codes=[wh], kinds=[RESERVED])
        )
        assert list(first.drifts) == [] and first.levels_checked == SCAN_BUDGET and first.next_page_token
        rest = await admin.inventory.audit_stock(
            pb.AuditStockRequest(warehouse_codes=[wh], kinds=[RESERVED], page_token=first.next_page_token)
        )
        assert list(rest.drifts) == [] and rest.levels_checked == n - SCAN_BUDGET and not rest.next_page_token
    finally:
        await sql(
            sessions,
            "UPDATE inventory.stock_levels SET on_hand = 0 WHERE sku = ANY(CAST(:s AS text[]))",
            s=corrupted,
        )


async def test_audit_and_repair_need_inventory_admin(client_factory: Callable[..., Entrepot]) -> None:
    writer = client_factory(permissions=["inventory.read", "inventory.write"])
    with pytest.raises(PermissionDeniedError):
        await writer.inventory.audit_stock(pb.AuditStockRequest())
    with pytest.raises(PermissionDeniedError):
        await writer.inventory.repair_stock(pb.RepairStockRequest(request_id="x"))


def gauge(kind: str) -> float:
    value = REGISTRY.get_sample_value("entrepot_stock_drift", {"kind": kind})
    assert value is not None
    return value


async def test_the_leased_audit_job_exports_drift_per_kind(
    app: App, admin: Entrepot, sessions: Sessions
) -> None:
    # The app ran the job once at start, under its lease.
    async with sessions() as s:
        holder = (
            await s.execute(text("SELECT holder FROM platform.leases WHERE name = 'stock-audit'"))
        ).scalar_one()
    assert holder == app.holder
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 8})
    await background._stock_audit_step(app.rt)
    base = {k: gauge(k) for k in ("on_hand", "reserved", "lots")}
    await sql(sessions, "UPDATE inventory.stock_levels SET on_hand = 9, reserved = 2 WHERE sku = :s", s=sku)
    await background._stock_audit_step(app.rt)
    assert {k: gauge(k) - base[k] for k in base} == {"on_hand": 1, "reserved": 1, "lots": 0}
    for d in [x async for x in audit(admin, skus=[sku])]:
        await repair(admin, d, reason="gauge test")
    await background._stock_audit_step(app.rt)
    assert {k: gauge(k) for k in base} == base


def entrepot_audit(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "audit", *args],
        env={**os.environ, "DATABASE_URL": database_url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_entrepot_audit_prints_one_line_per_drift_and_exits_non_zero(
    admin: Entrepot, sessions: Sessions, database_url: str
) -> None:
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 4})
    await admin.inventory.reserve_stock(reserve(sku, 1, wh=wh))
    clean = entrepot_audit(database_url, "--sku", sku)
    assert clean.returncode == 0 and clean.stdout == "1 stock levels checked, 0 drifts\n", clean.stderr

    await sql(sessions, "UPDATE inventory.stock_levels SET on_hand = 3, reserved = 0 WHERE sku = :s", s=sku)
    found = entrepot_audit(database_url, "--sku", sku, "--warehouse", wh)
    assert found.returncode == 2, found.stderr
    assert found.stdout.splitlines() == [
        f"drift on_hand: {sku} in {wh}: on_hand 3 but the ledger sums to 4 (-1)",
        f"drift reserved: {sku} in {wh}: reserved 0 but active reservations hold 1 (-1)",
        "1 stock levels checked, 2 drifts",
    ]

    bad = entrepot_audit(database_url, "--sku", " padded ")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "skus[0]" in bad.stderr
    assert entrepot_audit(database_url, "--sku", sku, "--repair").returncode == 1

    fixed = entrepot_audit(database_url, "--sku", sku, "--repair", "--reason", "cli test")
    assert fixed.returncode == 0 and fixed.stdout.count("repaired: audit movement") == 2, fixed.stdout
    assert entrepot_audit(database_url, "--sku", sku).returncode == 0
    assert_consistent(await figures(sessions, sku, wh))
