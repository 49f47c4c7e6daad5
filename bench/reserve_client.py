"""Load generator for bench/reserve.py (runs in its own process).

64 callers (asyncio tasks) over grpc.aio channels call ReserveStock(1) on a
random SKU of the given set until the time is up; prints a JSON summary.
`--target a,b` spreads the channels (and so the callers) round-robin over
several server processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid

import grpc

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.inventory.v1 import inventory_pb2_grpc


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True, help="host:port, or several separated by commas")
    ap.add_argument("--token", required=True)
    ap.add_argument("--skus", type=int, default=1)
    ap.add_argument("--sku-prefix", default="B", help="SKUs are <prefix>00000 ... (K: bench/kits.py's kits)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--op", choices=["reserve", "get"], default="reserve")
    args = ap.parse_args()
    skus = [f"{args.sku_prefix}{i:05d}" for i in range(args.skus)]
    md = (("authorization", f"Bearer {args.token}"),)
    # At least two connections (own subchannel pools), so 64 callers stay far below
    # the server's max_concurrent_streams per connection; one or more per target.
    targets = args.target.split(",")
    channels = [
        grpc.aio.insecure_channel(targets[i % len(targets)], options=[("grpc.use_local_subchannel_pool", 1)])
        for i in range(max(2, len(targets)))
    ]
    stubs = [inventory_pb2_grpc.InventoryServiceStub(c) for c in channels]
    ok = refused = errors = 0
    latencies: list[float] = []
    codes: dict[str, int] = {}
    # Warm-up call (connection, server caches) outside the measurement.
    for st in stubs:
        await st.GetStockLevel(pb.GetStockLevelRequest(sku=skus[0]), metadata=md, timeout=10)
    deadline = time.monotonic() + args.seconds

    async def worker(seed: int) -> None:
        nonlocal ok, refused, errors
        rnd = random.Random(seed)
        stub = stubs[seed % len(stubs)]
        while time.monotonic() < deadline:
            req = pb.ReserveStockRequest(
                lines=[pb.ReservationLineRequest(sku=rnd.choice(skus), quantity=1)],
                request_id=uuid.uuid4().hex,
            )
            t0 = time.perf_counter()
            try:
                if args.op == "get":
                    await stub.GetStockLevel(
                        pb.GetStockLevelRequest(sku=req.lines[0].sku), metadata=md, timeout=30
                    )
                else:
                    await stub.ReserveStock(req, metadata=md, timeout=30)
                ok += 1
                latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    refused += 1
                else:
                    errors += 1
                    codes[f"{err.code().name}: {err.details()}"[:120]] = (
                        codes.get(f"{err.code().name}: {err.details()}"[:120], 0) + 1
                    )

    start = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(args.clients)))
    elapsed = time.monotonic() - start
    for c in channels:
        await c.close()
    latencies.sort()

    def pct(p: float) -> float:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2) if latencies else 0.0
        )

    print(
        json.dumps(
            {
                "ok": ok,
                "refused": refused,
                "errors": errors,
                "elapsed": elapsed,
                "p50_ms": pct(0.5),
                "p99_ms": pct(0.99),
                "error_codes": codes,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
