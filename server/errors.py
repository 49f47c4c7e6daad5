"""The one place where domain errors become gRPC statuses with google.rpc details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from domain.shared.errors import DomainError

ERROR_DOMAIN = "entrepot"

_CODES: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "ABORTED": grpc.StatusCode.ABORTED,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "OUT_OF_RANGE": grpc.StatusCode.OUT_OF_RANGE,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "INTERNAL": grpc.StatusCode.INTERNAL,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def build_status(
    code: grpc.StatusCode,
    reason: str,
    message: str,
    metadata: dict[str, str] | None = None,
    field_violations: list[tuple[str, str]] | None = None,
    precondition_violations: list[tuple[str, str, str]] | None = None,
) -> status_pb2.Status:
    """A google.rpc.Status with exactly one ErrorInfo (AIP-193) plus BadRequest/PreconditionFailure."""
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.append(
        _pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {}))
    )
    if field_violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in field_violations
            ]
        )
        status.details.append(_pack(bad))
    if precondition_violations:
        pf = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(type=t, subject=s, description=d)
                for t, s, d in precondition_violations
            ]
        )
        status.details.append(_pack(pf))
    return status


def status_from_domain(err: DomainError) -> status_pb2.Status:
    return build_status(
        _CODES[err.kind],
        err.reason,
        err.message,
        err.metadata,
        [(v.field, v.description) for v in err.field_violations],
        [(v.type, v.subject, v.description) for v in err.precondition_violations],
    )


def to_grpc_status(status: status_pb2.Status) -> grpc.Status:
    return rpc_status.to_status(status)  # type: ignore[no-any-return]


async def abort(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    """Ends the call with `status` (code, message and details in the trailers); always raises."""
    s = to_grpc_status(status)
    await context.abort(s.code, s.details, s.trailing_metadata)


assert code_pb2.OK == 0  # google.rpc codes and grpc codes share numbering


class ReplayedStatus(Exception):
    """A stored error answer replayed for a repeated request_id."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status
