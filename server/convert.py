"""Shared proto <-> domain conversions (timestamps, durations, money, field masks)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from domain.shared.errors import InvalidArgument
from domain.shared.money import Money
from entrepot.platform.v1 import types_pb2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """Same value as Timestamp.FromDatetime(value.astimezone(UTC)) (a naive value is
    local time), at a quarter of its cost: every response carries several."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.astimezone(UTC)
    d = value - _EPOCH
    return timestamp_pb2.Timestamp(seconds=d.days * 86400 + d.seconds, nanos=d.microseconds * 1000)


def from_ts(value: timestamp_pb2.Timestamp, field: str = "time") -> datetime | None:
    """None when unset."""
    if value.seconds == 0 and value.nanos == 0:
        return None
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument("INVALID_TIMESTAMP", f"{field} is out of range") from exc


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
