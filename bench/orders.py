"""SubmitOrderIntent with 5 lines and reserve_inventory (one transaction: order,
lines, payments, history, reservation with ledger and outbox), 16 concurrent
callers, next to P1's bare grpc.aio server (GetStockLevel answered with a
constant) driven by the same kind of closed-loop client process.

    python -m bench.orders                 # short: 5 s per side
    python -m bench.orders --duration 15

The load runs in its own process (`--loadgen`), so the client never shares the
server's interpreter. Every intent is new (fresh intent id and request id) and
takes 5 distinct SKUs at random out of 200, so the hot-row limit is not what
is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
import uuid
from typing import Any

import grpc

from bench.common import (
    ROOT,
    Database,
    Row,
    cpu_seconds,
    loadgen,
    print_table,
    start_bare_server,
    start_server,
    summarize,
)
from bench.common import token as make_token
from entrepot.inventory.v1 import inventory_pb2
from entrepot.order.v1 import order_pb2, order_pb2_grpc
from entrepot.platform.v1 import channel_pb2
from entrepot_client import EntrepotSync
from entrepot_client.order import build_intent

SKUS = 200
CHANNEL = "bench-orders"


def seed(target: str, tok: str) -> None:
    with EntrepotSync(target, tok) as ep:
        ep.channel.create_channel(
            channel_pb2.CreateChannelRequest(
                channel=channel_pb2.Channel(slug=CHANNEL, name="Bench", currency="EUR")
            )
        )
        ep.inventory.create_warehouse(
            inventory_pb2.CreateWarehouseRequest(
                warehouse=inventory_pb2.Warehouse(code="W-ORDERS", name="Bench")
            )
        )
        for i in range(SKUS):
            sku = f"ORD-{i}"
            ep.inventory.upsert_inventory_item(
                inventory_pb2.UpsertInventoryItemRequest(
                    item=inventory_pb2.InventoryItem(sku=sku, track_inventory=True)
                )
            )
            ep.inventory.set_stock(
                inventory_pb2.SetStockRequest(sku=sku, warehouse_code="W-ORDERS", quantity=10_000_000)
            )


def _request() -> order_pb2.SubmitOrderIntentRequest:
    skus = random.sample(range(SKUS), 5)
    lines = [
        (str(n), f"ORD-{s}", random.randint(1, 3), random.randint(100, 5000)) for n, s in enumerate(skus)
    ]
    subtotal = sum(q * p for _, _, q, p in lines)
    intent = build_intent(
        uuid.uuid4().hex, "bench", "EUR", lines=lines, tax_minor=subtotal // 5, shipping_minor=490,
        payments=[("t1", "card", subtotal + subtotal // 5 + 490)],
    )  # fmt: skip
    return order_pb2.SubmitOrderIntentRequest(
        intent=intent, reserve_inventory=True, request_id=uuid.uuid4().hex
    )


async def _load(target: str, tok: str, concurrency: int, duration: float) -> dict[str, Any]:
    md = [("authorization", f"Bearer {tok}"), ("x-channel-slug", CHANNEL)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = order_pb2_grpc.OrderServiceStub(channel)
        await stub.SubmitOrderIntent(_request(), metadata=md, timeout=30)  # warm up
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                req = _request()
                t0 = time.perf_counter()
                try:
                    await stub.SubmitOrderIntent(req, metadata=md, timeout=30)
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3) if latencies else 0.0
        )

    return {
        "scenario": "submit_order_intent_5_lines_reserve",
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "ok": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


def run(db: Database, duration: float, concurrency: int = 16, *, smoke: bool = False) -> list[Row]:
    tok = make_token(("*",))
    server = start_server(db)
    try:
        seed(server.target, tok)
        assert server.proc is not None
        before = cpu_seconds(server.proc.pid)
        out = subprocess.run(
            [sys.executable, "-m", "bench.orders", "--loadgen", "--target", server.target, "--token", tok,
             "--concurrency", str(concurrency), "--duration", str(duration)],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        ours: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        ours["server_cpu_s"] = round(cpu_seconds(server.proc.pid) - before, 3)
    finally:
        server.terminate()
    bare, target = start_bare_server()
    try:
        base = loadgen(target, "get_stock_level", concurrency=concurrency, duration=duration, tok=tok, skus=1,
                       server_pid=bare.pid)  # fmt: skip
    finally:
        bare.terminate()
        bare.wait(10)
    return [
        Row(
            "P5o",
            f"SubmitOrderIntent 5 lines + reserve p99, {concurrency} callers",
            ours["p99_ms"],
            base["p99_ms"],
            "ms",
            "p99 <= 50 ms",
            ours["p99_ms"] <= 50.0 and not ours["errors"],
            {"ours": ours, "baseline": base},
            sound=not ours["errors"],
        ),
        Row(
            "P5ot",
            f"SubmitOrderIntent throughput, {concurrency} callers",
            ours["rps"],
            base["rps"],
            "calls/s",
            "(reported)",
            None,
            {},
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", default="")
    p.add_argument("--token", default="")
    args = p.parse_args()
    if args.loadgen:
        print(json.dumps(asyncio.run(_load(args.target, args.token, args.concurrency, args.duration))))
        return
    db = Database()
    try:
        rows = run(db, args.duration, args.concurrency)
    finally:
        db.drop()
    print_table(summarize([rows]))
    for r in rows:
        if "ours" not in r.details:  # the throughput row carries no details of its own
            continue
        o, b = r.details["ours"], r.details["baseline"]
        print(
            f"\nours: {o['rps']} calls/s, p50 {o['p50_ms']} ms, p99 {o['p99_ms']} ms, errors {o['errors']}, "
            f"server CPU {o.get('server_cpu_s')} s\nbare: {b['rps']} calls/s, p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms"
        )


if __name__ == "__main__":
    main()
