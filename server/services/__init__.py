"""The registry of served services: one entry per service (append yours)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from entrepot.inventory.v1 import inventory_pb2, inventory_pb2_grpc
from entrepot.order.v1 import order_pb2, order_pb2_grpc
from entrepot.platform.v1 import channel_pb2, channel_pb2_grpc
from server.runtime import Runtime
from server.services.channel import ChannelServicer
from server.services.inventory import InventoryServicer
from server.services.order import OrderServicer


@dataclass(frozen=True)
class ServiceSpec:
    descriptor: ServiceDescriptor
    add_to_server: Callable[[Any, Any], None]
    make: Callable[[Runtime], Any]


SERVICES: list[ServiceSpec] = [
    ServiceSpec(
        channel_pb2.DESCRIPTOR.services_by_name["ChannelService"],
        channel_pb2_grpc.add_ChannelServiceServicer_to_server,
        ChannelServicer,
    ),
    ServiceSpec(
        inventory_pb2.DESCRIPTOR.services_by_name["InventoryService"],
        inventory_pb2_grpc.add_InventoryServiceServicer_to_server,
        InventoryServicer,
    ),
    ServiceSpec(
        order_pb2.DESCRIPTOR.services_by_name["OrderService"],
        order_pb2_grpc.add_OrderServiceServicer_to_server,
        OrderServicer,
    ),
]

# CartService (carts): appended on its own so merges stay trivial.
from entrepot.cart.v1 import cart_pb2, cart_pb2_grpc  # noqa: E402
from server.services.cart import CartServicer  # noqa: E402

SERVICES.append(
    ServiceSpec(
        cart_pb2.DESCRIPTOR.services_by_name["CartService"],
        cart_pb2_grpc.add_CartServiceServicer_to_server,
        CartServicer,
    )
)
