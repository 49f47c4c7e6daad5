"""P1: GetStockLevel through the full stack (auth + channel interceptors, DB read),
32 concurrent callers, next to a bare grpc.aio server answering the same proto
with a constant, same load generator, same run."""

from __future__ import annotations

from typing import Any

from bench.common import Database, Row, loadgen, start_bare_server, start_server, token
from entrepot.inventory.v1 import inventory_pb2
from entrepot.platform.v1 import types_pb2
from entrepot_client import EntrepotSync

SKUS = 100


def seed(target: str, tok: str) -> None:
    with EntrepotSync(target, tok) as ep:
        ep.inventory.create_warehouse(
            inventory_pb2.CreateWarehouseRequest(
                warehouse=inventory_pb2.Warehouse(code="W1", name="Bench", priority=1)
            )
        )
        for i in range(SKUS):
            ep.inventory.upsert_inventory_item(
                inventory_pb2.UpsertInventoryItemRequest(item=inventory_pb2.InventoryItem(sku=f"BENCH-{i}"))
            )
            ep.inventory.receive_stock(
                inventory_pb2.ReceiveStockRequest(
                    sku=f"BENCH-{i}",
                    warehouse_code="W1",
                    quantity=1_000_000,
                    unit_cost=types_pb2.Money(currency_code="EUR", amount_minor=100),
                )
            )


def measure(db: Database, duration: float, concurrency: int = 32) -> dict[str, Any]:
    """Our side alone: seed, then GetStockLevel through a real server on `db`."""
    tok = token(("inventory.read", "inventory.admin", "inventory.write"))
    server = start_server(db)
    try:
        seed(server.target, tok)
        assert server.proc is not None
        return loadgen(
            server.target,
            "get_stock_level",
            concurrency=concurrency,
            duration=duration,
            tok=tok,
            skus=SKUS,
            server_pid=server.proc.pid,
        )
    finally:
        server.terminate()


def run(db: Database, duration: float, concurrency: int = 32, *, smoke: bool = False) -> list[Row]:
    tok = token(("inventory.read", "inventory.admin", "inventory.write"))
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
    ratio = ours["rps"] / base["rps"] if base["rps"] else 0.0
    return [
        Row(
            "P1",
            f"GetStockLevel full stack, {concurrency} callers",
            ours["rps"],
            base["rps"],
            "calls/s",
            ">= 0.7x bare grpc.aio",
            ratio >= 0.7,
            {"ours": ours, "baseline": base},
        ),
    ]
