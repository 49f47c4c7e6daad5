"""The stock audit's per-level ledger checkpoints (inventory.ledger_checkpoints), against
real PostgreSQL: what the audit job (advance_checkpoints) writes, that a checkpoint never
hides a drift of the counters, that writers racing the audit leave no false drift, and
what only a whole-ledger audit (AuditStock.whole_ledger, `entrepot audit --whole-ledger`,
the job's periodic full re-sum) finds: an old ledger row edited by hand."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain import inventory
from domain.inventory import ledger, sync
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client import Entrepot, FailedPreconditionError
from entrepot_client.inventory import audit, repair
from entrepot_client.streams import StockEvent, sync_stock
from tests.conftest import unique
from tests.integration.test_inventory_api import make_item, make_warehouse, reserve
from tests.integration.test_stock_audit import (
    ON_HAND,
    assert_consistent,
    drift_set,
    entrepot_audit,
    figures,
    sql,
)
from tests.inventory_support import check_invariants

Sessions = async_sessionmaker[AsyncSession]
DAY = timedelta(days=1)


async def job_audit(
    sessions: Sessions, skus: list[str], full_after: timedelta = DAY
) -> list[inventory.Drift]:
    """What the audit job runs (server/background.py), on these SKUs only: every page
    in its own committed transaction, moving the checkpoints along."""

    return [
        d
        async for page in inventory.checkpointing_audit(sessions, full_after=full_after, skus=skus)
        for d in page.drifts
    ]


async def checkpoints(sessions: Sessions, skus: list[str]) -> dict[tuple[str, str], Any]:
    """Each level's checkpoint next to the ledger's sums through its id, recomputed now,
    and the level's last ledger id."""
    async with sessions() as s:
        rows = (
            await s.execute(
                text(
                    """SELECT c.sku, c.warehouse_code, c.through_id, c.on_hand, c.reserved, c.resummed_at,
                          (SELECT coalesce(sum(on_hand_delta), 0) FROM inventory.ledger l
                           WHERE l.sku = c.sku AND l.warehouse_code = c.warehouse_code
                             AND l.id <= c.through_id) AS ledger_on_hand,
                          (SELECT coalesce(sum(reserved_delta), 0) FROM inventory.ledger l
                           WHERE l.sku = c.sku AND l.warehouse_code = c.warehouse_code
                             AND l.id <= c.through_id) AS ledger_reserved,
                          (SELECT max(id) FROM inventory.ledger l
                           WHERE l.sku = c.sku AND l.warehouse_code = c.warehouse_code) AS last_id
                   FROM inventory.ledger_checkpoints c WHERE c.sku = ANY(:skus)"""
                ),
                {"skus": skus},
            )
        ).all()
    return {(r.sku, r.warehouse_code): r for r in rows}


async def edit_ledger_row(sessions: Sessions, ledger_id: int, on_hand_change: int) -> None:
    """What a restore tool does: writes an old ledger row with the table's triggers off."""
    async with sessions() as s:
        await s.execute(text("SET LOCAL session_replication_role = replica"))
        await s.execute(
            text("UPDATE inventory.ledger SET on_hand_after = on_hand_after + :d WHERE id = :id"),
            {"d": on_hand_change, "id": ledger_id},
        )
        await s.commit()


async def first_ledger_id(sessions: Sessions, sku: str) -> int:
    async with sessions() as s:
        return int(
            (
                await s.execute(text("SELECT min(id) FROM inventory.ledger WHERE sku = :s"), {"s": sku})
            ).scalar_one()
        )


async def test_the_job_checkpoints_each_level_and_later_rows_and_counter_edits_still_count(
    admin: Entrepot, sessions: Sessions
) -> None:
    wh = await make_warehouse(admin)
    a = await make_item(admin, {wh: 20})
    b = await make_item(admin, {wh: 10})
    await admin.inventory.reserve_stock(reserve(a, 3, wh=wh))
    assert await job_audit(sessions, [a, b]) == []
    cps = await checkpoints(sessions, [a, b])
    assert set(cps) == {(a, wh), (b, wh)}
    for cp in cps.values():
        assert cp.through_id == cp.last_id
        assert (cp.on_hand, cp.reserved) == (cp.ledger_on_hand, cp.ledger_reserved)
    assert (cps[(a, wh)].on_hand, cps[(a, wh)].reserved) == (20, 3)

    # Movements after the checkpoint: the audit adds them (no drift), and the job moves
    # the checkpoint past them.
    await admin.inventory.adjust_stock(pb.AdjustStockRequest(sku=a, warehouse_code=wh, delta=4))
    await admin.inventory.reserve_stock(reserve(a, 2, wh=wh))
    assert [x async for x in audit(admin, skus=[a, b])] == []
    assert await job_audit(sessions, [a, b]) == []
    cp = (await checkpoints(sessions, [a]))[(a, wh)]
    assert cp.through_id == cp.last_id > cps[(a, wh)].through_id
    assert (cp.on_hand, cp.reserved) == (24, 5)

    # A counter edited by hand after the checkpoint: the checkpoint is the ledger's, so
    # the drift shows, in the RPC's audit and in the job's.
    await sql(sessions, "UPDATE inventory.stock_levels SET on_hand = on_hand + 3 WHERE sku = :s", s=b)
    expected = {(b, wh, ON_HAND, 13, 10, 3)}
    assert drift_set([x async for x in audit(admin, skus=[a, b])]) == expected
    assert {(d.sku, d.kind, d.counter, d.derived) for d in await job_audit(sessions, [a, b])} == {
        (b, "on_hand", 13, 10)
    }
    # And still after the job ran again (it found nothing new to add to b's checkpoint).
    assert drift_set([x async for x in audit(admin, skus=[b])]) == expected

    # A ledger row written after the checkpoint by hand (no counter change) is counted.
    async with sessions() as s:
        await ledger.write(
            s,
            [
                ledger.Draft(
                    sku=a, warehouse_code=wh, type="adjust", on_hand_before=24, on_hand_after=25,
                    reserved_before=5, reserved_after=5, below_threshold=False, reason="by hand",
                )
            ],
        )  # fmt: skip
        await s.commit()
    assert {(d.sku, d.kind, d.counter, d.derived) for d in await job_audit(sessions, [a, b])} == {
        (a, "on_hand", 24, 25),
        (b, "on_hand", 13, 10),
    }

    # Repairs: each records the level's whole-ledger sums through its movement.
    for d in [x async for x in audit(admin, skus=[a, b])]:
        r = await repair(admin, d, reason="checkpoint test")
        cp = (await checkpoints(sessions, [d.sku]))[(d.sku, wh)]
        assert cp.through_id == r.movement.id == cp.last_id
        assert (cp.on_hand, cp.reserved) == (cp.ledger_on_hand, cp.ledger_reserved)
    assert [x async for x in audit(admin, skus=[a, b])] == []
    assert await job_audit(sessions, [a, b]) == []
    for sku in (a, b):
        assert_consistent(await figures(sessions, sku, wh))


async def test_only_a_whole_ledger_audit_finds_an_old_ledger_row_edited_below_the_checkpoint(
    admin: Entrepot, sessions: Sessions, database_url: str
) -> None:
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 10})
    await admin.inventory.adjust_stock(pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=5))
    assert await job_audit(sessions, [sku]) == []
    before = (await checkpoints(sessions, [sku]))[(sku, wh)]

    # The first movement (the initial SetStock, +10) "restored" as +15.
    await edit_ledger_row(sessions, await first_ledger_id(sessions, sku), 5)
    drift = (sku, wh, ON_HAND, 15, 20, -5)
    # Checkpointed audits do not read below the checkpoint: they cannot see it.
    assert [x async for x in audit(admin, skus=[sku])] == []
    assert await job_audit(sessions, [sku]) == []
    # The whole ledger does: the RPC's field, the command's flag.
    assert drift_set([x async for x in audit(admin, skus=[sku], whole_ledger=True)]) == {drift}
    assert entrepot_audit(database_url, "--sku", sku).returncode == 0
    found = entrepot_audit(database_url, "--sku", sku, "--whole-ledger")
    assert found.returncode == 2 and "on_hand 15 but the ledger sums to 20 (-5)" in found.stdout, found
    # A repair compares with the whole ledger even when a checkpoint hides the edit.
    (reported,) = [x async for x in audit(admin, skus=[sku], whole_ledger=True)]
    stale = pb.StockDrift(sku=sku, warehouse_code=wh, kind=ON_HAND, counter=15, derived=15)
    with pytest.raises(FailedPreconditionError) as err:
        await repair(admin, stale, reason="what the checkpoint says")
    assert err.value.reason == "STOCK_CHANGED" and err.value.metadata["derived"] == "20"

    # The job re-sums a level in full once its last full re-sum is old enough (here: at
    # once): it finds the edit and its checkpoint carries it from then on.
    found_by_job = await job_audit(sessions, [sku], full_after=timedelta(0))
    assert {(d.sku, d.kind, d.counter, d.derived) for d in found_by_job} == {(sku, "on_hand", 15, 20)}
    after = (await checkpoints(sessions, [sku]))[(sku, wh)]
    assert after.through_id == before.through_id and after.on_hand == before.on_hand + 5
    assert after.resummed_at > before.resummed_at
    assert drift_set([x async for x in audit(admin, skus=[sku])]) == {drift}

    assert (await repair(admin, reported, reason="restore undone")).repaired
    assert [x async for x in audit(admin, skus=[sku])] == []
    assert [x async for x in audit(admin, skus=[sku], whole_ledger=True)] == []
    assert await job_audit(sessions, [sku]) == []
    assert_consistent(await figures(sessions, sku, wh))


async def test_a_repair_after_a_whole_ledger_audit_leaves_no_false_drift_behind(
    admin: Entrepot, sessions: Sessions
) -> None:
    """The operator's path without the job in between: the whole-ledger audit finds an
    edit below a checkpoint that still says otherwise, and the repair fixes both."""
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 10})
    assert await job_audit(sessions, [sku]) == []
    await edit_ledger_row(sessions, await first_ledger_id(sessions, sku), -2)
    (d,) = [x async for x in audit(admin, skus=[sku], whole_ledger=True)]
    assert (d.counter, d.derived) == (10, 8)
    assert (await repair(admin, d, reason="restore undone")).repaired
    # The checkpoint (10 through the edited row) would now say 10 + 2: the repair replaced it.
    assert [x async for x in audit(admin, skus=[sku])] == []
    assert await job_audit(sessions, [sku]) == []
    cp = (await checkpoints(sessions, [sku]))[(sku, wh)]
    assert (cp.on_hand, cp.reserved, cp.through_id) == (cp.ledger_on_hand, cp.ledger_reserved, cp.last_id)


async def test_writers_racing_the_checkpointing_audit_leave_no_false_drift(
    admin: Entrepot, sessions: Sessions
) -> None:
    """Reservations (granted, released, fulfilled), adjustments and SyncStock batches on a
    few levels while the job's audit moves their checkpoints again and again: every audit
    finds nothing, and each checkpoint equals the ledger's sums through its id."""
    async with sessions() as s:
        cache = (
            await s.execute(
                text("SELECT cache_size FROM pg_sequences WHERE schemaname = 'inventory' "
                     "AND sequencename = 'ledger_id_seq'")
            )
        ).scalar_one()  # fmt: skip
    assert cache == 1  # ids follow the order they are drawn in (the checkpoint's premise)
    whs = [await make_warehouse(admin) for _ in range(2)]
    skus = [await make_item(admin, {wh: 500 for wh in whs}) for _ in range(3)]
    levels = [(sku, wh) for sku in skus for wh in whs]
    source = unique("wms")  # one per writer: a source's batches apply one at a time
    seconds = 4.0
    deadline = time.monotonic() + seconds
    held: list[str] = []
    done = {"reserve": 0, "release": 0, "fulfil": 0, "adjust": 0, "sync": 0, "slow": 0}
    audits = {"job": 0, "read": 0}

    async def writer(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < deadline:
            op = rnd.random()
            sku, wh = rnd.choice(levels)
            try:
                if op < 0.35:
                    r = await admin.inventory.reserve_stock(
                        reserve(sku, rnd.randint(1, 3), wh=wh, rid=uuid.uuid4().hex)
                    )
                    held.append(r.id)
                    done["reserve"] += 1
                elif op < 0.5 and held:
                    rid = held.pop(rnd.randrange(len(held)))
                    await admin.inventory.release_reservation(pb.ReleaseReservationRequest(id=rid))
                    done["release"] += 1
                elif op < 0.6 and held:
                    rid = held.pop(rnd.randrange(len(held)))
                    await admin.inventory.fulfill_reservation(pb.FulfillReservationRequest(id=rid))
                    done["fulfil"] += 1
                elif op < 0.8:
                    await admin.inventory.adjust_stock(
                        pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=rnd.choice([-1, 1, 2]))
                    )
                    done["adjust"] += 1
                else:
                    events = [
                        StockEvent(uuid.uuid4().hex, s, w, "adjust", rnd.choice([-1, 1, 3]))
                        for s, w in rnd.sample(levels, 3)
                    ]
                    await sync_stock(admin, f"{source}-{seed}", events, batch_size=3)
                    done["sync"] += 1
            except FailedPreconditionError:
                pass

    async def slow_writer(seed: int) -> None:
        """The same writers in transactions that stay open after their ledger rows,
        their levels locked, while other levels' later ids commit and audits run."""
        rnd = random.Random(seed)
        while time.monotonic() < deadline:
            op = rnd.random()
            sku, wh = rnd.choice(levels)
            async with sessions() as s:
                if op < 0.4:
                    await inventory.adjust_stock(s, sku=sku, warehouse_code=wh, delta=rnd.choice([-1, 2]))
                elif op < 0.7:
                    await inventory.reserve(s, [inventory.LineRequest(sku, 1, wh)])
                else:
                    events = [
                        sync.SyncEvent(uuid.uuid4().hex, s_, w_, "adjust", rnd.choice([-1, 2]))
                        for s_, w_ in rnd.sample(levels, 2)
                    ]
                    await sync.apply_batch(s, f"{source}-slow-{seed}", events)
                await asyncio.sleep(rnd.uniform(0, 0.03))
                await s.commit()
            done["slow"] += 1

    async def job_auditor() -> None:
        while time.monotonic() < deadline:
            assert await job_audit(sessions, skus) == []
            audits["job"] += 1

    async def reading_auditor() -> None:
        while time.monotonic() < deadline:
            assert [x async for x in audit(admin, skus=skus)] == []
            audits["read"] += 1

    await asyncio.gather(
        *(writer(i) for i in range(6)),
        *(slow_writer(i) for i in range(4)),
        job_auditor(),
        job_auditor(),
        reading_auditor(),
    )
    assert min(done.values()) > 0 and audits["job"] >= 6, (done, audits)

    cps = await checkpoints(sessions, skus)
    assert set(cps) == set(levels)
    for key, cp in cps.items():
        assert (cp.on_hand, cp.reserved) == (cp.ledger_on_hand, cp.ledger_reserved), key
    assert [x async for x in audit(admin, skus=skus)] == []
    assert [x async for x in audit(admin, skus=skus, whole_ledger=True)] == []
    assert await job_audit(sessions, skus) == []
    for key, cp in (await checkpoints(sessions, skus)).items():
        assert cp.through_id == cp.last_id and (cp.on_hand, cp.reserved) == (
            cp.ledger_on_hand,
            cp.ledger_reserved,
        ), key
    for r in held:
        await admin.inventory.release_reservation(pb.ReleaseReservationRequest(id=r))
    async with sessions() as s:
        await check_invariants(s)


async def test_a_ledger_id_drawn_before_the_level_lock_is_what_a_checkpoint_would_miss(
    admin: Entrepot, sessions: Sessions
) -> None:
    """Why every writer draws ledger ids under the level's lock (audit_store's premise),
    and that the checks above can fail: a writer that draws its id first and commits
    after a later id of the level was checkpointed leaves a row below the checkpoint,
    which only the whole ledger counts."""
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 10})
    async with sessions() as early:
        # The broken writer: its ledger row (and event) first, the level's counter after.
        (movement,) = await ledger.write(
            early,
            [
                ledger.Draft(
                    sku=sku, warehouse_code=wh, type="adjust", on_hand_before=10, on_hand_after=11,
                    reserved_before=0, reserved_after=0, below_threshold=False, reason="early id",
                )
            ],
        )  # fmt: skip
        await admin.inventory.adjust_stock(pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=2))
        assert await job_audit(sessions, [sku]) == []
        cp = (await checkpoints(sessions, [sku]))[(sku, wh)]
        assert cp.through_id > movement.id
        await early.execute(
            text("UPDATE inventory.stock_levels SET on_hand = on_hand + 1 WHERE sku = :s"), {"s": sku}
        )
        await early.commit()
    # The counters agree with the ledger (13 = 10 + 1 + 2), but not with the checkpoint.
    assert_consistent(await figures(sessions, sku, wh))
    assert drift_set([x async for x in audit(admin, skus=[sku])]) == {(sku, wh, ON_HAND, 13, 12, 1)}
    cp = (await checkpoints(sessions, [sku]))[(sku, wh)]
    assert cp.on_hand != cp.ledger_on_hand
    assert [x async for x in audit(admin, skus=[sku], whole_ledger=True)] == []
    # The job's full re-sum puts the checkpoint right.
    assert await job_audit(sessions, [sku], full_after=timedelta(0)) == []
    assert [x async for x in audit(admin, skus=[sku])] == []
