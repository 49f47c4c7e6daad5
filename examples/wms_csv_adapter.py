"""Example WMS adapter: stream a CSV stock export into Entrepot with SyncStock.

CSV columns (header required): event_id, sku, warehouse, kind, quantity, occurred_at
(+ optional reason). kind is SET, ADJUST or RECEIVE; occurred_at is ISO 8601.

    # a sample export, then push it (idempotent: run it twice, the second run applies nothing)
    python examples/wms_csv_adapter.py sample export.csv --rows 10000 --warehouse PAR
    ENTREPOT_TOKEN=... python examples/wms_csv_adapter.py push export.csv --source wms-paris \
        --target 127.0.0.1:50051

`push` asks GetSyncCursor where the source stands and skips the rows up to the
last committed event when it finds it in the file (an optimisation only: the
server applies each (source, event_id) once whatever is resent). Disconnects
and server restarts are retried by entrepot_client.streams.sync_stock.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client import Entrepot
from entrepot_client.streams import StockEvent, SyncProgress, sync_stock

COLUMNS = ("event_id", "sku", "warehouse", "kind", "quantity", "occurred_at")


def read_events(path: str, after_event_id: str = "") -> Iterator[StockEvent]:
    """Rows as events; with `after_event_id`, only the rows after that event."""
    skipping = bool(after_event_id) and _contains(path, after_event_id)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"{path}: missing columns {', '.join(missing)}")
        for row in reader:
            if skipping:
                skipping = row["event_id"] != after_event_id
                continue
            at = datetime.fromisoformat(row["occurred_at"]) if row["occurred_at"] else None
            yield StockEvent(
                event_id=row["event_id"],
                sku=row["sku"],
                warehouse_code=row["warehouse"],
                kind=row["kind"].strip().lower(),
                quantity=int(row["quantity"]),
                occurred_at=at,
                reason=row.get("reason") or "",
            )


def _contains(path: str, event_id: str) -> bool:
    with open(path, newline="") as f:
        return any(row["event_id"] == event_id for row in csv.DictReader(f))


def write_sample(path: str, rows: int, warehouse: str, skus: int, seed: int) -> None:
    rng = random.Random(seed)
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow((*COLUMNS, "reason"))
        for i in range(rows):
            r = rng.random()
            kind, qty = ("SET", rng.randrange(0, 500)) if r < 0.3 else ("ADJUST", rng.randrange(1, 20))
            if r > 0.9:
                kind, qty = "RECEIVE", rng.randrange(1, 100)
            at = (t0 + timedelta(seconds=i)).isoformat()
            w.writerow(
                (f"{warehouse}-{i:09d}", f"SKU-{rng.randrange(skus):05d}", warehouse, kind, qty, at, "wms")
            )


def report(p: SyncProgress) -> None:
    c = p.cursor
    print(
        f"\rbatches {p.batches}  applied {p.applied}  duplicate {p.duplicate}  stale {p.stale}  "
        f"rejected {p.rejected}  cursor {c.last_event_id if c else ''}",
        end="",
        file=sys.stderr,
        flush=True,
    )


async def push(args: argparse.Namespace) -> int:
    token = os.environ.get("ENTREPOT_TOKEN") or args.token
    if not token:
        raise SystemExit("set ENTREPOT_TOKEN (a token with permission inventory.sync)")
    async with Entrepot(args.target, token) as ep:
        cursor = await ep.inventory.get_sync_cursor(pb.GetSyncCursorRequest(source=args.source))
        if cursor.last_event_id:
            print(f"{args.source}: resuming after {cursor.last_event_id}", file=sys.stderr)
        start = time.perf_counter()
        progress = await sync_stock(
            ep,
            args.source,
            read_events(args.csv, cursor.last_event_id),
            batch_size=args.batch_size,
            on_progress=report,
        )
        elapsed = time.perf_counter() - start
    print(file=sys.stderr)
    seen = progress.applied + progress.duplicate + progress.stale + progress.rejected
    print(
        f"done in {elapsed:.1f}s: {seen} events ({seen / max(elapsed, 1e-9):,.0f}/s), "
        f"applied {progress.applied}, duplicate {progress.duplicate}, stale {progress.stale}, "
        f"rejected {progress.rejected}, reconnects {progress.reconnects}"
    )
    for e in progress.errors[:20]:
        print(f"  rejected {e.event_id}: {e.reason} {e.message}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("push", help="stream a CSV export into Entrepot")
    p.add_argument("csv")
    p.add_argument("--source", required=True, help="adapter name, e.g. wms-paris")
    p.add_argument("--target", default=os.environ.get("ENTREPOT_TARGET", "127.0.0.1:50051"))
    p.add_argument("--token", default="", help="or ENTREPOT_TOKEN")
    p.add_argument("--batch-size", type=int, default=2000)
    s = sub.add_parser("sample", help="write a sample export")
    s.add_argument("csv")
    s.add_argument("--rows", type=int, default=10_000)
    s.add_argument("--warehouse", default="PAR")
    s.add_argument("--skus", type=int, default=1000)
    s.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.cmd == "sample":
        write_sample(args.csv, args.rows, args.warehouse, args.skus, args.seed)
        print(f"wrote {args.rows} rows to {args.csv}")
        return 0
    return asyncio.run(push(args))


if __name__ == "__main__":
    raise SystemExit(main())
