"""gRPC server reflection, v1 and v1alpha, over every file the server knows.

grpcio-reflection (1.85.1, the latest release) ships only `grpc.reflection.v1alpha`.
`grpc.reflection.v1` has the same messages with the same field numbers, only the
package differs, so one servicer answers both: the v1 method is registered with the
v1alpha message classes as (de)serializers, and the v1 file descriptor (the v1alpha
one renamed) is served so clients that describe every listed service find it.

The pool behind the servicer is the default descriptor pool (every generated module
imported by the server, including google/rpc/status.proto and error_details.proto, so
grpcurl can decode ErrorInfo, BadRequest, PreconditionFailure and RetryInfo details)
with two additions the upb pool lacks: a method's full name resolves to its file
(`grpcurl describe pkg.Service.Method`), and the v1 reflection file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

if TYPE_CHECKING:
    from server.app import GenericRegistration

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
# Always in the pool, whichever modules the services happen to import.
DETAIL_FILES = (error_details_pb2.DESCRIPTOR.name, status_pb2.DESCRIPTOR.name)


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: the v1alpha file under the v1 package."""
    alpha = reflection_pb2.DESCRIPTOR.package
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = V1_PACKAGE
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(f".{alpha}.", f".{V1_PACKAGE}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{alpha}.", f".{V1_PACKAGE}.")
            method.output_type = method.output_type.replace(f".{alpha}.", f".{V1_PACKAGE}.")
    return proto


class ReflectionPool:
    """The subset of DescriptorPool the reflection servicer calls, over the default pool
    plus a private pool holding the v1 reflection file."""

    def __init__(self, base: descriptor_pool.DescriptorPool | None = None) -> None:
        self.base = base or descriptor_pool.Default()
        self.extra = descriptor_pool.DescriptorPool()
        self.extra.Add(_v1_file())
        for name in DETAIL_FILES:
            self.base.FindFileByName(name)  # fails loudly if the details ever leave the pool

    def FindFileByName(self, name: str) -> descriptor.FileDescriptor:
        try:
            return self.base.FindFileByName(name)
        except KeyError:
            return self.extra.FindFileByName(name)

    def FindFileContainingSymbol(self, symbol: str) -> descriptor.FileDescriptor:
        for pool in (self.base, self.extra):
            with contextlib.suppress(KeyError):  # not in this pool: the next one
                return pool.FindFileContainingSymbol(symbol)
            with contextlib.suppress(KeyError):  # pkg.Service.Method: upb finds methods only this way
                return pool.FindMethodByName(symbol).containing_service.file
        raise KeyError(symbol)

    def FindMessageTypeByName(self, name: str) -> descriptor.Descriptor:
        return self.base.FindMessageTypeByName(name)

    def FindExtensionByNumber(self, message: descriptor.Descriptor, number: int) -> Any:
        return self.base.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: descriptor.Descriptor) -> list[Any]:
        return list(self.base.FindAllExtensions(message))


def enable(server: GenericRegistration, service_names: Iterable[str]) -> None:
    """Serve reflection v1alpha and v1 for `service_names` (plus both reflection services)."""
    names = sorted({*service_names, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME})
    servicer = reflection.aio.ReflectionServicer(names, pool=ReflectionPool())
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))
