"""Entity ids are UUIDv7 (domain/shared/ids.py): version 7, the RFC variant, the time of
their making in the first 48 bits, ordered across milliseconds, and unique."""

from __future__ import annotations

import time
import uuid

from domain.shared.ids import new_id


def test_an_id_is_a_version_7_uuid_of_the_current_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    made = new_id()
    after = time.time_ns() // 1_000_000
    assert made.version == 7 and made.variant == uuid.RFC_4122
    assert before <= made.int >> 80 <= after
    assert uuid.UUID(str(made)) == made


def test_ids_of_later_milliseconds_sort_after_and_none_repeats() -> None:
    first = new_id()
    time.sleep(0.002)
    batch = [new_id() for _ in range(10_000)]
    assert all(first < b for b in batch)
    assert len(set(batch)) == len(batch)
