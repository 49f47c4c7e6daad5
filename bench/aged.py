"""P7: the same cases on an aged database and on a fresh one, same run.

    make bench-aged                                    # = python -m bench.run --only bench.aged
    .venv/bin/python -m bench.aged --scale 1 --keep    # only generate (prints the database's URL)

`generate(url, scale)` fills a migrated database in SQL only (generate_series,
one statement per table, nothing through the server) with, at scale 1:
5.2 million ledger rows over 80,000 stock levels (20,000 SKUs x 4 warehouses,
a year of receive / reserve / fulfil / adjust / sync movements), 560,000
fulfilled reservations and 8,000 open ones, 2 million outbox events, 1 million
idempotency keys, 200,000 orders with 3 lines and 2 history entries each. It
holds R1's invariants: on_hand = the sum of the level's ledger deltas, reserved
= its open reservation lines (`--check`). The outbox and the keys span their
default retention (168 h, 72 h) plus one hour, as in a database whose retention
job keeps up: the server's job finds an hour of backlog (~12,000 events and
~14,000 keys at scale 1) to delete while the cases run. The stock audit job's
ledger checkpoints are those its last run left (one run of the job's audit,
domain/inventory/audit.py, at the end): the server's audit at start adds what
was written since, as on a database whose audit job has been running. Then VACUUM ANALYZE:
the statistics and visibility map autovacuum would have (this machine's
PostgreSQL runs with autovacuum off; a production one does not).

The generated database is a template; every case runs on its own copy
(`CREATE DATABASE ... TEMPLATE ... STRATEGY FILE_COPY`), next to the same case
on a fresh database: P1 (GetStockLevel), P2 (ReserveStock on one hot SKU),
P3 (ReserveStock over 10,000 SKUs), P5 (CheckoutCart). Each row is the aged
database's rate over the fresh one's (target >= 0.9x). The names the cases seed
(warehouses W1, BENCH, W-CHECKOUT, SKUs BENCH-*, B*, CART-*) never collide with
the generated ones (AGED-*).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import asyncpg

import migrations
from bench import checkout, p1
from bench.common import Row
from bench.reserve_server import run_server_case
from tests.pg import create_database, drop_database, server_url, with_database

CLIENTS = 64

# Sizes at scale 1 (TARGETS.md P7: >= 5M ledger rows, 2M outbox events, 1M keys, 200k orders).
SKUS = 20_000
WAREHOUSES = 4
CYCLES = 13  # 5 ledger rows each: 80,000 levels x 65 = 5.2M rows
OUTBOX = 2_000_000
KEYS = 1_000_000
ORDERS = 200_000
OPEN_EVERY = 10  # one level in 10 holds an open reservation of 3

# One cycle of movements on a level: (type, on_hand delta, reserved delta). A cycle
# adds 18 to on_hand and leaves reserved as it found it; counters never go negative.
CYCLE = [("receive", 20, 0), ("reserve", 0, 2), ("fulfil", -2, -2), ("adjust", -1, 0), ("sync", 1, 0)]
ON_HAND_AFTER = [20, 20, 18, 17, 18]  # after each step of a cycle, on top of 18 per completed cycle
RESERVED_AFTER = [0, 2, 0, 0, 0]


def _arr(values: list[Any]) -> str:
    return "ARRAY[" + ",".join(f"'{v}'" if isinstance(v, str) else str(v) for v in values) + "]"


def statements(scale: float) -> list[tuple[str, str]]:
    skus, orders = max(50, int(SKUS * scale)), max(100, int(ORDERS * scale))
    outbox, keys = max(1000, int(OUTBOX * scale)), max(1000, int(KEYS * scale))
    levels = skus * WAREHOUSES
    rows = CYCLES * len(CYCLE)
    types = _arr([t for t, _, _ in CYCLE])
    # level number l in [0, levels): sku l / WAREHOUSES, warehouse l % WAREHOUSES
    level_cols = "'AGED-' || lpad((l / 4)::text, 6, '0') AS sku, 'AGED-WH-' || (l % 4) AS warehouse_code"
    # reservation id of cycle c of level l (historic ones: even cycles)
    res_id = "md5('aged-res-' || l || '-' || c)::uuid"
    return [
        (
            "warehouses, items, channels",
            f"""
            INSERT INTO inventory.warehouses (code, name, priority)
              SELECT 'AGED-WH-' || w, 'Aged ' || w, 10 + w FROM generate_series(0, {WAREHOUSES - 1}) w;
            INSERT INTO inventory.items (sku, created_at)
              SELECT 'AGED-' || lpad(s::text, 6, '0'), now() - interval '400 days'
              FROM generate_series(0, {skus - 1}) s;
            INSERT INTO platform.channels (slug, name, currency, timezone)
              SELECT 'aged-' || c, 'Aged ' || c, 'EUR', 'Europe/Paris' FROM generate_series(0, 1) c;
            """,
        ),
        (
            f"ledger ({levels * rows:,} rows of history)",
            # i outer, levels inner: ids follow time, as in a live ledger.
            f"""
            INSERT INTO inventory.ledger (sku, warehouse_code, type, on_hand_before, on_hand_after,
                reserved_before, reserved_after, reason, source, reference, actor, reservation_id, created_at)
            SELECT sku, warehouse_code, ({types})[p + 1],
                   18 * c + ({_arr(ON_HAND_AFTER)})[p + 1] - ({_arr([d for _, d, _ in CYCLE])})[p + 1],
                   18 * c + ({_arr(ON_HAND_AFTER)})[p + 1],
                   ({_arr(RESERVED_AFTER)})[p + 1] - ({_arr([d for _, _, d in CYCLE])})[p + 1],
                   ({_arr(RESERVED_AFTER)})[p + 1],
                   'aged', CASE WHEN p = 4 THEN 'aged-wms' ELSE '' END,
                   -- a sync row's reference is its event id, unique per source (the claim)
                   CASE WHEN p = 4 THEN 'aged-' || l || '-' || c ELSE '' END, 'aged',
                   CASE WHEN p IN (1, 2) AND c % 2 = 0 THEN {res_id} END,
                   now() - interval '365 days' + (i * interval '360 days') / {rows}
                     + (l % 1000) * interval '1 second'
            FROM generate_series(0, {rows - 1}) i,
                 LATERAL (SELECT i / 5 AS c, i % 5 AS p) cp,
                 generate_series(0, {levels - 1}) l,
                 LATERAL (SELECT {level_cols}) names;
            """,
        ),
        (
            "historic reservations (fulfilled)",
            f"""
            INSERT INTO inventory.reservations (id, reference, state, actor, created_at, updated_at)
              SELECT {res_id}, 'aged-order-' || l || '-' || c, 'fulfilled', 'aged',
                     now() - interval '365 days', now() - interval '365 days'
              FROM generate_series(0, {levels - 1}) l, generate_series(0, {CYCLES - 1}, 2) c;
            INSERT INTO inventory.reservation_lines (reservation_id, line_no, sku, warehouse_code,
                quantity, fulfilled)
              SELECT {res_id}, 1, sku, warehouse_code, 2, 2
              FROM generate_series(0, {levels - 1}) l, generate_series(0, {CYCLES - 1}, 2) c,
                   LATERAL (SELECT {level_cols}) names;
            """,
        ),
        (
            "open reservations and their ledger rows",
            f"""
            INSERT INTO inventory.reservations (id, reference, state, actor, created_at, updated_at)
              SELECT md5('aged-open-' || l)::uuid, 'aged-open-' || l, 'active', 'aged',
                     now() - interval '1 day', now() - interval '1 day'
              FROM generate_series(0, {levels - 1}, {OPEN_EVERY}) l;
            INSERT INTO inventory.reservation_lines (reservation_id, line_no, sku, warehouse_code, quantity)
              SELECT md5('aged-open-' || l)::uuid, 1, sku, warehouse_code, 3
              FROM generate_series(0, {levels - 1}, {OPEN_EVERY}) l, LATERAL (SELECT {level_cols}) names;
            INSERT INTO inventory.ledger (sku, warehouse_code, type, on_hand_before, on_hand_after,
                reserved_before, reserved_after, reason, actor, reservation_id, created_at)
              SELECT sku, warehouse_code, 'reserve', {18 * CYCLES}, {18 * CYCLES}, 0, 3, 'aged', 'aged',
                     md5('aged-open-' || l)::uuid, now() - interval '1 day'
              FROM generate_series(0, {levels - 1}, {OPEN_EVERY}) l, LATERAL (SELECT {level_cols}) names;
            """,
        ),
        (
            "stock levels (= the ledger's sums)",
            f"""
            INSERT INTO inventory.stock_levels (sku, warehouse_code, on_hand, reserved, updated_at)
              SELECT sku, warehouse_code, {18 * CYCLES}, CASE WHEN l % {OPEN_EVERY} = 0 THEN 3 ELSE 0 END,
                     now() - interval '1 day'
              FROM generate_series(0, {levels - 1}) l, LATERAL (SELECT {level_cols}) names;
            """,
        ),
        (
            f"outbox ({outbox:,} events over 7 days + 1 hour)",
            # txid: committed transaction ids below the current one (delivery order),
            # 50 events per transaction.
            f"""
            INSERT INTO platform.outbox (txid, topic, aggregate_type, aggregate_id, channel, payload, created_at)
            SELECT (3 + g / 50)::text::xid8,
                   CASE WHEN g % 10 < 8 THEN 'inventory.stock_changed' ELSE 'order.created' END,
                   CASE WHEN g % 10 < 8 THEN 'stock_level' ELSE 'order' END,
                   CASE WHEN g % 10 < 8 THEN 'AGED-' || lpad(((g::bigint * 7919) % {skus})::text, 6, '0')
                        ELSE md5('aged-order-' || g)::uuid::text END,
                   CASE WHEN g % 10 < 8 THEN NULL ELSE 'aged-' || (g % 2) END,
                   jsonb_build_object('sku', 'AGED-' || lpad(((g::bigint * 7919) % {skus})::text, 6, '0'),
                       'warehouse_code', 'AGED-WH-' || (g % 4), 'on_hand', 100 + g % 50, 'reserved', g % 3,
                       'on_hand_delta', 1, 'reserved_delta', 0, 'type', 'sync', 'source', 'aged-wms',
                       'ledger_id', g, 'first_ledger_id', g, 'reason', 'aged'),
                   now() - interval '169 hours' + (g * interval '169 hours') / {outbox}
            FROM generate_series(0, {outbox - 1}) g;
            """,
        ),
        (
            f"idempotency keys ({keys:,} over 3 days + 1 hour)",
            f"""
            INSERT INTO platform.idempotency_keys (principal, request_id, method, request_hash,
                status_code, response, created_at)
            SELECT 'aged-client-' || (g % 50), 'req-' || g,
                   '/entrepot.inventory.v1.InventoryService/ReserveStock',
                   decode(md5('h' || g), 'hex'), 0, decode(repeat(md5('r' || g), 3), 'hex'),
                   now() - interval '73 hours' + (g * interval '73 hours') / {keys}
            FROM generate_series(0, {keys - 1}) g;
            """,
        ),
        (
            f"orders ({orders:,}, 3 lines and 2 history entries each)",
            f"""
            INSERT INTO orders.orders (id, channel, source_system, intent_id, external_order_id, customer_ref,
                currency, subtotal_minor, tax_minor, shipping_minor, discount_minor, grand_total_minor,
                state, content_hash, content, submitted_at, created_at, updated_at)
            SELECT md5('aged-order-' || g)::uuid, 'aged-' || (g % 2), 'aged', 'intent-' || g, 'ext-' || g,
                   'cust-' || (g % 20000), 'EUR', 3000, 600, 500, 0, 4100,
                   (ARRAY['delivered','shipped','processing','cancelled'])[1 + g % 4],
                   decode(md5('c' || g), 'hex'),
                   jsonb_build_object('lines', 3, 'customer', 'cust-' || (g % 20000)),
                   now() - interval '365 days' + (g * interval '364 days') / {orders},
                   now() - interval '365 days' + (g * interval '364 days') / {orders},
                   now() - interval '365 days' + (g * interval '364 days') / {orders}
            FROM generate_series(0, {orders - 1}) g;
            INSERT INTO orders.order_lines (order_id, line_id, position, sku, quantity, unit_price_minor,
                shipped_quantity)
            SELECT md5('aged-order-' || g)::uuid, 'l' || n, n,
                   'AGED-' || lpad(((g * 3 + n) % {skus})::text, 6, '0'), 1, 1000,
                   CASE WHEN g % 4 IN (0, 1) THEN 1 ELSE 0 END
            FROM generate_series(0, {orders - 1}) g, generate_series(1, 3) n;
            INSERT INTO orders.status_entries (order_id, code, module, severity, recorded_at, written_by,
                created_at)
            SELECT md5('aged-order-' || g)::uuid, (ARRAY['order.created','order.shipped'])[n], 'order',
                   'info', now() - interval '365 days' + (g * interval '364 days') / {orders}, 'aged',
                   now() - interval '365 days' + (g * interval '364 days') / {orders}
            FROM generate_series(0, {orders - 1}) g, generate_series(1, 2) n;
            """,
        ),
    ]


async def _generate(url: str, scale: float, log: Callable[[str], None]) -> dict[str, float]:
    conn = await asyncpg.connect(url)
    timings: dict[str, float] = {}
    try:
        await conn.execute("SET synchronous_commit = off; SET maintenance_work_mem = '256MB'")
        for what, sql in statements(scale):
            t = time.perf_counter()
            await conn.execute(sql)
            timings[what] = round(time.perf_counter() - t, 1)
            log(f"P7 aged: {what}: {timings[what]} s")
        t = time.perf_counter()
        levels = await _checkpoint(url)
        timings["stock audit (checkpoints)"] = round(time.perf_counter() - t, 1)
        log(
            f"P7 aged: stock audit of {levels:,} levels (checkpoints): {timings['stock audit (checkpoints)']} s"
        )
        t = time.perf_counter()
        await conn.execute("VACUUM ANALYZE")
        timings["vacuum analyze"] = round(time.perf_counter() - t, 1)
        sizes = await conn.fetch(
            """SELECT n.nspname || '.' || c.relname AS t, c.reltuples::bigint AS rows,
                      pg_total_relation_size(c.oid) AS bytes
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind = 'r' AND n.nspname IN ('inventory', 'platform', 'orders')
                 AND c.reltuples > 1000 ORDER BY bytes DESC"""
        )
        for r in sizes:
            log(f"P7 aged: {r['t']}: {r['rows']:,} rows, {r['bytes'] / 2**20:,.0f} MiB")
    finally:
        await conn.close()
    return timings


async def _checkpoint(url: str) -> int:
    """One run of the stock audit job's audit (ledger checkpoints moved along, each
    page committed); returns the levels checked. A drift fails the generation."""
    from domain import inventory
    from domain.shared.db import make_engine, make_session_factory
    from server.settings import Settings

    engine = make_engine(url, pool_size=1, max_overflow=0)
    levels = 0
    try:
        full_after = timedelta(seconds=Settings().stock_audit_full_seconds)
        async for page in inventory.checkpointing_audit(make_session_factory(engine), full_after=full_after):
            if page.drifts:
                raise SystemExit(f"the generated database drifts, e.g. {page.drifts[0]}")
            levels += page.levels_checked
    finally:
        await engine.dispose()
    return levels


def generate(url: str, scale: float, log: Callable[[str], None] = print) -> dict[str, float]:
    """Fill the migrated database at `url` (see the module docstring); returns seconds per step."""
    return asyncio.run(_generate(url, scale, log))


class Template:
    """A generated aged database, copied for each case (a template has no connections)."""

    def __init__(self, scale: float) -> None:
        self.url, self.name = create_database("entrepot_aged_tpl")
        migrations.upgrade(self.url)
        t = time.perf_counter()
        self.timings = generate(self.url, scale)
        self.seconds = round(time.perf_counter() - t, 1)
        self.scale = scale

    def copy(self) -> Database:
        name = f"entrepot_aged_{uuid.uuid4().hex[:10]}"
        sql = f'CREATE DATABASE "{name}" TEMPLATE "{self.name}" STRATEGY FILE_COPY'
        asyncio.run(_admin(sql))
        return Database(with_database(server_url(), name), name)

    def drop(self) -> None:
        drop_database(self.name)


class Database:
    """What the cases take: a URL, dropped afterwards."""

    def __init__(self, url: str | None = None, name: str | None = None) -> None:
        if url is None or name is None:
            url, name = create_database("entrepot_bench")
            migrations.upgrade(url)
        self.url, self.name = url, name

    def drop(self) -> None:
        drop_database(self.name)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(with_database(server_url(), "postgres"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# The template outlives one repeat: bench.run calls run() once per repeat.
_templates: dict[float, Template] = {}


def template(scale: float) -> Template:
    if scale not in _templates:
        _templates[scale] = Template(scale)
        atexit.register(_templates[scale].drop)
    return _templates[scale]


def _p1(db: Database, duration: float) -> dict[str, Any]:
    return p1.measure(db, duration)


def _p2(db: Database, duration: float) -> dict[str, Any]:
    return run_server_case(db.url, spread=False, batched=True, clients=CLIENTS, seconds=max(1, int(duration)))


def _p3(db: Database, duration: float) -> dict[str, Any]:
    return run_server_case(db.url, spread=True, batched=True, clients=CLIENTS, seconds=max(1, int(duration)))


def _p5(db: Database, duration: float) -> dict[str, Any]:
    return checkout.measure(db, duration)


CASES: list[tuple[str, str, Callable[[Database, float], dict[str, Any]], str]] = [
    ("P1", "GetStockLevel, 32 callers", _p1, "rps"),
    ("P2", "ReserveStock(1) one hot SKU, 64 callers", _p2, "tps"),
    ("P3", "ReserveStock(1) 10,000 SKUs, 64 callers", _p3, "tps"),
    ("P5", "CheckoutCart 5 lines + hold, 16 callers", _p5, "rps"),
]


def run(db: object, duration: float, *, smoke: bool = False) -> list[Row]:
    """Entry point for bench/run.py: scale 1 (the TARGETS.md sizes), or 1% with only
    P1 and P2 when `smoke` (bench.run --smoke)."""
    tpl = template(0.01 if smoke else 1.0)
    rows = []
    for pid, what, case, key in CASES[:2] if smoke else CASES:
        # fresh, then aged: interleaved within the repeat
        results: dict[str, dict[str, Any]] = {}
        for kind in ("fresh", "aged"):
            case_db = Database() if kind == "fresh" else tpl.copy()
            try:
                results[kind] = case(case_db, duration)
            finally:
                case_db.drop()
        fresh, aged = results["fresh"], results["aged"]
        sound = all(r.get("consistent", True) and not r.get("errors") for r in results.values())
        rows.append(
            Row(
                "P7",
                f"aged/fresh: {pid} {what}",
                float(aged[key]),
                float(fresh[key]),
                "calls/s",
                ">= 0.9x fresh",
                None,
                {"aged": aged, "fresh": fresh, "scale": tpl.scale, "generate_s": tpl.seconds},
                sound=sound,
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=0.01, help="1 = the TARGETS.md sizes")
    p.add_argument("--keep", action="store_true", help="keep the database and print its URL")
    p.add_argument("--check", action="store_true", help="check R1's invariants on every level afterwards")
    args = p.parse_args()
    db = Database()
    try:
        t = time.perf_counter()
        generate(db.url, args.scale)
        print(f"generated in {time.perf_counter() - t:.1f} s")
        if args.check:
            print(f"invariants hold on {asyncio.run(_check(db.url)):,} levels")
    finally:
        if args.keep:
            print(db.url)
        else:
            db.drop()


async def _check(url: str) -> int:
    """R1's per-level invariants (tests/inventory_support.INVARIANTS). Not the count of
    outbox events against ledger rows: retention has purged old events, as it would."""
    from domain.shared.db import make_engine, make_session_factory
    from tests.inventory_support import INVARIANTS

    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        async with make_session_factory(engine)() as s:
            rows = (await s.execute(INVARIANTS)).all()
    finally:
        await engine.dispose()
    bad = [
        r
        for r in rows
        if r.on_hand < 0
        or r.reserved < 0
        or r.reserved > r.on_hand
        or r.reserved != r.open
        or (r.on_hand, r.reserved) != (r.ledger_on_hand, r.ledger_reserved)
    ]
    if bad:
        raise SystemExit(f"invariants broken on {len(bad)} levels, e.g. {bad[0]}")
    return len(rows)


if __name__ == "__main__":
    main()
