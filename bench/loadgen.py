"""Closed-loop load generator, run as its own process so client load never shares
the server's interpreter: N concurrent callers on one grpc.aio channel for D
seconds; prints one JSON line with calls/s, latency percentiles and its own CPU.

    python -m bench.loadgen --target 127.0.0.1:50051 --token T --scenario get_stock_level \\
        --concurrency 32 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from entrepot.inventory.v1 import inventory_pb2, inventory_pb2_grpc

Call = Callable[[int], Awaitable[Any]]


def scenario(
    name: str, channel: grpc.aio.Channel, md: list[tuple[str, str]], args: argparse.Namespace
) -> Call:
    inv = inventory_pb2_grpc.InventoryServiceStub(channel)
    skus = [f"{args.sku_prefix}{i}" for i in range(args.skus)]
    if name == "get_stock_level":
        reqs = [inventory_pb2.GetStockLevelRequest(sku=s) for s in skus]
        return lambda i: inv.GetStockLevel(reqs[i % len(reqs)], metadata=md, timeout=10)
    if name == "reserve_one":
        # P2/P3: one unit of a random SKU (one SKU = the hot-row case); a fresh request_id each.
        def reserve(i: int) -> Awaitable[Any]:
            req = inventory_pb2.ReserveStockRequest(
                lines=[inventory_pb2.ReservationLineRequest(sku=random.choice(skus), quantity=1)],
                reference="bench",
                request_id=uuid.uuid4().hex,
            )
            return inv.ReserveStock(req, metadata=md, timeout=30)

        return reserve
    raise SystemExit(f"unknown scenario {name!r}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    md = [("authorization", f"Bearer {args.token}")] if args.token else []
    if args.channel:
        md.append(("x-channel-slug", args.channel))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(args.target) as channel:
        call = scenario(args.scenario, channel, md, args)
        await call(0)  # connect and warm up before the clock starts
        start = time.perf_counter()
        deadline = start + args.duration
        counter = 0

        async def worker() -> None:
            nonlocal counter
            while time.perf_counter() < deadline:
                counter += 1
                t0 = time.perf_counter()
                try:
                    await call(counter)
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as err:
                    key = err.code().name
                    errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3) if latencies else 0.0
        )

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "scenario": args.scenario,
        "concurrency": args.concurrency,
        "seconds": round(elapsed, 3),
        "ok": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "pid": os.getpid(),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--token", default="")
    p.add_argument("--channel", default="")
    p.add_argument("--scenario", required=True)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--skus", type=int, default=1)
    p.add_argument("--sku-prefix", default="BENCH-")
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
