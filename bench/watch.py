"""P6: WatchStockChanges fan-out.

    .venv/bin/python -m bench.watch                      # short form (1,000 watchers, 10 s)
    .venv/bin/python -m bench.watch --full               # TARGETS.md: 5,000 watchers, 60 s
    .venv/bin/python -m bench.watch --watchers 2000 --seconds 20

N watchers each filtered to 10 SKUs plus 10 unfiltered watchers on one server
process; a producer (its own process) commits 1,000 changes/s (4 SyncStock
sources, batches of 50 every 200 ms). A SyncStock batch is one stock event per
level it moves; the producer's batches name 50 different SKUs each (SKU
(n * 7919) mod SKUs for 50 consecutive n), so each change is one event. The
expected deliveries are counted from the stock events committed (what
WatchStockChanges promises: each to every matching watcher), not from the
changes sent. Every committed event must reach every matching watcher; delivery latency runs from the event's commit-side time to
its arrival in the watcher; the server's RSS growth over the producing period
is reported. Targets (TARGETS.md): nothing missing, p99 <= 250 ms, RSS growth
<= 500 MB.

The watchers run in `--clients` separate processes (each its own set of HTTP/2
connections) so that one Python client does not become the bottleneck that the
latency then measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import text

from bench.common import ROOT, Row, cpu_seconds, database_cpu_seconds
from domain.shared.db import make_engine, make_session_factory
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client import Entrepot
from entrepot_client.errors import EntrepotError
from entrepot_client.streams import sync_stock
from tests.inventory_support import migrated_database
from tests.pg import drop_database
from tests.procs import ServerProcess, server_token

WAREHOUSE = "P6WH"
PER_WATCHER = 10  # SKUs in each filtered watcher
UNFILTERED = 10
RSS_LIMIT_MB = 500.0
P99_LIMIT_MS = 250.0
STREAMS_PER_CONNECTION = 50


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sku_name(i: int) -> str:
    return f"P6-{i:05d}"


def filters_for(n_filtered: int) -> list[list[str]]:
    return [[sku_name(i * PER_WATCHER + j) for j in range(PER_WATCHER)] for i in range(n_filtered)] + [
        [] for _ in range(UNFILTERED)
    ]


async def watch_client(target: str, token: str, after: int, first: int, count: int, n_filtered: int) -> None:
    """One watcher process: watchers [first, first+count) of filters_for(n_filtered).
    Prints 'ready' once every stream is open, then, when stdin closes, one JSON line:
    per watcher the event ids received, and the latencies."""
    flts = filters_for(n_filtered)[first : first + count]
    own = [("grpc.use_local_subchannel_pool", 1)]
    n_conn = max(1, -(-count // STREAMS_PER_CONNECTION))
    channels = [Entrepot(target, token, options=own) for _ in range(n_conn)]
    received: list[list[int]] = [[] for _ in flts]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    silent = set(range(len(flts)))  # watchers that have received no message at all
    all_greeted = asyncio.Event()

    async def watcher(idx: int, ep: Entrepot, flt: list[str]) -> None:
        got = received[idx]
        call = ep.inventory.watch_stock_changes(pb.WatchStockChangesRequest(skus=flt, after_event_id=after))
        try:
            async for msg in call:
                silent.discard(idx)
                if not silent:
                    all_greeted.set()
                now = time.time()
                for e in msg.events:
                    got.append(e.event_id)
                    latencies.append(now - e.time.ToDatetime(tzinfo=UTC).timestamp())
        except (
            grpc.aio.AioRpcError,
            EntrepotError,
        ) as err:  # counted: a watcher that ends early is a failure
            what = err.code().name if isinstance(err, grpc.aio.AioRpcError) else str(err)[:160]
            errors[what] = errors.get(what, 0) + 1
            return
        errors["ENDED"] = errors.get("ENDED", 0) + 1  # a watch never ends by itself

    tasks = [asyncio.create_task(watcher(i, channels[i % n_conn], f)) for i, f in enumerate(flts)]
    # Every watcher gets its first message (a heartbeat) within the heartbeat interval
    # of opening: ready once each has had one, so producing starts with every stream live.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_greeted.wait(), 60 + count / 100)
    print("ready", flush=True)
    # The parent closes stdin when delivery has settled (or timed out).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    if silent:
        errors["SILENT"] = len(silent)
        # Silent watchers by connection: whole connections silent point at the transport.
        per_conn: dict[int, int] = {}
        for i in silent:
            per_conn[i % n_conn] = per_conn.get(i % n_conn, 0) + 1
        errors[f"SILENT_CONNECTIONS {len(per_conn)}/{n_conn} max {max(per_conn.values())}"] = 1
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ep in channels:
        await ep.close()
    print(
        json.dumps({"first": first, "received": received, "latencies": latencies, "errors": errors}),
        flush=True,
    )


async def _spawn(*args: str, token: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.watch",
        *args,
        cwd=ROOT,
        env={**os.environ, "BENCH_TOKEN": token},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=2**30,
    )


async def run_p6(
    url: str, server: ServerProcess, token: str, seconds: float, n_filtered: int, clients: int
) -> dict[str, Any]:
    engine = make_engine(url, pool_size=2, max_overflow=0)
    sessions = make_session_factory(engine)
    async with sessions() as s, s.begin():
        await s.execute(
            text("INSERT INTO inventory.warehouses (code, name) VALUES (:c, :c) ON CONFLICT DO NOTHING"),
            {"c": WAREHOUSE},
        )
    skus = [sku_name(i) for i in range(n_filtered * PER_WATCHER)]
    # Create the items once so the watch period measures only changes.
    async with Entrepot(server.target, token) as producer:
        await sync_stock(
            producer,
            "bench-p6-init",
            [
                pb.SyncEvent(
                    event_id=f"init-{s}",
                    sku=s,
                    warehouse_code=WAREHOUSE,
                    kind=pb.SYNC_EVENT_KIND_ADJUST,
                    quantity=1,
                )
                for s in skus
            ],
            batch_size=5000,
        )
    async with sessions() as s:
        start_id = int(
            (await s.execute(text("SELECT coalesce(max(id), 0) FROM platform.outbox"))).scalar_one()
        )
    filters = filters_for(n_filtered)
    share = -(-len(filters) // clients)
    procs = []
    for k in range(clients):
        first, count = k * share, min(share, len(filters) - k * share)
        if count > 0:
            args = ("--watch-client", server.target, str(start_id), str(first), str(count), str(n_filtered))
            procs.append(await _spawn(*args, token=token))
    t_open = time.perf_counter()
    for p in procs:
        assert p.stdout is not None
        line = await asyncio.wait_for(p.stdout.readline(), 180)
        if line.strip() != b"ready":
            raise RuntimeError(f"watch client failed to open its streams: {line!r}")
    open_s = time.perf_counter() - t_open
    print(f"P6: {len(filters)} watchers open in {open_s:.1f} s, producing for {seconds} s", file=sys.stderr)
    assert server.proc is not None
    rss_before = rss_kb(server.proc.pid)
    watcher_pids = [p.pid for p in procs]
    cpu_before = (
        cpu_seconds(server.proc.pid),
        database_cpu_seconds(),
        sum(cpu_seconds(p) for p in watcher_pids),
    )
    profiler = None
    if os.environ.get("BENCH_PYSPY"):  # where the server's time goes: py-spy's collapsed stacks
        profiler = await asyncio.create_subprocess_exec(
            "py-spy", "record", "--nonblocking", "-r", "50", "-d", str(int(seconds)), "-f", "raw",
            "-o", os.environ["BENCH_PYSPY"], "-p", str(server.proc.pid),
        )  # fmt: skip
    producer_proc = await _spawn(
        "--produce", server.target, WAREHOUSE, str(seconds), str(len(skus)), token=token
    )
    out, _ = await producer_proc.communicate()
    if producer_proc.returncode != 0:
        raise RuntimeError(f"P6 producer failed (exit {producer_proc.returncode})")
    sent = int(out.decode().split()[-1])
    rss_peak = rss_kb(server.proc.pid)
    cpu_after = (
        cpu_seconds(server.proc.pid),
        database_cpu_seconds(),
        sum(cpu_seconds(p) for p in watcher_pids),
    )
    cpu = {
        f"{side}_cpu_s": round(b - a, 1)
        for side, a, b in zip(("server", "db", "watch_clients"), cpu_before, cpu_after, strict=True)
    }
    if profiler is not None:
        await profiler.wait()
    async with sessions() as s:
        rows = (
            await s.execute(
                text(
                    "SELECT id, aggregate_id FROM platform.outbox "
                    "WHERE id > :i AND payload->>'source' LIKE 'bench-p6-%'"
                ),
                {"i": start_id},
            )
        ).all()
    by_sku: dict[str, set[int]] = {}
    for r in rows:
        by_sku.setdefault(r.aggregate_id, set()).add(int(r.id))
    all_ids = {int(r.id) for r in rows}
    expected = [set().union(*(by_sku.get(s, set()) for s in f)) if f else all_ids for f in filters]
    # The watchers report only when asked; give delivery time to settle (every event
    # is normally there within a second of the last commit).
    await asyncio.sleep(5.0)
    received: list[set[int]] = [set() for _ in filters]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
        o, _ = await p.communicate()
        res = json.loads(o.decode().strip().splitlines()[-1])
        for i, ids in enumerate(res["received"]):
            received[res["first"] + i] = set(ids)
        latencies += res["latencies"]
        for code, n in res["errors"].items():
            errors[code] = errors.get(code, 0) + n
    rss_after = rss_kb(server.proc.pid)
    missing_each = [len(exp - got) for exp, got in zip(expected, received, strict=True)]
    missing = sum(missing_each)
    missing_unfiltered = sum(missing_each[n_filtered:])
    watchers_missing = sum(1 for m in missing_each if m)
    await engine.dispose()
    latencies.sort()

    def pct(q: float) -> float | None:
        return (
            round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)
            if latencies
            else None
        )

    growth = round((max(rss_peak, rss_after) - rss_before) / 1024, 1)
    p99 = pct(0.99)
    return {
        "seconds": seconds,
        "sent": sent,
        "changes": len(rows),
        "changes_per_s": round(len(rows) / seconds),
        "watchers": len(filters),
        "watch_clients": len(procs),
        "open_seconds": round(open_s, 1),
        "expected_deliveries": sum(len(e) for e in expected),
        "deliveries": len(latencies),
        "missing": missing,
        "missing_unfiltered": missing_unfiltered,
        "watchers_missing": watchers_missing,
        "watch_errors": errors,
        "p50_ms": pct(0.5),
        "p99_ms": p99,
        "max_ms": pct(1.0),
        "rss_before_mb": round(rss_before / 1024, 1),
        **cpu,
        "rss_growth_mb": growth,
        "target_met": missing == 0
        and not errors
        and p99 is not None
        and p99 <= P99_LIMIT_MS
        and growth <= RSS_LIMIT_MB,
    }


async def produce(target: str, wh: str, seconds: float, n_skus: int) -> int:
    """P6's producer: 4 adapters (sources), each a SyncStock batch of 50 every 200 ms (1,000/s in all):
    batches of one source apply one after another, so one source alone is bound by commit latency.
    A batch's 50 events name 50 different SKUs: 50 stock events."""
    skus = [sku_name(i) for i in range(n_skus)]
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


async def amain(url: str, seconds: float, watchers: int, clients: int) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    # Every watcher is a concurrent RPC: a replica serving N watchers needs
    # max_concurrent_rpcs above N plus its unary load (docs/operations.md).
    server = ServerProcess(
        url,
        log_dir,
        ENTREPOT_DB_POOL_SIZE="10",
        ENTREPOT_DB_MAX_OVERFLOW="5",
        ENTREPOT_MAX_CONCURRENT_RPCS=str(watchers + UNFILTERED + 1000),
    )
    server.launch()
    try:
        await server.ready()
        result = await run_p6(url, server, server_token(), seconds, watchers, clients)
    finally:
        server.stop()
    result["server_log"] = str(server.log_path)
    return result


def measure(seconds: float, watchers: int, clients: int) -> dict[str, Any]:
    url, name = migrated_database("bench_watch")
    try:
        return asyncio.run(amain(url, seconds, watchers, clients))
    finally:
        drop_database(name)


def row(r: dict[str, Any]) -> Row:
    return Row(
        "P6",
        f"Watch fan-out, {r['watchers']:,} watchers, p99 delivery",
        float(r["p99_ms"] or 0.0),
        None,
        "ms",
        "p99 <= 250 ms, 0 missing, RSS +<= 500 MB",
        bool(r["target_met"]),
        r,
        sound=r["missing"] == 0 and not r["watch_errors"] and r["rss_growth_mb"] <= RSS_LIMIT_MB,
    )


def run(db: object, duration: float, *, smoke: bool = False) -> list[Row]:
    """Entry point for bench/run.py: the TARGETS.md form (5,000 + 10 watchers, 60 s)
    unless `smoke` (bench.run --smoke: 200 watchers for `duration` seconds)."""
    r = measure(duration if smoke else 60.0, 200 if smoke else 5000, 1 if smoke else 2)
    return [row(r)]


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--produce":
        print(asyncio.run(produce(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))))
        return
    if len(sys.argv) == 7 and sys.argv[1] == "--watch-client":
        target, after, first, count, n_filtered = sys.argv[2], *map(int, sys.argv[3:7])
        asyncio.run(watch_client(target, os.environ["BENCH_TOKEN"], after, first, count, n_filtered))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--watchers", type=int, default=1000, help="filtered watchers (10 SKUs each)")
    parser.add_argument("--clients", type=int, default=2, help="watcher processes")
    parser.add_argument("--full", action="store_true", help="TARGETS.md form: 5,000 watchers for 60 s")
    args = parser.parse_args()
    if args.full:
        args.seconds, args.watchers = 60.0, 5000
    r = measure(args.seconds, args.watchers, args.clients)
    print(
        f"P6 {r['watchers']} watchers, {r['changes']} changes in {r['seconds']} s ({r['changes_per_s']}/s): "
        f"deliveries {r['deliveries']}/{r['expected_deliveries']}, missing {r['missing']}, "
        f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms, RSS +{r['rss_growth_mb']} MB: "
        f"{'met' if r['target_met'] else 'NOT met'}"
    )
    out = ROOT / "bench" / "results" / f"watch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
