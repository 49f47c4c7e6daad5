"""Typed exceptions carrying the server's ErrorInfo reason and details."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class PreconditionViolation:
    type: str
    subject: str
    description: str


@dataclass
class EntrepotError(Exception):
    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[FieldViolation] = field(default_factory=list)
    precondition_violations: list[PreconditionViolation] = field(default_factory=list)

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"


class InvalidArgumentError(EntrepotError): ...


class NotFoundError(EntrepotError): ...


class AlreadyExistsError(EntrepotError): ...


class FailedPreconditionError(EntrepotError): ...


class AbortedError(EntrepotError): ...


class PermissionDeniedError(EntrepotError): ...


class UnauthenticatedError(EntrepotError): ...


class ResourceExhaustedError(EntrepotError): ...


class UnavailableError(EntrepotError): ...


class DeadlineExceededError(EntrepotError): ...


class InternalError(EntrepotError): ...


_BY_CODE: dict[grpc.StatusCode, type[EntrepotError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.INTERNAL: InternalError,
}


# grpc core fails a call whose connection broke under a pending write with this local
# INTERNAL (grpc/grpc#36066; seen when a server is killed mid-SyncStock): a transport
# failure, not an answer from the server, so it is UNAVAILABLE and retried as such.
_CORE_TRANSPORT_FAILURE = "Internal error from Core"


def from_rpc_error(err: grpc.RpcError) -> EntrepotError:
    """Build the typed error from a failed call (sync or aio)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.INTERNAL and message == _CORE_TRANSPORT_FAILURE:
        code = grpc.StatusCode.UNAVAILABLE
    cls = _BY_CODE.get(code, EntrepotError)
    out = cls(code=code, message=message or "")
    status = None
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:
        status = None  # details did not match the status line: keep the plain error
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out.reason, out.domain, out.metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.field_violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            pf = error_details_pb2.PreconditionFailure()
            detail.Unpack(pf)
            out.precondition_violations = [
                PreconditionViolation(v.type, v.subject, v.description) for v in pf.violations
            ]
    return out
