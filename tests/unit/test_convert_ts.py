"""server.convert.ts: the same Timestamp as protobuf's own FromDatetime (UTC)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import timestamp_pb2

from server.convert import ts


def _reference(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value.astimezone(UTC))
    return out


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 22, 2, 30, 1, 123456, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),  # before the epoch: nanos stay positive
        datetime(2026, 3, 1, 12, 0, 0, 1, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
        datetime(2020, 5, 5, 1, 2, 3, 4),  # naive: local time, like astimezone
    ],
)
def test_ts_matches_from_datetime(value: datetime) -> None:
    assert ts(value) == _reference(value)


def test_ts_none() -> None:
    assert ts(None) is None
