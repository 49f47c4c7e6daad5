"""Shared proto <-> domain conversions (timestamps, durations, money, field masks)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message

from domain.shared.errors import FieldViolation, InvalidArgument
from domain.shared.money import Money
from entrepot.platform.v1 import types_pb2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """Same value as Timestamp.FromDatetime(value.astimezone(UTC)) (a naive value is
    local time), at a quarter of its cost: every response carries several.

    asyncpg stores the first and last instants Python holds (0001-01-01T00:00:00Z,
    9999-12-31T23:59:59.999999Z) as timestamptz -infinity / infinity and reads those
    back as the naive datetime.min / datetime.max: they are these instants in UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        if value == datetime.min or value == datetime.max:
            value = value.replace(tzinfo=UTC)
        else:
            value = value.astimezone(UTC)
    d = value - _EPOCH
    return timestamp_pb2.Timestamp(seconds=d.days * 86400 + d.seconds, nanos=d.microseconds * 1000)


# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z,
# which is also Python's datetime range; timestamptz holds all of it. Values are kept to the
# microsecond (PostgreSQL's precision): nanoseconds below that are dropped.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
_RANGE = "between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999999Z, nanos 0 to 999999999"


def timestamp_micros(value: timestamp_pb2.Timestamp, field: str) -> int:
    """A set Timestamp as microseconds since the epoch; outside the valid range INVALID_ARGUMENT
    with a field violation naming `field` (the request's field path)."""
    if (
        not MIN_TIMESTAMP_SECONDS <= value.seconds <= MAX_TIMESTAMP_SECONDS
        or not 0 <= value.nanos <= 999_999_999
    ):
        raise InvalidArgument(
            "INVALID_TIMESTAMP",
            f"{field} is not a valid timestamp",
            field_violations=[FieldViolation(field, f"must be {_RANGE}")],
        )
    return value.seconds * 1_000_000 + value.nanos // 1000


def timestamp(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A set Timestamp as an aware UTC datetime (timestamp_micros's checks)."""
    return _EPOCH + timedelta(microseconds=timestamp_micros(value, field))


def from_ts(value: timestamp_pb2.Timestamp, field: str = "time") -> datetime | None:
    """None when unset (zero); otherwise `timestamp`."""
    if value.seconds == 0 and value.nanos == 0:
        return None
    return timestamp(value, field)


def from_ts_field(message: Message, name: str, path: str | None = None) -> datetime | None:
    """`message.<name>` when set (HasField: the epoch is a value), else None; `path` is the
    field's path in the request for the violation (default `name`)."""
    if not message.HasField(name):
        return None
    return timestamp(getattr(message, name), path or name)


def from_duration(value: duration_pb2.Duration, field: str = "ttl") -> timedelta | None:
    """None when unset; negative durations are refused."""
    if value.seconds == 0 and value.nanos == 0:
        return None
    if value.seconds < 0 or value.nanos < 0:
        raise InvalidArgument("INVALID_DURATION", f"{field} must be positive")
    try:
        return value.ToTimedelta()
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument("INVALID_DURATION", f"{field} is out of range") from exc


def money(value: Money | None) -> types_pb2.Money | None:
    if value is None:
        return None
    return types_pb2.Money(currency_code=value.currency, amount_minor=value.amount_minor)


def from_money(value: types_pb2.Money) -> Money:
    return Money(value.currency_code, value.amount_minor)


def mask_paths(mask: field_mask_pb2.FieldMask, prefix: str = "") -> list[str]:
    """Field mask paths, with an optional resource prefix ("channel.name" -> "name") removed."""
    out = []
    for path in mask.paths:
        if prefix and path.startswith(prefix + "."):
            path = path[len(prefix) + 1 :]
        out.append(path)
    return out
