"""The registry of served services: one entry per service (append yours)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from entrepot.cart.v1 import cart_pb2, cart_pb2_grpc
from entrepot.inventory.v1 import inventory_pb2, inventory_pb2_grpc
from entrepot.order.v1 import order_pb2, order_pb2_grpc
from entrepot.platform.v1 import channel_pb2, channel_pb2_grpc
from entrepot.refund.v1 import refund_pb2, refund_pb2_grpc
from entrepot.registration.v1 import registration_pb2, registration_pb2_grpc
from server.runtime import Runtime
from server.services.cart import CartServicer
from server.services.channel import ChannelServicer
from server.services.inventory import InventoryServicer
from server.services.order import OrderServicer
from server.services.refund import RefundServicer
from server.services.registration import RegistrationServicer


@dataclass(frozen=True)
class ServiceSpec:
    descriptor: ServiceDescriptor
    add_to_server: Callable[[Any, Any], None]
    make: Callable[[Runtime], Any]
    # The pipeline's text stage (server/interceptors.py) refuses a NUL character in any text
    # field of the requests (INVALID_TEXT, naming the field). Elsewhere such a value reaches
    # the database and is refused there (SQLSTATE class 22: INVALID_VALUE).
    checks_text: bool = False


def _spec(
    module: Any, name: str, grpc_module: Any, make: Callable[[Runtime], Any], checks_text: bool = False
) -> ServiceSpec:
    return ServiceSpec(
        module.DESCRIPTOR.services_by_name[name],
        getattr(grpc_module, f"add_{name}Servicer_to_server"),
        make,
        checks_text,
    )


SERVICES: list[ServiceSpec] = [
    _spec(channel_pb2, "ChannelService", channel_pb2_grpc, ChannelServicer),
    _spec(inventory_pb2, "InventoryService", inventory_pb2_grpc, InventoryServicer),
    _spec(order_pb2, "OrderService", order_pb2_grpc, OrderServicer),
    _spec(refund_pb2, "RefundService", refund_pb2_grpc, RefundServicer),
    _spec(
        registration_pb2, "RegistrationService", registration_pb2_grpc, RegistrationServicer, checks_text=True
    ),
    _spec(cart_pb2, "CartService", cart_pb2_grpc, CartServicer),
]
