"""The one place where domain errors become gRPC statuses with google.rpc details.

Every text that goes into a status (the message, ErrorInfo metadata, field and
precondition violations) is bounded here: a caller's input echoed in an error
is cut to a short prefix with its length, so the trailers stay a few KiB
whatever the request carried (a default gRPC client refuses trailers over
8 KiB, and an error must never be bigger than the request that caused it)."""

from __future__ import annotations

import re

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


# Bounds in UTF-8 bytes. grpc-message percent-encodes every non-ASCII byte (x3) and
# grpc-status-details-bin is base64 (x4/3) of the Status, message included; with these
# bounds a status's trailers stay under ~5 KiB.
MAX_MESSAGE_BYTES = 400
MAX_TEXT_BYTES = 256  # a metadata value, a violation's field, subject or description
MAX_KEY_BYTES = 64  # a metadata key
MAX_ENTRIES = 12  # metadata entries, field violations, precondition violations (each)
MAX_DETAILS_BYTES = 2048  # the serialized details together
# A run of this many non-space characters in a message is an echoed value, not prose.
_LONG_RUN = re.compile(r"\S{65,}")
_QUOTES = "'\""
_PUNCTUATION = ",.;:)"
_KEEP = 24  # characters of an echoed value kept in front of its length


def _cut_value(run: re.Match[str]) -> str:
    """`'xxxx...x',` -> `'xxxxxxxxxxxxxxxxxxxxxxxx…' (100000 chars),`."""
    s = run.group()
    core = s.rstrip(_PUNCTUATION)
    tail = s[len(core) :]
    lead = core[0] if core[0] in _QUOTES else ""
    trail = lead if lead and len(core) > 1 and core[-1] == lead else ""
    core = core[len(lead) : len(core) - len(trail)]
    return f"{lead}{core[:_KEEP]}…{trail} ({len(core)} chars){tail}"


def _cut_bytes(text: str, limit: int) -> str:
    """`text` in at most `limit` UTF-8 bytes (plus the marker), cut at a character boundary."""
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return text
    head = encoded[:limit].decode("utf-8", "ignore")
    return f"{head}… ({len(text)} chars)"


def bounded(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """Prose (a message, a description): echoed values in it (runs of more than 64
    characters without a space) shortened, then at most `limit` bytes."""
    if len(text) > 64:
        text = _LONG_RUN.sub(_cut_value, text)
    return _cut_bytes(text, limit)


def _value(text: str) -> str:
    """A machine-read text (metadata value, field path, subject): only cut to MAX_TEXT_BYTES."""
    return _cut_bytes(text, MAX_TEXT_BYTES)


def _first(items: list[tuple[str, ...]], *, prose: int) -> list[tuple[str, ...]]:
    """At most MAX_ENTRIES, each text bounded (the one at index `prose` as prose); the
    count of the rest in a last entry."""
    kept = [
        tuple(bounded(t) if i == prose else _value(t) for i, t in enumerate(item))
        for item in items[:MAX_ENTRIES]
    ]
    if len(items) > MAX_ENTRIES:
        width = len(items[0])
        kept.append(("…",) * (width - 1) + (f"{len(items) - MAX_ENTRIES} more not shown",))
    return kept


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
    """A google.rpc.Status with exactly one ErrorInfo (AIP-193) plus BadRequest/PreconditionFailure,
    every text in it bounded (see the module's docstring)."""
    status = status_pb2.Status(code=code.value[0], message=bounded(message, MAX_MESSAGE_BYTES))
    entries = _first(sorted((metadata or {}).items()), prose=-1)
    info = error_details_pb2.ErrorInfo(
        reason=_value(reason),
        domain=ERROR_DOMAIN,
        metadata={_cut_bytes(k, MAX_KEY_BYTES): v for k, v in entries},
    )
    details = [info]
    if field_violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in _first(list(field_violations), prose=1)
                ]
            )
        )
    if precondition_violations:
        details.append(
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(type=t, subject=s, description=d)
                    for t, s, d in _first(list(precondition_violations), prose=2)
                ]
            )
        )
    # Each part is bounded; together they may still be too much: the violations go
    # first (the message and the reason still say what is wrong), then the metadata.
    while sum(d.ByteSize() for d in details) > MAX_DETAILS_BYTES and len(details) > 1:
        details.pop()
    for key in sorted(info.metadata, reverse=True):
        if info.ByteSize() <= MAX_DETAILS_BYTES:
            break
        del info.metadata[key]
    for d in details:
        status.details.append(_pack(d))
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
