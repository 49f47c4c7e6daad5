"""P5: CheckoutCart of a 5-line cart with a stock hold, 16 concurrent callers,
next to P1's bare grpc.aio server (same callers, same run). Target: p99 <= 35 ms.

    python -m bench.checkout                 # short: 3 s of checkouts (default)
    python -m bench.checkout --duration 15   # longer
    make bench                               # with the other benchmarks (bench.run)

Before the clock starts, the load generator (its own process) creates a pool of
5-line carts and puts a hold on each (CreateCart + HoldCartStock, not timed);
then 16 callers check them out as fast as they can: one call = one transaction
that re-validates limits, turns the hold into the order's reservation, creates
the order through the intent path and converts the cart. SKUs are spread over
a catalogue so callers do not all queue on one stock row (P2 covers the hot row).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from typing import Any

import grpc

from bench.common import (
    ROOT,
    CpuMeter,
    Database,
    Row,
    loadgen,
    machine,
    print_table,
    start_bare_server,
    start_server,
    summarize,
    token,
)
from entrepot.cart.v1 import cart_pb2, cart_pb2_grpc
from entrepot.inventory.v1 import inventory_pb2
from entrepot.platform.v1 import channel_pb2, types_pb2

CHANNEL = "bench-checkout"
SKUS = 1000
LINES = 5
CONCURRENCY = 16
P99_TARGET_MS = 35.0


def seed(target: str, tok: str, skus: int) -> None:
    from entrepot_client import EntrepotSync

    with EntrepotSync(target, tok) as ep:
        ep.channel.create_channel(
            channel_pb2.CreateChannelRequest(
                channel=channel_pb2.Channel(
                    slug=CHANNEL, name="Bench", currency="EUR", timezone="Europe/Paris"
                )
            )
        )
        ep.inventory.create_warehouse(
            inventory_pb2.CreateWarehouseRequest(
                warehouse=inventory_pb2.Warehouse(code="W-CHECKOUT", name="Bench", priority=1)
            )
        )
        for i in range(skus):
            ep.inventory.upsert_inventory_item(
                inventory_pb2.UpsertInventoryItemRequest(item=inventory_pb2.InventoryItem(sku=f"CART-{i}"))
            )
            ep.inventory.receive_stock(
                inventory_pb2.ReceiveStockRequest(
                    sku=f"CART-{i}",
                    warehouse_code="W-CHECKOUT",
                    quantity=10_000_000,
                    unit_cost=types_pb2.Money(currency_code="EUR", amount_minor=100),
                )
            )


# ------------------------------------------------------------------ load generator (own process)


async def _generate(args: argparse.Namespace) -> dict[str, Any]:
    md = [("authorization", f"Bearer {args.token}"), ("x-channel-slug", CHANNEL)]
    eur = types_pb2.Money(currency_code="EUR", amount_minor=1299)
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = cart_pb2_grpc.CartServiceStub(channel)  # type: ignore[no-untyped-call]

        async def make_cart(n: int) -> cart_pb2.Cart:
            skus = random.sample(range(args.skus), LINES)
            cart = await stub.CreateCart(
                cart_pb2.CreateCartRequest(
                    cart=cart_pb2.Cart(
                        customer_ref=f"cust-{n % 500}",
                        lines=[
                            cart_pb2.CartLine(sku=f"CART-{s}", quantity=1 + s % 3, unit_price=eur)
                            for s in skus
                        ],
                    )
                ),
                metadata=md,
                timeout=30,
            )
            return await stub.HoldCartStock(  # type: ignore[no-any-return]
                cart_pb2.HoldCartStockRequest(cart_id=cart.id, version=cart.version), metadata=md, timeout=30
            )

        # Build the pool with the same concurrency (not timed).
        pool: list[cart_pb2.Cart] = []
        t_setup = time.perf_counter()
        todo = iter(range(args.pool))

        async def builder() -> None:
            for n in todo:
                pool.append(await make_cart(n))

        await asyncio.gather(*(builder() for _ in range(args.concurrency)))
        setup_s = time.perf_counter() - t_setup

        async def checkout(cart: cart_pb2.Cart) -> None:
            await stub.CheckoutCart(
                cart_pb2.CheckoutCartRequest(
                    cart_id=cart.id, version=cart.version, request_id=f"co-{cart.id}"
                ),
                metadata=md,
                timeout=30,
            )

        await checkout(pool.pop())  # warm up
        latencies: list[float] = []
        errors: dict[str, int] = {}
        meter = CpuMeter(args.server_pid)  # the timed window only: the pool above is setup
        start = time.perf_counter()
        deadline = start + args.duration

        async def worker() -> None:
            while pool and time.perf_counter() < deadline:
                cart = pool.pop()
                t0 = time.perf_counter()
                try:
                    await checkout(cart)
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        window_cpu = meter.per_call(len(latencies) + sum(errors.values()))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3) if latencies else 0.0
        )

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "scenario": "checkout_cart_5_lines_with_hold",
        "concurrency": args.concurrency,
        "seconds": round(elapsed, 3),
        "pool_exhausted": not pool,
        "ok": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else 0.0,
        "setup_carts_per_s": round(args.pool / setup_s, 1) if setup_s else 0.0,
        "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        **window_cpu,
        "pid": os.getpid(),
    }


def _checkout_load(
    target: str, tok: str, duration: float, concurrency: int, skus: int, pid: int
) -> dict[str, Any]:
    pool = max(200, int(duration * 250))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.checkout",
            "loadgen",
            "--target",
            target,
            "--token",
            tok,
            "--duration",
            str(duration),
            "--concurrency",
            str(concurrency),
            "--skus",
            str(skus),
            "--pool",
            str(pool),
            "--server-pid",
            str(pid),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result  # its CPU figures cover the timed window only (the cart pool is setup)


def measure(db: Database, duration: float, concurrency: int = CONCURRENCY) -> dict[str, Any]:
    """Our side alone: seed, then checkouts through a real server on `db`."""
    tok = token(("*",))
    server = start_server(db)
    try:
        seed(server.target, tok, SKUS)
        assert server.proc is not None
        return _checkout_load(server.target, tok, duration, concurrency, SKUS, server.proc.pid)
    finally:
        server.terminate()


def run(db: Database, duration: float, concurrency: int = CONCURRENCY, *, smoke: bool = False) -> list[Row]:
    tok = token(("*",))
    ours = measure(db, duration, concurrency)
    bare, target = start_bare_server()
    try:
        base = loadgen(
            target,
            "get_stock_level",
            concurrency=concurrency,
            duration=duration,
            tok=tok,
            skus=SKUS,
            server_pid=bare.pid,
        )
    finally:
        bare.terminate()
        bare.wait(10)
    ok = ours["p99_ms"] <= P99_TARGET_MS and not ours["errors"]
    return [
        Row(
            "P5",
            f"CheckoutCart 5 lines + hold p99, {concurrency} callers",
            ours["p99_ms"],
            base["p99_ms"],
            "ms",
            f"p99 <= {P99_TARGET_MS:.0f} ms",
            ok,
            {"ours": ours, "baseline": base},
            sound=not ours["errors"],
        ),
        Row(
            "P5t",
            f"CheckoutCart throughput, {concurrency} callers",
            ours["rps"],
            base["rps"],
            "calls/s",
            "(reported)",
            None,
            {},
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "loadgen"])
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument("--target", default="")
    p.add_argument("--token", default="")
    p.add_argument("--skus", type=int, default=SKUS)
    p.add_argument("--pool", type=int, default=500)
    p.add_argument("--server-pid", type=int, default=0, help="loadgen: the server whose CPU is reported")
    args = p.parse_args(argv)
    if args.mode == "loadgen":
        print(json.dumps(asyncio.run(_generate(args))))
        return 0
    print("machine:", machine())
    db = Database()
    try:
        rows = run(db, args.duration, args.concurrency)
    finally:
        db.drop()
    print_table(summarize([rows]))
    for r in rows:
        if r.details:
            print(json.dumps(r.details, indent=1))
    return 0 if all(r.passed is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
