"""The registry of served services: one entry per service (append yours)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from entrepot.order.v1 import order_pb2, order_pb2_grpc
from entrepot.platform.v1 import channel_pb2, channel_pb2_grpc
from entrepot.refund.v1 import refund_pb2, refund_pb2_grpc
from server.runtime import Runtime
from server.services.channel import ChannelServicer
from server.services.order import OrderServicer
from server.services.refund import RefundServicer


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
        order_pb2.DESCRIPTOR.services_by_name["OrderService"],
        order_pb2_grpc.add_OrderServiceServicer_to_server,
        OrderServicer,
    ),
    ServiceSpec(
        refund_pb2.DESCRIPTOR.services_by_name["RefundService"],
        refund_pb2_grpc.add_RefundServiceServicer_to_server,
        RefundServicer,
    ),
]
