"""Domain errors: a stable reason, a message, and structured details.

The transport layer maps the kind of error to a gRPC status code (one place:
server/errors.py); domain code never imports grpc.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class PreconditionViolation:
    type: str
    subject: str
    description: str


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""

    kind = "FAILED_PRECONDITION"

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        metadata: dict[str, str] | None = None,
        field_violations: list[FieldViolation] | None = None,
        precondition_violations: list[PreconditionViolation] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = metadata or {}
        self.field_violations = field_violations or []
        self.precondition_violations = precondition_violations or []


class InvalidArgument(DomainError):
    kind = "INVALID_ARGUMENT"


class NotFound(DomainError):
    kind = "NOT_FOUND"


class AlreadyExists(DomainError):
    kind = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    kind = "FAILED_PRECONDITION"


class Aborted(DomainError):
    kind = "ABORTED"


class PermissionDenied(DomainError):
    kind = "PERMISSION_DENIED"


class ResourceExhausted(DomainError):
    kind = "RESOURCE_EXHAUSTED"


class OutOfRange(DomainError):
    kind = "OUT_OF_RANGE"


class Unavailable(DomainError):
    kind = "UNAVAILABLE"


@dataclass
class Violations:
    """Collects field violations so a request reports all of them at once."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, message: str = "the request is invalid", reason: str = "INVALID_ARGUMENT") -> None:
        if self.items:
            raise InvalidArgument(reason, message, field_violations=list(self.items))
