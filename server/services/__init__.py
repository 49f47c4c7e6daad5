"""The registry of served services: one entry per service (append yours)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from entrepot.platform.v1 import channel_pb2, channel_pb2_grpc
from entrepot.registration.v1 import registration_pb2, registration_pb2_grpc
from server.runtime import Runtime
from server.services.channel import ChannelServicer
from server.services.registration import RegistrationServicer


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
        registration_pb2.DESCRIPTOR.services_by_name["RegistrationService"],
        registration_pb2_grpc.add_RegistrationServiceServicer_to_server,
        RegistrationServicer,
    ),
]
