"""The split policy and the ids that make executions exactly-once."""

from __future__ import annotations

import pytest

from domain.refund.rules import TenderRoom, idempotency_key, split_over_tenders, workflow_id


def test_split_takes_the_last_captured_tender_first() -> None:
    rooms = [TenderRoom("gift", 1000), TenderRoom("card", 1500)]
    assert split_over_tenders(2000, rooms) == [("card", 1500), ("gift", 500)]
    assert split_over_tenders(1500, rooms) == [("card", 1500)]
    assert split_over_tenders(2500, rooms) == [("card", 1500), ("gift", 1000)]


def test_split_skips_tenders_without_room_and_refuses_too_much() -> None:
    rooms = [TenderRoom("a", 700), TenderRoom("b", 0), TenderRoom("c", -5)]
    assert split_over_tenders(700, rooms) == [("a", 700)]
    assert split_over_tenders(701, rooms) is None
    assert split_over_tenders(0, rooms) == []
    with pytest.raises(ValueError):
        split_over_tenders(-1, rooms)


def test_keys_and_workflow_ids_are_fixed() -> None:
    assert idempotency_key("r1", "t1") == idempotency_key("r1", "t1")
    assert idempotency_key("r1", "t1") != idempotency_key("r1", "t2")
    assert workflow_id("r1", 1) == "refund-r1"
    assert workflow_id("r1", 3) == "refund-r1-retry-2"
