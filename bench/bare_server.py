"""The baseline none of us wrote the logic of: a bare grpc.aio server answering
the same proto with a constant (no interceptors, no database)."""

from __future__ import annotations

import argparse
import asyncio

import grpc

from entrepot.inventory.v1 import inventory_pb2, inventory_pb2_grpc

CONSTANT = inventory_pb2.SkuStock(
    sku="BENCH-0",
    on_hand=100,
    reserved=10,
    available=90,
    warehouses=[
        inventory_pb2.StockLevel(sku="BENCH-0", warehouse_code="W1", on_hand=100, reserved=10, available=90)
    ],
)
RESERVATION = inventory_pb2.Reservation(
    id="constant", reference="bench", state=inventory_pb2.Reservation.STATE_ACTIVE
)


class Bare(inventory_pb2_grpc.InventoryServiceServicer):
    async def GetStockLevel(
        self, request: inventory_pb2.GetStockLevelRequest, context: grpc.aio.ServicerContext
    ) -> inventory_pb2.SkuStock:
        return CONSTANT

    async def ReserveStock(
        self, request: inventory_pb2.ReserveStockRequest, context: grpc.aio.ServicerContext
    ) -> inventory_pb2.Reservation:
        return RESERVATION


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    inventory_pb2_grpc.add_InventoryServiceServicer_to_server(Bare(), server)
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    asyncio.run(serve(p.parse_args().listen))
